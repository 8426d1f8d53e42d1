"""diffplug-ksamplers against k-diffusion itself, the contracts, the oracle and the CLI.

The reference is k-diffusion's own ``k_diffusion/sampling.py`` (a dev dependency), loaded
from its installed file on its own: the package's ``__init__`` imports its training stack,
which the workspace does not install. Both sides get the same levels, the same starting x
and, for stochastic samplers, the same noise: the z's diffplug's loop drew (recorded by
replacing the loop's noise source), handed to k-diffusion's ``noise_sampler``.
"""

from __future__ import annotations

import inspect
import math

import kdiffusion
import pytest
import torch
from cliutil import run_cli
from safetensors.torch import load_file

import diffplug
import diffplug_ksamplers.plugin as plugin
from diffplug import NoiseTable
from diffplug.testing import (
    check_sampler,
    check_sampler_deterministic,
    check_scheduler,
    circle_mixture,
    fresh_registry,
)

F64 = torch.float64
NAMES = list(plugin.SAMPLERS)


def make(name: str, **options):
    cls = fresh_registry(plugin).load("scheduler", name)
    return cls.from_options(**options) if options else cls()


class Recorder:
    """The loop's noise, replaced: per-sample generators as core's, every draw kept."""

    def __init__(self):
        self.initial_noise = None
        self.steps = []

    def __call__(self, seeds, shape, noisy_steps):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.shape = tuple(shape)
        return self

    def _draw(self):
        return torch.stack(
            [torch.randn(self.shape, generator=g, dtype=F64) for g in self.generators]
        )

    def initial(self):
        self.initial_noise = self._draw()
        return self.initial_noise

    def next(self):
        z = self._draw()
        self.steps.append(z)
        return z


def k_denoiser(oracle, dtype):
    """The oracle as a k-diffusion denoiser D(x, sigma): x0_hat of x = x0 + sigma*eps, read
    from the model at the time with that level, on the VP-scaled input x/sqrt(1 + sigma^2)."""
    table = NoiseTable.of(oracle.process)

    def model(x, sigma):
        s = sigma.to(F64)
        t = table.time_of(s).to(dtype)
        scale = (1 / (1 + s**2).sqrt()).to(dtype).view(-1, 1, 1, 1)
        return oracle(x * scale, t)

    return model


# name, sampler options, k-diffusion function, its keyword arguments
CASES = [
    ("euler", {}, "sample_euler", {}),
    (
        "euler",
        {"s_churn": 4.0, "s_tmin": 0.05, "s_tmax": 50.0},
        "sample_euler",
        {"s_churn": 4.0, "s_tmin": 0.05, "s_tmax": 50.0},
    ),
    ("euler-ancestral", {}, "sample_euler_ancestral", {}),
    (
        "euler-ancestral",
        {"eta": 0.5, "s_noise": 1.1},
        "sample_euler_ancestral",
        {"eta": 0.5, "s_noise": 1.1},
    ),
    ("heun", {}, "sample_heun", {}),
    (
        "heun",
        {"s_churn": 3.0, "s_tmax": 10.0, "s_noise": 1.003},
        "sample_heun",
        {"s_churn": 3.0, "s_tmax": 10.0, "s_noise": 1.003},
    ),
    ("dpm2", {}, "sample_dpm_2", {}),
    ("dpm2", {"s_churn": 3.0, "s_tmax": 50.0}, "sample_dpm_2", {"s_churn": 3.0, "s_tmax": 50.0}),
    ("dpm2-ancestral", {}, "sample_dpm_2_ancestral", {}),
    ("dpm2-ancestral", {"eta": 0.0}, "sample_dpm_2_ancestral", {"eta": 0.0}),
    ("lms", {}, "sample_lms", {}),
    ("lms", {"order": 2}, "sample_lms", {"order": 2}),
    ("dpmpp-2s-ancestral", {}, "sample_dpmpp_2s_ancestral", {}),
    ("dpmpp-2s-ancestral", {"eta": 0.7}, "sample_dpmpp_2s_ancestral", {"eta": 0.7}),
    ("dpmpp-sde", {}, "sample_dpmpp_sde", {}),
    ("dpmpp-sde", {"eta": 0.0, "r": 0.3}, "sample_dpmpp_sde", {"eta": 0.0, "r": 0.3}),
    ("dpmpp-2m", {}, "sample_dpmpp_2m", {}),
    ("dpmpp-2m-sde", {}, "sample_dpmpp_2m_sde", {}),
    ("dpmpp-2m-sde", {"solver_type": "heun"}, "sample_dpmpp_2m_sde", {"solver_type": "heun"}),
    ("dpmpp-2m-sde", {"eta": 0.0}, "sample_dpmpp_2m_sde", {"eta": 0.0}),
    ("dpmpp-3m-sde", {}, "sample_dpmpp_3m_sde", {}),
    ("dpmpp-3m-sde", {"eta": 0.0, "s_noise": 0.9}, "sample_dpmpp_3m_sde", {"eta": 0.0}),
]
IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in o.items()) or 'default'}" for n, o, _, _ in CASES]


def parity(name, options, function, kwargs, dtype, steps=8, seeds=(0, 1, 2, 3, 4)):
    """Max |diffplug - k-diffusion| over the final samples, same levels, x_T and noise."""
    ref = kdiffusion.load_sampling()
    oracle = circle_mixture()
    sampler = make(name, **options)
    levels = sampler.plan(oracle.process, steps).levels
    record = Recorder()
    ours = diffplug.sample(oracle, sampler, steps=steps, seeds=list(seeds), dtype=dtype,
                           noise=record)  # fmt: skip

    sigmas = torch.tensor(levels, dtype=dtype)
    x = record.initial_noise.to(dtype) * math.sqrt(1 + levels[0] ** 2)
    queue = [z.to(dtype) for z in record.steps]

    def noise_sampler(sigma, sigma_next):  # k-diffusion asks only where diffplug drew
        return queue.pop(0) if queue else torch.zeros_like(x)

    call = dict(kwargs)
    if "noise_sampler" in inspect.signature(getattr(ref, function)).parameters:
        call["noise_sampler"] = noise_sampler
    churn = call.get("s_churn", 0.0)
    original = torch.randn_like
    if churn:  # Karras' churn draws randn_like(x) every step, used where gamma > 0
        n = len(levels) - 1
        lo, hi = call.get("s_tmin", 0.0), call.get("s_tmax", math.inf)
        flags = [churn > 0 and lo <= s <= hi for s in levels[:-1]]
        assert not flags[0], "diffplug draws step 0's churn into x_T: keep it off here"
        per_step = iter(queue.pop(0) if f else torch.zeros_like(x) for f in flags)
        assert n == len(flags)
        torch.randn_like = lambda like, **kw: next(per_step)
    try:
        theirs = getattr(ref, function)(k_denoiser(oracle, dtype), x, sigmas, disable=True,
                                        **call)  # fmt: skip
    finally:
        torch.randn_like = original
    assert not queue, f"{len(queue)} of diffplug's noise draws were not used by k-diffusion"
    return float((ours.to(F64) - theirs.to(F64)).abs().max())


@pytest.mark.parametrize(("name", "options", "function", "kwargs"), CASES, ids=IDS)
def test_parity_with_k_diffusion_float64(name, options, function, kwargs):
    assert parity(name, options, function, kwargs, F64) <= 1e-10


@pytest.mark.parametrize(("name", "options", "function", "kwargs"), CASES, ids=IDS)
def test_parity_with_k_diffusion_float32(name, options, function, kwargs):
    assert parity(name, options, function, kwargs, torch.float32) <= 1e-5


# -- contracts -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_scheduler_contract(name):
    check_scheduler(make(name))  # Heun's repeated levels are allowed: times never increase


def test_heun_repeats_levels_as_k_diffusion_does():
    levels = [10.0, 2.0, 0.5, 0.0]
    assert make("heun").evaluations(levels) == [10.0, 2.0, 2.0, 0.5, 0.5]


@pytest.mark.parametrize("name", NAMES)
def test_sampler_deterministic(name):
    check_sampler_deterministic(make(name))


def test_registered_with_their_facts():
    registry = fresh_registry(plugin)
    for name in NAMES:
        cls = registry.load("scheduler", name)
        assert issubclass(cls, diffplug.LevelSampler)
        assert cls.evaluations_per_step in (1, 2) and cls.order >= 1
    stochastic = {n for n in NAMES if fresh_registry(plugin).load("scheduler", n).stochastic}
    assert stochastic == {"euler-ancestral", "dpm2-ancestral", "dpmpp-2s-ancestral",
                          "dpmpp-sde", "dpmpp-2m-sde", "dpmpp-3m-sde"}  # fmt: skip


@pytest.mark.parametrize("name", NAMES)
def test_evaluation_count(name):
    sampler, levels = make(name), [50.0, 10.0, 3.0, 1.0, 0.2, 0.0]
    calls = sampler.evaluations(levels)
    extra = 0 if sampler.evaluations_per_step == 1 else len(levels) - 2  # Euler last step
    assert len(calls) == len(levels) - 1 + extra
    assert all(c > 0 for c in calls)


def test_euler_is_ddim_on_the_normal_schedule():
    """DDIM (eta = 0) is Euler in x/alpha = x0 + s*eps: the same steps to round-off."""
    oracle = circle_mixture()
    registry = diffplug.default_registry()
    ddim = registry.load("scheduler", "ddim")()
    euler = make("euler")
    euler.schedule = registry.load("schedule", "normal")()
    kw = {"steps": 20, "seeds": [0, 1, 2, 3], "dtype": F64}
    a, b = diffplug.sample(oracle, ddim, **kw), diffplug.sample(oracle, euler, **kw)
    assert float((a - b).abs().max()) <= 1e-14  # measured 9e-16


# -- convergence on the oracle ------------------------------------------------------------------
#: deterministic configurations (stochastic ones at eta = 0), and step counts in their
#: asymptotic range on the default karras schedule: LMS's lower-order start and DPM++ 2S's
#: large first steps need more steps before the order shows
ODE = [
    ("euler", {}, (20, 40, 80)),
    ("heun", {}, (20, 40, 80)),
    ("dpm2", {}, (20, 40, 80)),
    ("dpmpp-2m", {}, (20, 40, 80)),
    ("lms", {}, (160, 320)),
    ("dpm2-ancestral", {"eta": 0.0}, (20, 40, 80)),
    ("dpmpp-2s-ancestral", {"eta": 0.0}, (40, 80, 160)),
    ("dpmpp-sde", {"eta": 0.0}, (40, 80, 160)),
    ("dpmpp-2m-sde", {"eta": 0.0}, (20, 40, 80)),
    ("dpmpp-2m-sde", {"eta": 0.0, "solver_type": "heun"}, (20, 40, 80)),
    ("dpmpp-3m-sde", {"eta": 0.0}, (20, 40, 80)),
]


def measured_order(name, options, steps, reference=2000):
    """The slope of log(max error) against log(steps), first to last step count, the error
    taken against a ``reference``-step run of the same sampler (float64, the oracle)."""
    oracle = circle_mixture()
    seeds = list(range(8))

    def run(n):
        return diffplug.sample(oracle, make(name, **options), steps=n, seeds=seeds, dtype=F64)

    exact = run(reference)
    errors = [float((run(n) - exact).abs().max()) for n in steps]
    return math.log(errors[0] / errors[-1]) / math.log(steps[-1] / steps[0]), errors


#: check_sampler measures against the exact ODE solution to the last level followed by the
#: final denoising step. LMS's last step integrates its slope polynomial down to 0 instead (as
#: k-diffusion's does), which lands O(s_min^2) away from that target whatever the step count;
#: DPM++(3M)'s two lower-order starting steps make its error against the exact solution fall
#: at order ~1.8 from 80 to 320 steps (its 3.0 above is against its own 2000-step run).
CHECK_SAMPLER_EXCLUDED = {"lms", "dpmpp-3m-sde"}


@pytest.mark.slow
@pytest.mark.parametrize(("name", "options", "steps"),
                         [c for c in ODE if c[0] in CHECK_SAMPLER_EXCLUDED],
                         ids=[f"{n}-{o}" for n, o, _ in ODE if n in CHECK_SAMPLER_EXCLUDED])  # fmt: skip
def test_convergence_order(name, options, steps):
    """Against the sampler's own 2000-step run, for the two check_sampler cannot judge (it
    measures every other configuration's order against the exact ODE solution)."""
    order, errors = measured_order(name, options, steps)
    expected = make(name).order
    assert abs(order - expected) <= 0.3, (order, errors)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "options", "steps"),
                         [c for c in ODE if c[0] not in CHECK_SAMPLER_EXCLUDED],
                         ids=[f"{n}-{o}" for n, o, _ in ODE if n not in CHECK_SAMPLER_EXCLUDED])  # fmt: skip
def test_check_sampler_deterministic_configurations(name, options, steps):
    check_sampler(make(name, **options), steps=steps)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in NAMES if make(n).stochastic])
def test_check_sampler_stochastic_samplers_reproduce_the_mixture(name):
    assert check_sampler(make(name)).stochastic


# -- the CLI, seeding ------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["ddpm-digits", "adm-digits"])
def test_cli_runs_euler_on_karras(tmp_path, model):
    out = tmp_path / "x.safetensors"
    result = run_cli("run", "--sampler", "euler", "--schedule", "karras", "--model", model,
                     "--num-samples", "4", "--steps", "8", "--quiet", "-o", str(out))  # fmt: skip
    assert result.code == 0, result.err
    samples = load_file(out)["samples"]
    assert samples.shape[0] == 4 and torch.isfinite(samples).all() and samples.std() > 0.05


STOCHASTIC = [(n, {}) for n in NAMES if make(n).stochastic] + [
    ("euler", {"s_churn": 2.0}),
    ("heun", {"s_churn": 2.0}),
]


@pytest.mark.parametrize(("name", "options"), STOCHASTIC, ids=[n for n, _ in STOCHASTIC])
def test_sample_k_is_the_same_in_any_batch(name, options):
    oracle, seeds = circle_mixture(), [7, 3, 11, 5, 2]
    batch = diffplug.sample(oracle, make(name, **options), steps=6, seeds=seeds)
    assert torch.isfinite(batch).all()
    for k, seed in enumerate(seeds):
        alone = diffplug.sample(oracle, make(name, **options), steps=6, seeds=[seed])
        assert torch.equal(alone[0], batch[k])


def test_churn_at_the_first_step_starts_at_the_churned_level():
    sampler = make("euler", s_churn=1.0)
    plan = sampler.plan(circle_mixture().process, 4)
    s0 = plan.levels[0]
    assert plan.sigma[0] == pytest.approx(s0 * (1 + 0.25))  # gamma = min(1/4, sqrt(2) - 1)
    assert plan.init_scale == pytest.approx(math.sqrt(1 + plan.sigma[0] ** 2))
    assert plan.d == [1.0, 1.0, 1.0, 0.0]  # steps 1..3 churn, drawn after the step before


@pytest.mark.parametrize("name", ["dpmpp-2m", "heun"])
def test_the_bare_name_is_this_plugins_and_the_qualified_one_runs(tmp_path, name):
    """The guide's example registers its Heun as example-heun, so heun (like dpmpp-2m) is
    this plugin's."""
    out = tmp_path / "x.safetensors"
    fast = ("--model", "gmm-digits", "--steps", "5", "--num-samples", "2", "--quiet")
    bare = run_cli("run", "--sampler", name, *fast, "-o", str(out))
    assert bare.code == 0, bare.err
    from diffplug import read_recipe

    assert read_recipe(out)["sampler"]["plugin"] == "diffplug-ksamplers"
    ours = run_cli("run", "--sampler", f"diffplug-ksamplers:{name}", *fast, "-o", str(out),
                   "--overwrite")  # fmt: skip
    assert ours.code == 0, ours.err


@pytest.mark.parametrize("name", NAMES)
def test_progress_counts_steps_not_calls(name):
    """A Heun step is two calls; the bar counts the user's steps, ending with the run."""
    levels = [50.0, 10.0, 3.0, 1.0, 0.2, 0.0]
    sampler = make(name)
    plan = sampler.plan(circle_mixture().process, 5)
    assert plan.step_count() == 5
    ends = [plan.ends_step(i) for i in range(len(plan))]
    assert sum(ends) == 5 and ends[-1]
    if sampler.evaluations_per_step == 2:  # two calls for every step but the last (Euler's)
        of = sampler.steps_of(levels)
        assert of == [0, 0, 1, 1, 2, 2, 3, 3, 4]
