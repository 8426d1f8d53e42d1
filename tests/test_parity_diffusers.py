"""diffplug's DDPM and DDIM against diffusers' DDPMScheduler and DDIMScheduler.

Compared: the schedule (betas and alphas_cumprod bit for bit; the timestep sequence of every
spacing both libraries support, for every step count), single steps (every step of a run, fed
identical x_t, model output and noise) and whole trajectories (identical initial and per-step
noise through ``diffplug.sampling.sample``'s ``noise`` hook), for eps, x0 and v prediction,
the linear, scaled_linear and squaredcos_cap_v2 schedules, DDIM eta in {0, 0.5, 1} and DDPM
fixed_small / fixed_large, at 10 and 50 steps and a full 1000-step DDPM run.

Precision, three levels, each asserted where it holds:

* float64 -- both libraries on float64 tensors, diffusers' alphas_cumprod promoted to float64
  (the same float32 table, exact arithmetic): they agree to <= 1.1e-12 (asserted 1e-10). This
  is what pins every coefficient: any formula difference shows up many orders above it.
* float32 -- diffplug as users run it against diffusers' step on the same float32 tensors with
  its schedule arithmetic in float64 (the promoted table again): max |diff| <= 1e-5 (measured
  <= 2.5e-6), except where the eps -> x0 conversion amplifies float32 rounding, see
  ``float32_tolerance``.
* stock float32 diffusers (float32 schedule arithmetic as well): <= 1e-5 for the linear and
  scaled_linear schedules at 10/50 steps (measured <= 5.5e-6). Elsewhere stock diffusers itself
  is off from exact arithmetic by more than 1e-5: it forms beta_t = 1 - abar_t/abar_prev in
  float32, which loses ~3 digits where betas are tiny (cosine near t = 0); measured
  |stock - exact| = 3.4e-4 for a 1000-step cosine DDPM, 1.1e-5 for a 1000-step linear one,
  1.3e-5 for a 50-step linspace cosine one, while diffplug in float32 stays within 2.4e-6 of
  exact in all of these.

DDIM caveat: diffplug takes the previous timestep to be the next entry of the sequence;
diffusers' DDIMScheduler uses t - T//N. The two coincide for leading spacing and for trailing
spacing when T % N == 0, and only there are DDIM trajectories compared with diffusers. For
linspace (and trailing with T % N != 0, and quadratic) diffusers' DDIM steps between timesteps
that are not consecutive in its own sequence, so diffplug is checked against a float64
closed-form DDIM over the same sequence instead (``test_ddim_closed_form``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor

from diffplug.components import Denoiser, DenoiserConfig
from diffplug.oracle import GaussianMixtureDenoiser, circle_mixture
from diffplug.prediction import linear
from diffplug.sampling import fold, sample
from diffplug.testing.threads import torch_threads
from diffplug.vp import VP, VPConfig, spaced_timesteps
from diffplug_ddim.scheduler import DDIM
from diffplug_ddpm.scheduler import DDPM

T = 1000
#: (beta_start, beta_end); scaled_linear with Stable Diffusion's values. The cosine schedule
#: ignores them.
SCHEDULES = {
    "linear": (1e-4, 0.02),
    "scaled_linear": (0.00085, 0.012),
    "squaredcos_cap_v2": (1e-4, 0.02),
}
PREDICTION_TYPE = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
BATCH = 4
F32, F64 = torch.float32, torch.float64
#: float64 agreement: measured <= 1.1e-12 (cosine's alpha_999 = 5e-5 costs a few digits).
TOL64 = 1e-10
#: float32 agreement where the update is well conditioned.
TOL32 = 1e-5
#: float32 unit roundoff.
U32 = 2.0**-24


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


def process_spec(schedule: str) -> dict:
    beta_start, beta_end = SCHEDULES[schedule]
    return {
        "name": "vp",
        "num_train_timesteps": T,
        "beta_schedule": schedule,
        "beta_start": beta_start,
        "beta_end": beta_end,
        "rescale_zero_terminal_snr": False,
    }


@dataclass
class OracleAsConfig(DenoiserConfig):
    prediction: str = "eps"


class OracleAs(Denoiser):
    """The exact mixture denoiser re-expressed as an eps, x0 or v predictor.

    The conversion from the oracle's x0 happens in float64; the output has x's dtype, as a
    network's would.
    """

    Config = OracleAsConfig

    def __init__(self, oracle: GaussianMixtureDenoiser, prediction: str) -> None:
        c = oracle.config
        super().__init__(
            OracleAsConfig(
                channels=c.channels, size=c.size, prediction=prediction, process=c.process
            )
        )
        self.oracle = oracle

    def forward(self, x, t, cond=None):
        # VP timesteps are integers: look alpha, sigma up in float64 (what process.alpha_sigma
        # returns for integer t, without re-deriving its log-SNR table at every call).
        assert torch.equal(t, t.round())
        abar = self.process.alphas_cumprod.to(F64)[t.long().cpu()].to(x.device)
        alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
        x64 = x.to(F64)
        x0 = self.oracle.posterior_mean(x64.reshape(x.shape[0], -1), alpha, sigma).view(x.shape)
        alpha, sigma = alpha.view(-1, 1, 1, 1), sigma.view(-1, 1, 1, 1)
        eps = (x64 - alpha * x0) / sigma
        out = {"x0": x0, "eps": eps, "v": alpha * eps - sigma * x0}[self.prediction]
        return out.to(x.dtype)


_ORACLES: dict[str, GaussianMixtureDenoiser] = {}


def denoiser(schedule: str, prediction: str) -> OracleAs:
    if schedule not in _ORACLES:
        _ORACLES[schedule] = circle_mixture(process=process_spec(schedule))
    return OracleAs(_ORACLES[schedule], prediction)


def reference_scheduler(kind: str, schedule: str, prediction: str, spacing: str, **kw):
    """A diffusers scheduler with diffplug's settings (clip_sample=False, same T and betas)."""
    beta_start, beta_end = SCHEDULES[schedule]
    cls = DDPMScheduler if kind == "ddpm" else DDIMScheduler
    return cls(
        num_train_timesteps=T,
        beta_schedule=schedule,
        beta_start=beta_start,
        beta_end=beta_end,
        clip_sample=False,
        prediction_type=PREDICTION_TYPE[prediction],
        timestep_spacing=spacing,
        **kw,
    )


def exact_schedule(sched):
    """Promote diffusers' alphas_cumprod to float64: the same float32 values, exact arithmetic.

    On float32 tensors diffusers' 0-dim float64 coefficients then multiply float32 tensors into
    float32 results, which is how diffplug applies its float64 host coefficients.
    """
    sched.alphas_cumprod = sched.alphas_cumprod.to(F64)
    return sched


def float32_tolerance(prediction: str, abar: list[float], ts: list[int]) -> float:
    """1e-5, unless the eps -> x0 conversion amplifies float32 rounding far beyond it.

    With eps prediction a step holds sqrt(abar_prev) * x0_hat, x0_hat = (x - sigma*eps)/alpha,
    so a float32 rounding of x or eps (|x| < 4 here) moves it by up to ~4*K*2^-24 with
    K = max sqrt(abar_prev/abar_t), however the arithmetic is ordered; diffplug's fused
    x*fx + eps*fp and diffusers' (x - sigma*eps)/alpha round differently, and the two
    libraries' errors add. K < 3 for linear and scaled_linear (so 16*K*2^-24 < 3e-6 and the
    tolerance is 1e-5), but the cosine schedule's abar_999 = 2.4e-9 gives K ~ 3.2e3 from
    t = 999 (tolerance 3e-3; measured up to 3.0e-4 on single steps, 1.6e-4 on trajectories).
    The float64 comparisons pin the coefficients regardless.
    """
    if prediction != "eps":
        return TOL32
    prev = [abar[t] for t in ts[1:]] + [1.0]
    k = max(math.sqrt(p / abar[t]) for t, p in zip(ts, prev, strict=True))
    return max(TOL32, 16 * k * U32)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    return (a.to(F64) - b.to(F64)).abs().max().item()


def t_batch(t, dtype: torch.dtype) -> torch.Tensor:
    return torch.full((BATCH,), float(t), dtype=dtype)


class ReplayNoise:
    """A ``sample(noise=...)`` factory replaying given x_T and per-step noise, in order."""

    def __init__(self, initial: torch.Tensor, steps: torch.Tensor) -> None:
        self._initial, self._steps = initial, steps
        self.drawn = 0
        self.noisy_steps = None

    def __call__(self, seeds, shape, noisy_steps):
        assert (len(seeds), *shape) == tuple(self._initial.shape)
        self.noisy_steps = noisy_steps
        return self

    def initial(self) -> torch.Tensor:
        return self._initial

    def next(self) -> torch.Tensor:
        z = self._steps[self.drawn]
        self.drawn += 1
        return z


class GeneratorNoise:
    """diffusers' DDPM draw order: x_T, then one draw per step with t > 0, all from one generator.

    A diffusers pipeline draws x_T = randn_tensor(shape, generator=g) and DDPMScheduler.step
    draws randn_tensor(model_output.shape, generator=g) at every t > 0; this factory makes the
    same calls on its own generator seeded alike, so the streams are identical as long as
    diffplug draws exactly at the steps where diffusers does.
    """

    def __init__(self, seed: int, dtype: torch.dtype) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.dtype = dtype
        self.drawn = 0
        self.noisy_steps = None

    def __call__(self, seeds, shape, noisy_steps):
        self.shape = (len(seeds), *shape)
        self.noisy_steps = noisy_steps
        return self

    def initial(self) -> torch.Tensor:
        return torch.randn(self.shape, generator=self.generator, dtype=self.dtype)

    def next(self) -> torch.Tensor:
        self.drawn += 1
        return torch.randn(self.shape, generator=self.generator, dtype=self.dtype)


def diffusers_ddpm(sched, den, steps: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    sched.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    x = randn_tensor((BATCH, *den.sample_shape), generator=generator, dtype=dtype)
    for t in sched.timesteps:
        out = den(x, t_batch(t, dtype))
        x = sched.step(out, t, x, generator=generator).prev_sample
        assert x.dtype == dtype
    return x


def diffusers_ddim(sched, den, steps: int, eta: float, x, zs) -> torch.Tensor:
    sched.set_timesteps(steps)
    for i, t in enumerate(sched.timesteps):
        out = den(x, t_batch(t, x.dtype))
        x = sched.step(out, t, x, eta=eta, variance_noise=zs[i]).prev_sample
        assert x.dtype == zs.dtype
    return x


def ddim_noise(steps: int, shape, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x_T and one noise tensor per step (diffusers' variance_noise; diffplug replays them)."""
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn((BATCH, *shape), generator=g)
    return x_T, torch.randn((steps, BATCH, *shape), generator=g)


# --------------------------------------------------------------------------- the schedule


@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("num_train_timesteps", [1000, 50])
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_betas_and_alphas_cumprod_are_bitwise_diffusers(schedule, num_train_timesteps, rescale):
    beta_start, beta_end = SCHEDULES[schedule]
    vp = VP(
        VPConfig(
            num_train_timesteps=num_train_timesteps,
            beta_schedule=schedule,
            beta_start=beta_start,
            beta_end=beta_end,
            rescale_zero_terminal_snr=rescale,
        )
    )
    for cls in (DDPMScheduler, DDIMScheduler):
        ref = cls(
            num_train_timesteps=num_train_timesteps,
            beta_schedule=schedule,
            beta_start=beta_start,
            beta_end=beta_end,
            rescale_betas_zero_snr=rescale,
        )
        assert vp.betas.dtype == vp.alphas_cumprod.dtype == F32
        assert torch.equal(vp.betas, ref.betas)
        assert torch.equal(vp.alphas_cumprod, ref.alphas_cumprod)
    if rescale:
        assert vp.alphas_cumprod[-1] == 0


@pytest.mark.parametrize("num_train_timesteps", [1000, 50])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_timesteps_are_diffusers_for_every_step_count(spacing, num_train_timesteps):
    ref = DDPMScheduler(num_train_timesteps=num_train_timesteps, timestep_spacing=spacing)
    for steps in range(1, num_train_timesteps + 1):
        ref.set_timesteps(steps)
        expected = ref.timesteps.tolist()
        # diffusers' trailing np.arange(T, 0, -T/N) overshoots by one entry for some N (e.g.
        # 61 of 1000); that entry is always -1, not a timestep, and diffplug does not take it.
        assert set(expected[steps:]) <= {-1}, (steps, expected[steps:])
        assert spaced_timesteps(num_train_timesteps, steps, spacing) == expected[:steps], steps


@pytest.mark.parametrize("steps", [1, 2, 7, 10, 27, 31, 48, 50, 61, 250, 333, 999])
@pytest.mark.parametrize(
    "spacing, steps_offset", [("leading", 0), ("leading", 1), ("trailing", 0), ("linspace", 0)]
)
def test_plans_use_diffusers_timesteps(spacing, steps_offset, steps):
    process = VP(VPConfig())
    for ours, cls in [
        (DDPM.from_options(spacing=spacing, steps_offset=steps_offset), DDPMScheduler),
        (DDIM.from_options(spacing=spacing, steps_offset=steps_offset), DDIMScheduler),
    ]:
        ref = cls(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=steps_offset)
        ref.set_timesteps(steps)
        plan = ours.plan(process, steps)
        assert plan.t.dtype == F64
        assert plan.t.tolist() == [float(t) for t in ref.timesteps.tolist()[:steps]]
        assert plan.info["timesteps"] == ref.timesteps.tolist()[:steps]


# ------------------------------------------------------------------------------ one step
# Every step of a run, fed the same x_t = alpha*x0 + sigma*eps (x0 drawn from the mixture),
# the oracle's prediction at x_t and the same noise. diffplug's step is checked both as the
# loop's fused update (fold: x*fx + pred*fp + d*z) and as the unfused one (plan.update on
# x0_hat, eps_hat) the loop uses when transforms or callbacks are active.


def diffplug_step(plan, tables, prediction, i, x, pred, z):
    fused = x * tables.fx[i]
    fused.add_(pred, alpha=tables.fp[i][0])
    lin = linear(prediction, plan.alpha[i], plan.sigma[i])
    x0 = x * lin.x0_x + pred * lin.x0_p[0]
    eps = x * lin.eps_x + pred * lin.eps_p[0]
    if plan.noisy(i):
        fused.add_(z, alpha=plan.d[i])
        return fused, plan.update(i, x, x0, eps, z)
    return fused, plan.update(i, x, x0, eps, None)


def consistent_input(den, t, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x0 = den.oracle.sample_data(BATCH, g)
    eps = torch.randn(x0.shape, generator=g, dtype=F64)
    alpha, sigma = den.process.alpha_sigma(torch.tensor(float(t)))
    x = (alpha * x0 + sigma * eps).to(dtype)
    return x, den(x, t_batch(t, dtype))


def check_single_steps(kind, ours, ref, schedule, prediction, steps, **step_kw):
    den = denoiser(schedule, prediction)
    abar = ref.alphas_cumprod.to(F64).tolist()
    plan = ours.plan(den.process, steps)
    tables = fold(plan, prediction)
    ts = plan.info["timesteps"]
    tol32 = float32_tolerance(prediction, abar, ts)
    worst = {F64: 0.0, F32: 0.0}
    for dtype, sched in [(F64, exact_schedule(ref)), (F32, ref)]:
        sched.set_timesteps(steps)
        assert sched.timesteps.tolist() == ts
        for i, t in enumerate(ts):
            x, pred = consistent_input(den, t, dtype, seed=i)
            if kind == "ddpm":
                # diffusers draws randn_tensor(shape, generator) iff t > 0; diffplug's z comes
                # from an identically seeded generator and is used iff its d != 0.
                expected = sched.step(
                    pred, t, x, generator=torch.Generator().manual_seed(1000 + i)
                ).prev_sample
                z = torch.randn(
                    x.shape, generator=torch.Generator().manual_seed(1000 + i), dtype=dtype
                )
                assert plan.noisy(i) == (t > 0)
            else:
                z = torch.randn(
                    x.shape, generator=torch.Generator().manual_seed(1000 + i), dtype=dtype
                )
                expected = sched.step(pred, t, x, variance_noise=z, **step_kw).prev_sample
                assert plan.noisy(i) == (step_kw["eta"] > 0 and i + 1 < len(ts))
            fused, unfused = diffplug_step(plan, tables, prediction, i, x, pred, z)
            assert fused.dtype == unfused.dtype == expected.dtype == dtype
            worst[dtype] = max(worst[dtype], max_diff(fused, expected), max_diff(unfused, expected))
    assert worst[F64] <= TOL64, worst
    assert worst[F32] <= tol32, (worst, tol32)


@pytest.mark.parametrize("steps", [10, 50])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("prediction", list(PREDICTION_TYPE))
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_ddim_single_steps(schedule, prediction, eta, spacing, steps):
    ours = DDIM.from_options(eta=eta, spacing=spacing)
    ref = reference_scheduler("ddim", schedule, prediction, spacing)
    check_single_steps("ddim", ours, ref, schedule, prediction, steps, eta=eta)


@pytest.mark.parametrize("steps", [10, 50])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("prediction", list(PREDICTION_TYPE))
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_ddpm_single_steps(schedule, prediction, variance, spacing, steps):
    ours = DDPM.from_options(variance=variance, spacing=spacing)
    ref = reference_scheduler("ddpm", schedule, prediction, spacing, variance_type=variance)
    check_single_steps("ddpm", ours, ref, schedule, prediction, steps)


# ---------------------------------------------------------------------------- trajectories


def run_ddim_trajectories(schedule, prediction, eta, spacing, steps, steps_offset=0, stock=True):
    den = denoiser(schedule, prediction)
    ours = DDIM.from_options(eta=eta, spacing=spacing, steps_offset=steps_offset)

    def ref(exact: bool):
        s = reference_scheduler("ddim", schedule, prediction, spacing, steps_offset=steps_offset)
        return exact_schedule(s) if exact else s

    xT, zs = ddim_noise(steps, den.sample_shape)
    out = {}
    runs = [("64", F64, True), ("32", F32, True)] + ([("stock32", F32, False)] if stock else [])
    for name, dtype, exact in runs:
        noise = ReplayNoise(xT.to(dtype), zs.to(dtype))
        if name != "stock32":
            out["diffplug" + name] = sample(
                den, ours, steps=steps, seeds=range(BATCH), noise=noise, dtype=dtype
            )
            # eta > 0 draws at every step but the last (whose variance is 0); eta = 0 never.
            assert noise.noisy_steps == noise.drawn == (steps - 1 if eta > 0 else 0)
        out["stock32" if name == "stock32" else "diffusers" + name] = diffusers_ddim(
            ref(exact), den, steps, eta, xT.to(dtype), zs.to(dtype)
        )
    return den, out


def assert_trajectories_match(den, out, prediction, spacing, steps):
    """float64 against exact-schedule diffusers; float32 within the conversion's tolerance;
    and, where run, against stock float32 diffusers."""
    abar = den.process.alphas_cumprod.to(F64).tolist()
    ts = spaced_timesteps(T, steps, spacing)
    assert max_diff(out["diffplug64"], out["diffusers64"]) <= TOL64
    assert max_diff(out["diffplug32"], out["diffusers32"]) <= float32_tolerance(
        prediction, abar, ts
    )
    if "stock32" in out:
        assert max_diff(out["diffplug32"], out["stock32"]) <= TOL32


# Trajectories cover step counts x spacings pairwise (single steps cover the full product):
# trailing 10 has the largest jumps and, for cosine, starts at t = 999.
@pytest.mark.parametrize("spacing, steps", [("leading", 50), ("trailing", 10)])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("prediction", list(PREDICTION_TYPE))
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_ddim_trajectory_matches_diffusers(schedule, prediction, eta, spacing, steps):
    # stock float32 diffusers is compared where its own float32 arithmetic is accurate
    # (see the module docstring)
    stock = schedule != "squaredcos_cap_v2"
    den, out = run_ddim_trajectories(schedule, prediction, eta, spacing, steps, stock=stock)
    assert_trajectories_match(den, out, prediction, spacing, steps)


def run_ddpm_trajectories(schedule, prediction, variance, spacing, steps, stock=True):
    den = denoiser(schedule, prediction)
    ours = DDPM.from_options(variance=variance, spacing=spacing)
    out = {}
    runs = [("64", F64, True), ("32", F32, True)] + ([("stock32", F32, False)] if stock else [])
    for name, dtype, exact in runs:
        ref = reference_scheduler("ddpm", schedule, prediction, spacing, variance_type=variance)
        out["stock32" if name == "stock32" else "diffusers" + name] = diffusers_ddpm(
            exact_schedule(ref) if exact else ref, den, steps, seed=123, dtype=dtype
        )
        if name != "stock32":
            noise = GeneratorNoise(123, dtype)
            out["diffplug" + name] = sample(
                den, ours, steps=steps, seeds=range(BATCH), noise=noise, dtype=dtype
            )
            ts = spaced_timesteps(T, steps, spacing)
            assert noise.noisy_steps == noise.drawn == sum(t > 0 for t in ts)
    return den, out


@pytest.mark.parametrize("spacing, steps", [("leading", 10), ("trailing", 50), ("linspace", 10)])
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("prediction", list(PREDICTION_TYPE))
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_ddpm_trajectory_matches_diffusers(schedule, prediction, variance, spacing, steps):
    stock = schedule != "squaredcos_cap_v2"
    den, out = run_ddpm_trajectories(schedule, prediction, variance, spacing, steps, stock=stock)
    assert_trajectories_match(den, out, prediction, spacing, steps)


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ddim_with_steps_offset_matches_diffusers(prediction, eta):
    """Stable Diffusion's setting: scaled_linear, leading spacing, steps_offset=1."""
    _, out = run_ddim_trajectories("scaled_linear", prediction, eta, "leading", 50, steps_offset=1)
    assert max_diff(out["diffplug64"], out["diffusers64"]) <= TOL64
    assert max_diff(out["diffplug32"], out["diffusers32"]) <= TOL32
    assert max_diff(out["diffplug32"], out["stock32"]) <= TOL32


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("spacing, steps", [("trailing", 48), ("linspace", 27), ("linspace", 31)])
def test_ddpm_where_numpy_rounds_ties_matches_diffusers(spacing, steps, variance):
    # step counts whose diffusers timesteps depend on numpy's rounding of exact .5 ties
    # (see test_timesteps_are_diffusers_for_every_step_count)
    _, out = run_ddpm_trajectories("linear", "eps", variance, spacing, steps)
    assert max_diff(out["diffplug64"], out["diffusers64"]) <= TOL64
    assert max_diff(out["diffplug32"], out["diffusers32"]) <= TOL32
    assert max_diff(out["diffplug32"], out["stock32"]) <= TOL32


@pytest.mark.slow
@pytest.mark.parametrize(
    "schedule, prediction, variance",
    [
        ("linear", "eps", "fixed_small"),
        ("scaled_linear", "v", "fixed_large"),
        ("squaredcos_cap_v2", "eps", "fixed_large"),
    ],
)
def test_full_1000_step_ddpm_matches_diffusers(schedule, prediction, variance):
    # 999 noisy steps drawn in diffusers' order; stock float32 diffusers is not compared
    # here: its own float32 schedule arithmetic drifts 1e-5 (linear) to 3.4e-4 (cosine) from
    # exact over 1000 steps (see the module docstring).
    den, out = run_ddpm_trajectories(schedule, prediction, variance, "leading", T, stock=False)
    abar = den.process.alphas_cumprod.to(F64).tolist()
    assert max_diff(out["diffplug64"], out["diffusers64"]) <= TOL64
    tol = float32_tolerance(prediction, abar, list(range(T - 1, -1, -1)))
    assert max_diff(out["diffplug32"], out["diffusers32"]) <= tol


@pytest.mark.parametrize("prediction", list(PREDICTION_TYPE))
def test_unfused_loop_reports_diffusers_x0_and_x(prediction):
    """With a callback the loop runs unfused; each step's x0_hat and x match diffusers'."""
    schedule, eta, steps = "linear", 0.5, 10
    den = denoiser(schedule, prediction)
    xT, zs = ddim_noise(steps, den.sample_shape, seed=5)
    xT, zs = xT.to(F64), zs.to(F64)
    seen = []
    x = sample(
        den,
        DDIM.from_options(eta=eta, spacing="trailing"),
        steps=steps,
        seeds=range(BATCH),
        noise=ReplayNoise(xT, zs),
        dtype=F64,
        callback=lambda step: seen.append((step.t, step.x0.clone(), step.x.clone())),
    )
    ref = exact_schedule(reference_scheduler("ddim", schedule, prediction, "trailing"))
    ref.set_timesteps(steps)
    y = xT
    assert len(seen) == steps
    for i, t in enumerate(ref.timesteps):
        step = ref.step(den(y, t_batch(t, F64)), t, y, eta=eta, variance_noise=zs[i])
        y = step.prev_sample
        assert seen[i][0] == float(t)
        assert max_diff(seen[i][1], step.pred_original_sample) <= TOL64
        assert max_diff(seen[i][2], y) <= TOL64
    assert max_diff(x, y) <= TOL64


# -------------------------------------------------- DDIM where diffusers' DDIM steps differ


def to_x0_eps(prediction, out, x, at):
    alpha, sigma = at.sqrt(), (1 - at).sqrt()
    if prediction == "eps":
        return (x - sigma * out) / alpha, out
    if prediction == "x0":
        return out, (x - alpha * out) / sigma
    return alpha * x - sigma * out, alpha * out + sigma * x  # v


def ddim_closed_form(den, abar, timesteps, eta, x, zs):
    """DDIM (Song et al. 2021, eqs. 12 and 16) in float64 over any decreasing sequence,
    stepping from each timestep to the next one of the sequence (abar = 1 after the last)."""
    for i, t in enumerate(timesteps):
        at = abar[t]
        ap = abar[timesteps[i + 1]] if i + 1 < len(timesteps) else torch.tensor(1.0, dtype=F64)
        x0, eps = to_x0_eps(den.prediction, den(x, t_batch(t, F64)), x, at)
        std = eta * ((1 - ap) / (1 - at) * (1 - at / ap)).sqrt()
        x = ap.sqrt() * x0 + (1 - ap - std**2).sqrt() * eps + std * zs[i]
    return x


def independent_timesteps(spacing: str, steps: int) -> list[int]:
    """The sequence, not from diffplug: diffusers' for linspace/trailing, the DDIM paper's
    quadratic rule (int(linspace(0, sqrt(0.8 T), N)^2), de-duplicated) for quadratic."""
    if spacing == "quadratic":
        top = math.sqrt(0.8 * T)
        return sorted({int((i * top / (steps - 1)) ** 2) for i in range(steps)}, reverse=True)
    ref = DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing)
    ref.set_timesteps(steps)
    return ref.timesteps.tolist()[:steps]


@pytest.mark.parametrize(
    "spacing, steps",
    [("linspace", 10), ("linspace", 50), ("trailing", 48), ("quadratic", 10)],
)
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("prediction", list(PREDICTION_TYPE))
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_ddim_closed_form(schedule, prediction, eta, spacing, steps):
    # diffusers' DDIMScheduler would step from t to t - T//N here, which is not the next
    # timestep of these sequences (e.g. linspace 10: 999 -> 899 instead of 999 -> 888), so
    # the reference is the closed-form DDIM step between consecutive timesteps, in float64.
    den = denoiser(schedule, prediction)
    ts = independent_timesteps(spacing, steps)
    abar = den.process.alphas_cumprod.to(F64)
    plan = DDIM.from_options(eta=eta, spacing=spacing).plan(den.process, steps)
    assert plan.info["timesteps"] == ts
    xT, zs = ddim_noise(steps, den.sample_shape, seed=3)
    expected = ddim_closed_form(den, abar, ts, eta, xT.to(F64), zs.to(F64))
    tol32 = float32_tolerance(prediction, abar.tolist(), ts)
    for dtype, tol in [(F64, TOL64), (F32, tol32)]:
        noise = ReplayNoise(xT.to(dtype), zs.to(dtype))
        got = sample(
            den,
            DDIM.from_options(eta=eta, spacing=spacing),
            steps=steps,
            seeds=range(BATCH),
            noise=noise,
            dtype=dtype,
        )
        assert noise.drawn == (len(ts) - 1 if eta > 0 else 0)
        assert max_diff(got, expected) <= tol, dtype


# ---------------------------------------------------------------------- thresholding


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_dynamic_thresholding_under_ddim_matches_diffusers_clipped_model_output(eta):
    """``--threshold dynamic`` re-derives eps_hat from the thresholded x0_hat: diffusers'
    DDIM with thresholding=True and use_clipped_model_output=True (Imagen's semantics)."""
    from diffplug.transforms import DynamicConfig, DynamicThreshold

    steps, spacing = 20, "trailing"
    den = denoiser("linear", "x0")
    exact = den.forward
    den.forward = lambda x, t, cond=None: 2.5 * exact(x, t, cond)  # past [-1, 1]: it must act
    ours = DDIM.from_options(eta=eta, spacing=spacing)
    ref = exact_schedule(
        DDIMScheduler.from_config(
            reference_scheduler("ddim", "linear", "x0", spacing).config,
            thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1e9,
        )
    )  # fmt: skip
    xT, zs = ddim_noise(steps, den.sample_shape)
    got = sample(den, ours, steps=steps, seeds=range(BATCH), noise=ReplayNoise(xT.to(F64),
                 zs.to(F64)), dtype=F64, transforms=[DynamicThreshold(DynamicConfig(0.9))])  # fmt: skip
    ref.set_timesteps(steps)
    x = xT.to(F64)
    for i, t in enumerate(ref.timesteps):
        out = den(x, t_batch(t, F64))
        x = ref.step(out, t, x, eta=eta, variance_noise=zs[i].to(F64),
                     use_clipped_model_output=True).prev_sample  # fmt: skip
    assert max_diff(got, x) <= 1e-9
    plain = sample(den, ours, steps=steps, seeds=range(BATCH), dtype=F64,
                   noise=ReplayNoise(xT.to(F64), zs.to(F64)))  # fmt: skip
    assert max_diff(got, plain) > 1e-3  # the threshold did act
