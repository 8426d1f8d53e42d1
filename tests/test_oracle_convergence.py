"""DDPM and DDIM against exact answers: the Gaussian-mixture oracle makes the denoiser exact,
so what is left is the sampler's own error.

* DDIM (eta = 0) is a first-order solver of the probability-flow ODE: its distance to a
  1000-step run from the same x_T shrinks ~linearly with the step count.
* DDPM's 1000-step ancestral sampler draws from the data distribution: the samples' mean,
  covariance, mode weights and within-mode spread match the mixture's within sampling error.
* DDIM with eta = 1 is DDPM with the fixed_small (posterior) variance, step for step.
"""

from __future__ import annotations

import math

import pytest
import torch

from diffplug.oracle import GaussianMixtureDenoiser, circle_mixture
from diffplug.sampling import fold, sample
from diffplug.testing.mixture import (
    assert_matches_mixture,
    exact_draws,
    mean_distance,
    statistics,
)
from diffplug.testing.threads import torch_threads
from diffplug.vp import VP, VPConfig
from diffplug_ddim.scheduler import DDIM
from diffplug_ddpm.scheduler import DDPM

F64 = torch.float64
LINEAR = {
    "name": "vp",
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "rescale_zero_terminal_snr": False,
}
SCHEDULES = {
    "linear": (1e-4, 0.02),
    "scaled_linear": (0.00085, 0.012),
    "squaredcos_cap_v2": (1e-4, 0.02),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def mixture() -> GaussianMixtureDenoiser:
    """8 Gaussians (variance 0.02) on a circle in 4-D (1x2x2), linear-beta VP process."""
    return circle_mixture(process=LINEAR)


# ------------------------------------------------------------------- DDIM: first order


# Measured (1024 samples, float64, error against the 1000-step run from the same x_T):
#   steps      5      10     20     40     50     100
#   trailing   0.391  0.177  0.093  0.049  0.039  0.0196
#   leading    0.382  0.170  0.085  0.044  0.035  0.0171
#   linspace   0.496  0.190  0.090  0.045  0.036  0.0172
# so err(N)/err(2N) = 1.91/1.91/2.01 (trailing), 1.99/1.96/2.05 (leading),
# 2.11/2.01/2.07 (linspace) for N = 10/20/50, and N*err(N) stays within 1.7..2.0.
# (For comparison, the squaredcos_cap_v2 schedule gives 0.184/0.095/0.050/0.021/0.010 at
# 5/10/20/50/100 trailing steps.)
@pytest.mark.slow
@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
def test_ddim_error_shrinks_linearly_with_steps(mixture, spacing):
    seeds = range(1024)

    def run(steps: int) -> torch.Tensor:
        sampler = DDIM.from_options(eta=0.0, spacing=spacing)
        return sample(mixture, sampler, steps=steps, seeds=seeds, dtype=F64)

    reference = run(1000)
    counts = [5, 10, 20, 40, 50, 100]
    err = {n: mean_distance(run(n), reference) for n in counts}
    print(spacing, {n: round(e, 4) for n, e in err.items()})
    # errors fall strictly with the step count
    assert all(err[a] > err[b] for a, b in zip(counts, counts[1:], strict=False)), err
    # first order: doubling the steps halves the error
    for n in (10, 20, 50):
        assert 1.6 <= err[n] / err[2 * n] <= 2.6, (n, err)
    # and the first-order constant is what was measured (a sampler with a wrong coefficient
    # converges to a different endpoint and its error stalls, or starts far larger)
    for n in (10, 20, 40, 50, 100):
        assert 1.3 <= n * err[n] <= 2.6, (n, err)
    # the 1000-step reference itself is samples, not x_T or a collapsed point
    assert mean_distance(reference, torch.zeros_like(reference)) > 0.5


def test_ddim_eta0_is_deterministic_given_x_T(mixture):
    """eta = 0 draws no step noise: the same seeds give the same samples in any batching."""
    sampler = DDIM.from_options(eta=0.0, spacing="trailing")
    a = sample(mixture, sampler, steps=20, seeds=range(32), dtype=F64)
    b = sample(mixture, sampler, steps=20, seeds=range(32), batch_size=5, dtype=F64)
    assert torch.equal(a, b)
    c = sample(mixture, sampler, steps=20, seeds=range(32, 64), dtype=F64)
    assert mean_distance(a, c) > 0.5


# ---------------------------------------------------------- DDPM: the data distribution

N_SAMPLES = 4096


def spread_ratio(x: torch.Tensor, model: GaussianMixtureDenoiser) -> float:
    """Within-mode spread of x over the mixture's (from exact draws)."""
    exact = statistics(exact_draws(model), model)["spread"].mean()
    return (statistics(x, model)["spread"].mean() / exact).item()


def test_moment_check_accepts_exact_samples_and_rejects_near_misses(mixture):
    """The statistical check itself: exact draws pass, slightly wrong distributions fail."""
    g = torch.Generator().manual_seed(7)
    assert_matches_mixture(mixture.sample_data(N_SAMPLES, g), mixture)
    # within-mode variance 0.03 instead of 0.02 (a sampler adding too much noise)
    wider = GaussianMixtureDenoiser.from_mixture(mixture.means, torch.tensor(0.03))
    with pytest.raises(AssertionError, match="spread"):
        assert_matches_mixture(wider.sample_data(N_SAMPLES, g), mixture)
    # within-mode variance 0.015 instead of 0.02 (too little noise)
    narrower = GaussianMixtureDenoiser.from_mixture(mixture.means, torch.tensor(0.015))
    with pytest.raises(AssertionError, match="spread"):
        assert_matches_mixture(narrower.sample_data(N_SAMPLES, g), mixture)
    # mode weights 0.16/0.09 alternating instead of 1/8 each
    weights = torch.tensor([0.16, 0.09] * 4, dtype=F64)
    unbalanced = GaussianMixtureDenoiser.from_mixture(mixture.means, torch.tensor(0.02), weights)
    with pytest.raises(AssertionError, match="modes"):
        assert_matches_mixture(unbalanced.sample_data(N_SAMPLES, g), mixture)
    # radius 1.05 instead of 1: the covariance alone must catch it
    bigger = GaussianMixtureDenoiser.from_mixture(mixture.means * 1.05, torch.tensor(0.02))
    with pytest.raises(AssertionError, match="covariance"):
        assert_matches_mixture(bigger.sample_data(N_SAMPLES, g), mixture, keys=("covariance",))


# Measured max |z| over each group at 4096 samples (seeds 0..4095):
#   sampler             mean  covariance  modes  spread (ratio to exact)
#   DDPM fixed_small    0.66  1.32        1.44   5.04   (0.944)
#   DDPM fixed_large    0.67  1.16        1.54   0.53   (1.006)
#   DDIM eta=0          0.59  1.76        0.74   2.32   (0.974)
# DDPM's fixed_small variance (the posterior variance, also DDIM eta=1's: the same samples)
# ignores the uncertainty of x0_hat, which for modes this narrow (variance 0.02) leaves the
# samples ~5% under-dispersed within modes at T = 1000: a discretization effect, not noise
# (with 8192 samples: 4.9% at T = 1000, 0.7% for the same process discretised into
# T = 4000 steps); diffusers' DDPMScheduler does the same to 1e-13 (test_parity_diffusers).
# Mean, covariance and mode weights are unaffected; the spread is checked as a bound there.
@pytest.mark.slow
@pytest.mark.parametrize(
    "sampler, exact_spread",
    [
        (DDPM.from_options(variance="fixed_small"), False),
        (DDPM.from_options(variance="fixed_large"), True),
        (DDIM.from_options(eta=0.0), True),
    ],
    ids=["ddpm-fixed_small", "ddpm-fixed_large", "ddim-eta0"],
)
def test_1000_step_sampling_draws_the_mixture(mixture, sampler, exact_spread):
    x = sample(mixture, sampler, steps=1000, seeds=range(N_SAMPLES))
    assert x.shape == (N_SAMPLES, 1, 2, 2)
    if exact_spread:
        assert_matches_mixture(x, mixture)
    else:
        assert_matches_mixture(x, mixture, keys=("mean", "covariance", "modes"))
        # under-dispersed by 1..10% (measured 5.6%; standard error of the ratio 1.1%)
        assert 0.90 <= spread_ratio(x, mixture) <= 0.99


def test_10_step_ddpm_is_detectably_wrong(mixture):
    """The check has power against a real sampler error: 10 ancestral steps are too coarse
    (measured covariance |z| = 19), where 1000 are not."""
    x = sample(mixture, DDPM.from_options(variance="fixed_small"), steps=10, seeds=range(N_SAMPLES))
    with pytest.raises(AssertionError, match="covariance"):
        assert_matches_mixture(x, mixture, keys=("mean", "covariance", "modes"))


# ------------------------------------------------ DDIM with eta = 1 is DDPM (fixed_small)


def vp(schedule: str) -> VP:
    beta_start, beta_end = SCHEDULES[schedule]
    return VP(VPConfig(beta_schedule=schedule, beta_start=beta_start, beta_end=beta_end))


def close(a: float, b: float, rel: float = 1e-11, abs_: float = 1e-12) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=abs_)


@pytest.mark.parametrize("steps", [1, 10, 48, 50, 1000])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_ddim_eta1_plan_is_ddpm_fixed_small(schedule, spacing, steps):
    """Both updates are x_next = A*x_t + B*x0_hat + d*z once DDIM's eps_hat is written in
    terms of x0_hat (eps = (x - alpha*x0)/sigma): A, B and d must agree, in float64."""
    process = vp(schedule)
    ddim = DDIM.from_options(eta=1.0, spacing=spacing).plan(process, steps)
    ddpm = DDPM.from_options(variance="fixed_small", spacing=spacing).plan(process, steps)
    assert torch.equal(ddim.t, ddpm.t)
    assert ddim.alpha == ddpm.alpha and ddim.sigma == ddpm.sigma
    assert all(c == 0 for c in ddpm.c)
    last_t = int(ddpm.t[-1])
    for i in range(len(ddim)):
        alpha, sigma = ddim.alpha[i], ddim.sigma[i]
        a = ddim.a[i] + ddim.c[i] / sigma
        b = ddim.b[i] - ddim.c[i] * alpha / sigma
        assert close(a, ddpm.a[i]), (i, a, ddpm.a[i])
        assert close(b, ddpm.b[i]), (i, b, ddpm.b[i])
        if i + 1 < len(ddim):
            assert ddim.d[i] > 0
            assert close(ddim.d[i], ddpm.d[i]), (i, ddim.d[i], ddpm.d[i])
    # the last step lands on abar = 1: no noise, except that DDPM (as diffusers) floors its
    # variance at 1e-20 when the last timestep is not 0 (trailing: std 1e-10)
    assert ddim.d[-1] == 0
    assert ddpm.d[-1] == (0.0 if last_t == 0 else 1e-10)
    # the same holds after folding in any prediction conversion, as the loop applies it
    for prediction in ("eps", "x0", "v"):
        f_ddim, f_ddpm = fold(ddim, prediction), fold(ddpm, prediction)
        for i in range(len(ddim)):
            assert close(f_ddim.fx[i], f_ddpm.fx[i], abs_=1e-9), (prediction, i)
            assert close(f_ddim.fp[i][0], f_ddpm.fp[i][0], abs_=1e-9), (prediction, i)


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_ddim_eta1_differs_from_ddpm_fixed_large(schedule):
    """Negative control for the table comparison: fixed_large (variance beta_t) is not
    DDIM's eta = 1 variance."""
    process = vp(schedule)
    ddim = DDIM.from_options(eta=1.0).plan(process, 10)
    large = DDPM.from_options(variance="fixed_large").plan(process, 10)
    assert max(abs(x - y) for x, y in zip(ddim.d, large.d, strict=True)) > 1e-3


@pytest.mark.parametrize("spacing", ["leading", "linspace"])
def test_ddim_eta1_samples_are_ddpm_fixed_small_samples(mixture, spacing):
    # Both draw noise at every step but the last (which lands on t = 0 for these spacings),
    # so the default per-seed noise streams line up and the samples must coincide.
    seeds = range(64)
    a = sample(mixture, DDIM.from_options(eta=1.0, spacing=spacing), steps=25, seeds=seeds)
    b = sample(
        mixture, DDPM.from_options(variance="fixed_small", spacing=spacing), steps=25, seeds=seeds
    )
    assert (a - b).abs().max() <= 1e-5
    c = sample(
        mixture, DDPM.from_options(variance="fixed_large", spacing=spacing), steps=25, seeds=seeds
    )
    assert (a - c).abs().max() > 1e-2
