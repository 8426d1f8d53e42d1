"""The DDIM plugin's own tests: its plan against the closed-form DDIM update, its timesteps
against diffusers' DDIMScheduler, its registration and the diffplug.testing contracts, and
the refusal of options out of range.

The closed form (Song, Meng & Ermon 2021, eqs. 12 and 16), written here in float64 from the
process's alphas_cumprod table alone, stepping from each timestep of the sub-sequence to the
next one (abar' = 1 after the last):

    x' = sqrt(abar')*x0_hat + sqrt(1 - abar' - s^2)*eps_hat + s*z,
    s  = eta*sqrt((1 - abar')/(1 - abar_t))*sqrt(1 - abar_t/abar'),

i.e. the plan's tables (a, b, c, d) = (0, sqrt(abar'), sqrt(1 - abar' - s^2), s).
"""

from __future__ import annotations

import importlib.metadata
import math
import re

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

import diffplug_ddim.plugin as plugin
from diffplug import KINDS, SPACINGS, VP, OptionError, Process, UserError, VPConfig
from diffplug.testing import check_sampler_deterministic, check_scheduler, fresh_registry
from diffplug_ddim.scheduler import DDIM

F64 = torch.float64
ETAS = (0.0, 0.5, 1.0)
#: the processes the coefficients are checked on: DDPM's default, the cosine schedule (whose
#: abar_999 ~ 2e-9 is the worst-conditioned case) and a short scaled_linear one (T = 50).
PROCESSES = {
    "linear-1000": VPConfig(),
    "cosine-1000": VPConfig(beta_schedule="squaredcos_cap_v2"),
    "scaled_linear-50": VPConfig(
        num_train_timesteps=50, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
    ),
}


def ddim_sampler(**options) -> DDIM:
    """The sampler as the plugin registers it (not the class imported directly)."""
    return fresh_registry(plugin).load("scheduler", "ddim").from_options(**options)


def reference_timesteps(T: int, steps: int, spacing: str, offset: int = 0) -> list[int]:
    """The sub-sequence, written with numpy (diffusers' arithmetic for leading, trailing and
    linspace; the DDIM paper's quadratic rule), decreasing and de-duplicated."""
    if spacing == "leading":
        ts = np.arange(steps) * (T // steps) + offset
    elif spacing == "trailing":
        ts = (np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1)[:steps]
    elif spacing == "linspace":
        ts = np.linspace(0, T - 1, steps).round().astype(np.int64)
    elif spacing == "quadratic":
        ts = (np.linspace(0, np.sqrt(0.8 * T), steps) ** 2).astype(np.int64)
    else:
        raise AssertionError(spacing)
    return sorted({int(t) for t in ts}, reverse=True)


def closed_form(abar: list[float], ts: list[int], eta: float) -> list[tuple[float, ...]]:
    """(a, b, c, d) of each step, from the paper's formula in float64."""
    out = []
    for i, t in enumerate(ts):
        at = abar[t]
        ap = abar[ts[i + 1]] if i + 1 < len(ts) else 1.0
        s = eta * math.sqrt((1 - ap) / (1 - at)) * math.sqrt(1 - at / ap)
        out.append((0.0, math.sqrt(ap), math.sqrt(1 - ap - s * s), s))
    return out


def close(x: float, y: float) -> bool:
    return math.isclose(x, y, rel_tol=1e-10, abs_tol=1e-12)


# ------------------------------------------------------------------------- coefficients


@pytest.mark.parametrize("eta", ETAS)
@pytest.mark.parametrize(
    "spacing, offset", [*((s, 0) for s in SPACINGS), ("leading", 1)], ids=[*SPACINGS, "leading+1"]
)
@pytest.mark.parametrize("process_name", list(PROCESSES))
def test_plan_is_the_closed_form_ddim_update(process_name, spacing, offset, eta):
    process = VP(PROCESSES[process_name])
    T = process.num_timesteps
    abar = process.alphas_cumprod.to(F64).tolist()
    sampler = ddim_sampler(eta=eta, spacing=spacing, steps_offset=offset)
    for steps in (1, 2, 7, 10, 49 if offset else 50):  # leading+1 at 50 of T = 50 leaves 0..49
        ts = reference_timesteps(T, steps, spacing, offset)
        plan = sampler.plan(process, steps)
        assert plan.info["timesteps"] == ts, (steps, plan.info["timesteps"], ts)
        assert plan.t.dtype == F64 and plan.t.tolist() == [float(t) for t in ts]
        # where the denoiser is called: alpha = sqrt(abar_t), sigma = sqrt(1 - abar_t)
        assert all(close(x, math.sqrt(abar[t])) for x, t in zip(plan.alpha, ts))
        assert all(close(x, math.sqrt(1 - abar[t])) for x, t in zip(plan.sigma, ts))
        expected = closed_form(abar, ts, eta)
        for i, (a, b, c, d) in enumerate(expected):
            got = (plan.a[i], plan.b[i], plan.c[i], plan.d[i])
            assert close(got[0], a) and close(got[1], b) and close(got[3], d), (steps, i, got)
            # c = sqrt(1 - abar' - s^2) cancels catastrophically where s^2 ~ 1 - abar' (eta = 1
            # at t = 999 of the cosine schedule: c ~ 2e-9), so compare c^2 to a few ulp of 1
            assert got[2] >= 0 and math.isclose(got[2] ** 2, c * c, rel_tol=1e-10, abs_tol=1e-15)
        # the last step lands on x0_hat; eta = 0 never draws noise, eta > 0 at every other step
        assert (plan.b[-1], plan.c[-1], plan.d[-1]) == (1.0, 0.0, 0.0)
        assert [plan.noisy(i) for i in range(len(ts))] == [eta > 0] * (len(ts) - 1) + [False]


@pytest.mark.parametrize("eta", ETAS)
@pytest.mark.parametrize("spacing", SPACINGS)
def test_every_step_keeps_unit_variance_for_eta_in_0_1(spacing, eta):
    """abar' + (1 - abar' - s^2) + s^2 = 1: with x0_hat, eps_hat and z the true x0, eps and
    fresh noise, x' has the marginal of the next timestep. A clamped square root (s^2 larger
    than 1 - abar') would break it."""
    plan = ddim_sampler(eta=eta, spacing=spacing).plan(VP(PROCESSES["cosine-1000"]), 20)
    for b, c, d in zip(plan.b, plan.c, plan.d):
        assert math.isclose(b * b + c * c + d * d, 1.0, rel_tol=1e-12)


def test_eta_one_has_ddpm_posterior_variance_at_every_timestep():
    """The 1000-step DDIM with eta = 1 draws noise with Ho et al.'s posterior variance
    beta_t*(1 - abar_{t-1})/(1 - abar_t), with beta_t and abar from the betas table in float64.
    The plan works from the float32 alphas_cumprod table, whose rounding (relative 6e-8 on
    abar, so ~1e-4 on 1 - abar_0 = 1e-4) is all that separates the two: measured 2.4e-4."""
    process = VP()
    betas = process.betas.to(F64)
    abar = torch.cumprod(1 - betas, 0)
    plan = ddim_sampler(eta=1.0).plan(process, 1000)
    d = torch.tensor(plan.d, dtype=F64).flip(0)  # index by t: d[t], t = 0..999
    posterior = betas[1:] * (1 - abar[:-1]) / (1 - abar[1:])
    rel = ((d[1:] ** 2 - posterior) / posterior).abs().max().item()
    assert rel < 5e-4, rel
    assert d[0] == 0


# --------------------------------------------------------------------- diffusers' timesteps


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_timesteps_are_diffusers_ddim_for_every_step_count_of_a_short_process(spacing):
    """Every step count of a T = 100 process (plus Stable Diffusion's steps_offset = 1 for
    leading), against diffusers' DDIMScheduler with the same timestep_spacing."""
    T = 100
    process = VP(VPConfig(num_train_timesteps=T))
    for offset in (0, 1) if spacing == "leading" else (0,):
        ref = DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=offset)
        sampler = ddim_sampler(spacing=spacing, steps_offset=offset)
        for steps in range(1, T + 1):
            if offset and steps == T:  # leading + 1 would reach t = T: refused, see below
                continue
            ref.set_timesteps(steps)
            expected = ref.timesteps.tolist()
            # diffusers' trailing may append one -1 (not a timestep), which diffplug drops
            assert set(expected[steps:]) <= {-1}, (steps, expected)
            assert sampler.plan(process, steps).info["timesteps"] == expected[:steps], steps


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_timesteps_are_diffusers_ddim_on_a_cosine_schedule(spacing):
    steps_list = (3, 6, 11, 13, 17, 30, 64, 100, 128, 500, 1000)
    ref = DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing,
                        beta_schedule="squaredcos_cap_v2")  # fmt: skip
    process = VP(PROCESSES["cosine-1000"])
    for steps in steps_list:
        ref.set_timesteps(steps)
        plan = ddim_sampler(spacing=spacing).plan(process, steps)
        assert plan.info["timesteps"] == ref.timesteps.tolist()[:steps], steps
        # the same float32 table gives the same alpha at each timestep
        want = ref.alphas_cumprod[ref.timesteps[:steps]].to(F64).sqrt().tolist()
        assert plan.alpha == pytest.approx(want, rel=1e-12, abs=0)


# ------------------------------------------------------------------ registration, contracts


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_registers_ddim_through_its_entry_point_and_nothing_else():
    eps = [
        ep
        for ep in importlib.metadata.entry_points(group="diffplug")
        if ep.dist is not None and _normalize(ep.dist.name) == "diffplug-ddim"
    ]
    assert [ep.value for ep in eps] == ["diffplug_ddim.plugin"]
    assert eps[0].load() is plugin
    registry = fresh_registry(eps[0].load())
    assert list(registry.errors()) == []
    entry = registry.get("scheduler", "ddim")
    assert entry.target == "diffplug_ddim.scheduler:DDIM" and entry.summary
    assert registry.load("scheduler", "ddim") is DDIM
    core = fresh_registry()
    for kind in KINDS:
        added = set(registry.names(kind)) - set(core.names(kind))
        assert added == ({"ddim"} if kind == "scheduler" else set()), (kind, added)


@pytest.mark.parametrize("eta", ETAS)
@pytest.mark.parametrize("spacing", SPACINGS)
def test_honours_the_scheduler_contract(spacing, eta):
    for process in PROCESSES.values():
        check_scheduler(ddim_sampler(eta=eta, spacing=spacing), VP(process))


@pytest.mark.parametrize("eta", ETAS)
def test_samples_are_deterministic_per_seed(eta):
    check_sampler_deterministic(ddim_sampler(eta=eta, spacing="trailing"))


# ----------------------------------------------------------------------------- refusals


def test_negative_eta_is_refused_naming_the_option():
    with pytest.raises(OptionError, match="--eta must be >= 0"):
        ddim_sampler(eta=-0.1)


def test_eta_above_one_is_refused_naming_the_option():
    # above 1, s^2 > 1 - abar' at some steps and the update's variance is no longer 1
    with pytest.raises(OptionError, match="--eta must be <= 1"):
        ddim_sampler(eta=1.5)


def test_unknown_spacing_and_negative_offset_are_refused_naming_the_option():
    with pytest.raises(OptionError, match="--spacing must be one of leading, trailing"):
        ddim_sampler(spacing="cubic")
    with pytest.raises(OptionError, match="--steps-offset must be >= 0"):
        ddim_sampler(steps_offset=-1)
    # a config built by hand skips build_config's check; planning still refuses it
    sampler = DDIM(DDIM.Config(spacing="cubic"))
    with pytest.raises(UserError, match="unknown spacing 'cubic'"):
        sampler.plan(VP(), 10)


def test_steps_out_of_range_and_foreign_processes_are_refused():
    with pytest.raises(UserError, match="steps must be between 1 and 1000"):
        ddim_sampler().plan(VP(), 0)
    with pytest.raises(UserError, match="steps must be between 1 and 1000"):
        ddim_sampler().plan(VP(), 1001)
    # leading + offset past the last timestep (T = 100, 100 steps, offset 1 reaches t = 100)
    with pytest.raises(UserError, match="leaves the range 0..99"):
        ddim_sampler(steps_offset=1).plan(VP(VPConfig(num_train_timesteps=100)), 100)

    class Continuous(Process):
        name = "continuous"

        def alpha_sigma(self, t):
            return (1 - t).sqrt(), t.sqrt()

        @property
        def t_range(self):
            return 1e-3, 1.0

    sampler = ddim_sampler()
    assert "needs a discrete VP" in sampler.supports(Continuous())
    with pytest.raises(UserError, match="needs a discrete VP"):
        sampler.plan(Continuous(), 10)


@pytest.mark.parametrize("final_alpha, set_alpha_to_one", [("first", False), ("one", True)])
def test_every_step_equals_diffusers_ddim_with_its_final_alpha(final_alpha, set_alpha_to_one):
    """Stable Diffusion's scheduler config (scaled_linear, leading + 1, set_alpha_to_one
    False) ends at abar_0, not 1: ``--final-alpha first`` reproduces each step of it."""
    config = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    ref = DDIMScheduler(**config, steps_offset=1, set_alpha_to_one=set_alpha_to_one,
                        clip_sample=False)  # fmt: skip
    process = VP(VPConfig(**config))
    steps = 10
    ref.set_timesteps(steps)
    plan = ddim_sampler(steps_offset=1, final_alpha=final_alpha).plan(process, steps)
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(4, 8, generator=g, dtype=F64), torch.randn(4, 8, generator=g, dtype=F64)
    for k, t in enumerate(ref.timesteps.tolist()):
        want = ref.step(eps, t, x, eta=0.0).prev_sample
        x0_hat = (x - plan.sigma[k] * eps) / plan.alpha[k]
        got = plan.a[k] * x + plan.b[k] * x0_hat + plan.c[k] * eps
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    other = ddim_sampler(steps_offset=1, final_alpha="one" if final_alpha == "first" else "first")
    assert abs(other.plan(process, steps).b[-1] - plan.b[-1]) > 1e-4  # the tests can tell
