"""Schedules: each one's levels against its reference: k-diffusion's own functions (karras,
exponential, polyexponential, called from k_diffusion/sampling.py in float64), ComfyUI's
formulas written out here as closed forms (comfy/samplers.py: normal_scheduler,
simple_scheduler, ddim_scheduler, beta_scheduler, linear_quadratic_schedule,
kl_optimal_scheduler), diffusers' Euler tables; their invariants on every process, and
``--schedule`` on the samplers that walk noise levels (and its refusal on those that do not),
before any step. (tests/test_sampler_schedule_pairs.py runs every sampler x schedule.)"""

from __future__ import annotations

import math

import kdiffusion
import numpy as np
import pytest
import torch
from cliutil import assert_clean_error, run_cli

import diffplug
from diffplug.checkpoint import load_tensors
from diffplug.output import read_recipe
from diffplug.registry import default_registry
from diffplug.schedules import NoiseTable
from diffplug.testing import circle_mixture
from diffplug.vp import VP, VPConfig
from diffplug_adm.process import Decoupled

F64 = torch.float64
PROCESSES = {
    "vp-linear": VP(),
    "vp-scaled": VP(VPConfig(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)),
    "decoupled": Decoupled(),
}
SCHEDULES = [
    "normal",
    "karras",
    "exponential",
    "polyexponential",
    "sgm-uniform",
    "simple",
    "ddim-uniform",
    "beta",
    "linear-quadratic",
    "kl-optimal",
]


def schedule(name, **options):
    return default_registry().load("schedule", name).from_options(**options)


def table_np(process):
    """The process's noise levels as numpy float64, computed here from alpha and sigma."""
    if isinstance(process, VP):
        abar = process.alphas_cumprod.double().numpy()
        return np.sqrt((1 - abar) / abar)
    low, high = process.t_range
    t = low + (high - low) * np.arange(1000) / 1000
    return np.sqrt(t) / (1 - t)


def comfy_sigma(levels, index):
    """ComfyUI's ModelSamplingDiscrete.sigma: log-linear interpolation at fractional index."""
    index = np.clip(index, 0, len(levels) - 1)
    low, high = np.floor(index).astype(int), np.ceil(index).astype(int)
    w = index - low
    return np.exp((1 - w) * np.log(levels[low]) + w * np.log(levels[high]))


def comfy_timestep(levels, level):
    """ComfyUI's ModelSamplingDiscrete.timestep: the index of the nearest log level."""
    return float(np.abs(np.log(levels) - np.log(level)).argmin())


def closed_form(name, levels, n, lo=None, hi=None, **opt):
    """Each schedule written out independently (k-diffusion's and ComfyUI's formulas), on
    the table ``levels`` (ComfyUI's model_sampling.sigmas) and the range [lo, hi] (its
    sigma_min, sigma_max: the table's ends unless given)."""
    lo = levels[0] if lo is None else lo
    hi = levels[-1] if hi is None else hi
    T = len(levels)
    if name == "karras":
        rho = opt.get("rho", 7.0)
        ramp = np.linspace(0, 1, n)
        out = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    elif name == "exponential":
        out = np.exp(np.linspace(np.log(hi), np.log(lo), n))
    elif name == "polyexponential":
        rho = opt.get("rho", 1.0)
        out = np.exp(np.linspace(1, 0, n) ** rho * (np.log(hi) - np.log(lo)) + np.log(lo))
    elif name == "kl-optimal":  # kl_optimal_scheduler(n, sigma_min, sigma_max)
        w = np.arange(n) / (n - 1)
        out = np.tan(w * np.arctan(lo) + (1 - w) * np.arctan(hi))
    elif name == "sgm-uniform":  # normal_scheduler(sgm=True)
        start, end = comfy_timestep(levels, hi), comfy_timestep(levels, lo)
        out = comfy_sigma(levels, np.linspace(start, end, n + 1)[:-1])
    elif name == "normal-uniform":  # normal_scheduler(sgm=False); sigma(end) is never ~0 here
        start, end = comfy_timestep(levels, hi), comfy_timestep(levels, lo)
        out = comfy_sigma(levels, np.linspace(start, end, n))
    elif name == "simple":
        out = np.array([levels[-(1 + int(x * T / n))] for x in range(n)])
    elif name == "ddim-uniform":  # ddim_scheduler; sigmas[1] is never ~0 here
        out = levels[np.arange(1, T, max(T // n, 1))][::-1]
    elif name == "beta":
        from scipy.special import betaincinv  # the inverse CDF, not scipy.stats' ppf

        q = 1 - np.arange(n) / n  # 1 - linspace(0, 1, n, endpoint=False)
        ts = np.rint(betaincinv(opt.get("alpha", 0.6), opt.get("beta", 0.6), q) * (T - 1))
        keep = np.concatenate([[True], ts[1:] != ts[:-1]])
        out = levels[ts[keep].astype(int)]
    elif name == "linear-quadratic":
        if n == 1:
            return np.array([hi, 0.0])
        noise, lin = opt.get("threshold_noise", 0.025), opt.get("linear_steps", n // 2)
        i = np.arange(n)
        quad = n - lin
        a = (lin - noise * n) / (lin * quad**2)
        b = noise / lin - 2 * (lin - noise * n) / quad**2
        frac = np.where(i < lin, i * noise / lin, a * i**2 + b * i + a * lin**2)
        out = (1 - frac) * hi
    else:
        raise AssertionError(name)
    return np.append(out, 0.0)


@pytest.mark.parametrize("process", PROCESSES.values(), ids=PROCESSES.keys())
@pytest.mark.parametrize(
    "name, options",
    [
        ("karras", {}),
        ("karras", {"rho": 3.0}),
        ("exponential", {}),
        ("polyexponential", {"rho": 2.0}),
        ("kl-optimal", {}),
        ("sgm-uniform", {}),
        ("simple", {}),
        ("ddim-uniform", {}),
        ("beta", {}),
        ("beta", {"alpha": 0.3, "beta": 0.9}),
        ("linear-quadratic", {}),
        ("linear-quadratic", {"threshold_noise": 0.1}),
        ("linear-quadratic", {"linear_steps": 1}),
    ],
)
@pytest.mark.parametrize("steps", [2, 7, 10, 30])
def test_each_schedule_is_its_closed_form(process, name, options, steps):
    levels = table_np(process)
    got = schedule(name, **options).levels(process, steps).numpy()
    want = closed_form(name, levels, steps, **options)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("process", PROCESSES.values(), ids=PROCESSES.keys())
@pytest.mark.parametrize("name", ["kl-optimal", "sgm-uniform", "linear-quadratic", "karras"])
@pytest.mark.parametrize("steps", [1, 3, 12])
def test_the_range_schedules_follow_sigma_min_and_sigma_max(process, name, steps):
    """--sigma-min/--sigma-max stand for ComfyUI's model_sampling.sigma_min/sigma_max."""
    levels = table_np(process)
    got = schedule(name).levels(process, steps, 0.05, 20.0).numpy()
    if name == "kl-optimal" and steps == 1:  # ComfyUI's divides by n - 1 = 0 (NaN); ours:
        want = np.array([20.0, 0.0])  # the top, as every schedule's first level
    else:
        want = closed_form(name, levels, steps, lo=0.05, hi=20.0)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)


def kdiffusion_float64(function, *args, **kwargs):
    """k-diffusion's function with float64 as torch's default dtype (its linspace)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    try:
        return function(*args, **kwargs)
    finally:
        torch.set_default_dtype(previous)


KD_STEPS = [1, 2, 3, 7, 10, 25, 100, 1000]
KD_RANGES = {
    "edm": (0.002, 80.0),
    "sd": (0.0292, 14.6146),
    "narrow": (0.1, 1.0),
    "wide": (1e-4, 1e3),
}
KD_RHOS = [0.5, 1.0, 3.0, 7.0, 10.0]


@pytest.mark.parametrize("name", ["karras", "exponential", "polyexponential"])
def test_karras_exponential_polyexponential_are_k_diffusions_own_functions(name):
    """get_sigmas_karras / get_sigmas_exponential / get_sigmas_polyexponential (k-diffusion
    0.1.1.post1) in float64, for every step count, range and rho here, on explicit ranges
    and on each process's own: within 1e-12 relative (measured: bitwise equal, max 0)."""
    kd = kdiffusion.load_sampling()
    ranges = dict(KD_RANGES)
    for key, process in PROCESSES.items():  # the process's own ends, computed independently
        levels = table_np(process)
        ranges[key] = (None, None, float(levels[0]), float(levels[-1]))
    worst, compared = 0.0, 0
    for label, given in ranges.items():
        low, high = given[-2:]
        process = PROCESSES.get(label, VP())
        override = given[:2] if len(given) == 4 else given
        for steps in KD_STEPS:
            for rho in KD_RHOS if name != "exponential" else [None]:
                if name == "karras":
                    want = kdiffusion_float64(kd.get_sigmas_karras, steps, low, high, rho=rho)
                elif name == "exponential":
                    want = kdiffusion_float64(kd.get_sigmas_exponential, steps, low, high)
                else:
                    want = kdiffusion_float64(kd.get_sigmas_polyexponential, steps, low, high,
                                              rho=rho)  # fmt: skip
                options = {} if rho is None else {"rho": rho}
                got = schedule(name, **options).levels(process, steps, *override)
                assert want.dtype == F64 and got.shape == want.shape, (label, steps, rho)
                live = want[:-1]
                rel = float(((got[:-1] - live).abs() / live).max())
                assert rel <= 1e-12, (label, steps, rho, rel)
                assert float(got[-1]) == float(want[-1]) == 0.0
                worst, compared = max(worst, rel), compared + 1
    assert compared >= 7 * len(KD_STEPS)
    assert worst <= 1e-12


@pytest.mark.parametrize("process", PROCESSES.values(), ids=PROCESSES.keys())
@pytest.mark.parametrize("steps", [1, 4, 25])
def test_normal_is_the_models_timesteps_or_comfyuis_normal(process, steps):
    levels = table_np(process)
    from diffplug.vp import spaced_timesteps

    for spacing in ("leading", "trailing", "linspace"):
        got = schedule("normal", spacing=spacing).levels(process, steps).numpy()
        picked = spaced_timesteps(len(levels), steps, spacing)
        np.testing.assert_allclose(got, np.append(levels[picked], 0.0), rtol=1e-12, atol=0)
    got = schedule("normal", spacing="uniform").levels(process, steps).numpy()
    want = closed_form("normal-uniform", levels, steps)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("flag", ["use_karras_sigmas", "use_exponential_sigmas"])
@pytest.mark.parametrize("steps", [5, 20, 50])
def test_karras_and_exponential_match_diffusers_euler_tables(flag, steps):
    import inspect

    from diffusers import EulerDiscreteScheduler

    assert flag in inspect.signature(EulerDiscreteScheduler.__init__).parameters
    sched = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                   beta_end=0.012, **{flag: True})  # fmt: skip
    sched.set_timesteps(steps)
    name = "karras" if flag == "use_karras_sigmas" else "exponential"
    ours = schedule(name).levels(PROCESSES["vp-scaled"], steps)
    torch.testing.assert_close(ours.float(), sched.sigmas.float(), rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("process", PROCESSES.values(), ids=PROCESSES.keys())
@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("steps", [1, 2, 3, 9, 64])
def test_every_schedule_descends_within_the_range_to_zero(process, name, steps):
    levels = schedule(name).levels(process, steps)
    table = NoiseTable.of(process)
    assert levels.dtype == F64 and float(levels[-1]) == 0.0
    assert bool((levels[1:] <= levels[:-1]).all())
    assert float(levels[:-1].min()) >= table.sigma_min * (1 - 1e-12) or name == "linear-quadratic"
    assert float(levels[0]) <= table.sigma_max * (1 + 1e-12)
    # ddim-uniform strides T // steps (more steps than asked when it does not divide T), beta
    # drops repeated timesteps: both as ComfyUI's; the others give exactly steps + 1
    assert len(levels) == steps + 1 or name in ("ddim-uniform", "beta")


def test_sigma_range_overrides_the_models():
    levels = schedule("karras").levels(VP(), 10, 0.05, 20.0)
    assert float(levels[0]) == pytest.approx(20.0) and float(levels[-2]) == pytest.approx(0.05)
    for low, high in ((5.0, 1.0), (1e300, 1e308), (1e-300, 1e-299), (0.0, 1.0), (1.0, math.inf)):
        with pytest.raises(diffplug.UserError, match="need 1e-08 <= --sigma-min < --sigma-max"):
            schedule("karras").levels(VP(), 10, low, high)


def test_a_scheduled_ddim_follows_the_probability_flow_ode():
    """DDIM between a schedule's levels is the same ODE solver: at many steps every schedule
    lands where 1000 default DDIM steps land (wrong times or abar would not)."""
    oracle = circle_mixture(variance=0.05)
    ddim = default_registry().load("scheduler", "ddim")
    seeds = range(64)
    reference = diffplug.sample(oracle, ddim(), steps=1000, seeds=seeds)
    for name in ("karras", "exponential", "kl-optimal", "beta"):
        sampler = ddim()
        sampler.schedule = schedule(name)
        x = diffplug.sample(oracle, sampler, steps=400, seeds=seeds)
        err = float((x - reference).flatten(1).norm(dim=1).mean())
        assert err < 0.02, (name, err)
        coarse = ddim()
        coarse.schedule = schedule(name)
        far = float((diffplug.sample(oracle, coarse, steps=4, seeds=seeds) - reference).norm())
        assert far > 10 * err  # the check can tell a coarse run from a converged one


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
@pytest.mark.parametrize("name", SCHEDULES)
def test_run_samples_every_vp_sampler_under_every_schedule(tmp_path, sampler, name):
    out = tmp_path / "s.safetensors"
    result = run_cli("run", "--sampler", sampler, "--schedule", name, "--steps", "8",
                     "--num-samples", "4", "-q", "-o", str(out))  # fmt: skip
    assert result.code == 0, result.err
    x = load_tensors(out)["samples"]
    assert x.shape == (4, 1, 8, 8) and bool(torch.isfinite(x).all())
    recipe = read_recipe(out)
    assert recipe["schedule"]["name"] == name and recipe["schedule"]["plugin"] == "diffplug"
    assert len(recipe["timesteps"]) == recipe["evaluations"]


def test_a_schedule_on_a_bridged_model_and_its_replay(tmp_path):
    first = tmp_path / "a.png"
    result = run_cli("run", "--sampler", "ddim", "--model", "adm-digits", "--schedule", "karras",
                     "--rho", "5", "--steps", "6", "--num-samples", "4", "-q", "-o", str(first))  # fmt: skip
    assert result.code == 0, result.err
    recipe = read_recipe(first)
    assert recipe["schedule"]["options"] == {"rho": 5.0} and "bridged" in recipe
    again = tmp_path / "b.png"
    assert run_cli("run", "--recipe", str(first), "-q", "-o", str(again)).code == 0
    from PIL import Image

    with Image.open(first) as a, Image.open(again) as b:
        assert a.tobytes() == b.tobytes()


def test_schedules_are_refused_where_they_cannot_apply(tmp_path):
    out = str(tmp_path / "x.png")
    assert_clean_error(run_cli("run", "--sampler", "diffusers", "--schedule", "karras", "-o", out),
                       "sampler 'diffusers' chooses its own steps", "drop --schedule")  # fmt: skip
    assert_clean_error(run_cli("run", "--sampler", "ddim", "--sigma-max", "9", "-o", out),
                       "--sigma-max set a schedule's range: add --schedule")  # fmt: skip
    assert_clean_error(run_cli("run", "--sampler", "ddim", "--schedule", "nope", "-o", out),
                       "unknown schedule 'nope'")  # fmt: skip
    assert_clean_error(run_cli("run", "--sampler", "ddim", "--schedule", "karras", "--rho", "-1",
                               "-o", out), "--rho must be > 0")  # fmt: skip
    assert_clean_error(run_cli("run", "--sampler", "ddim", "--schedule", "karras", "--sigma-min",
                               "3", "--sigma-max", "2", "-o", out), "--sigma-min < --sigma-max")  # fmt: skip
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(diffplug.IncompatibleError, match="drop --schedule"):
        diffplug.load(sampler="diffusers", model="ddpm-digits", schedule="karras")


def test_karras_and_math_agree_on_a_hand_computed_value():
    """Karras et al. eq. 5 at the midpoint, by hand: ((a + b)/2)^rho with a, b the
    rho-th roots of the ends."""
    levels = schedule("karras").levels(VP(), 3, 0.002, 80.0)
    mid = ((80.0 ** (1 / 7) + 0.002 ** (1 / 7)) / 2) ** 7
    assert float(levels[1]) == pytest.approx(mid, rel=1e-12)
    assert math.isclose(float(levels[0]), 80.0) and float(levels[-1]) == 0.0
