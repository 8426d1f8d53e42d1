"""Samplers against exact answers: the Gaussian-mixture oracle makes the denoiser exact, so
what is left is the sampler's own error.

* The statistical check itself: exact draws from the mixture pass it, slightly wrong
  distributions and 10 coarse ancestral steps (a fixture DDPM step) fail it.
* DDIM with eta = 1 is DDPM with the fixed_small (posterior) variance, step for step: a
  test of two plugins together.

Each plugin's own convergence moved to its tests: DDIM's first order and its 1000-step
samples to plugins/ddim/tests/test_ddim_core_moved.py, DDPM's 1000-step samples to
plugins/ddpm/tests/test_ddpm_core_moved.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from fixture_vp_sampler import FixtureDDPM

from diffplug.oracle import GaussianMixtureDenoiser, circle_mixture
from diffplug.sampling import fold, sample
from diffplug.testing.mixture import assert_matches_mixture
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
N_SAMPLES = 4096
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


# ------------------------------------------------------------------- the check itself


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


def test_10_step_ddpm_is_detectably_wrong(mixture):
    """The check has power against a real sampler error: 10 ancestral steps (DDPM's, with the
    fixed_small variance) are too coarse (measured covariance |z| = 19), where 1000 are not
    (diffplug-ddpm's test_ddpm_core_moved.py)."""
    sampler = FixtureDDPM.from_options(variance="fixed_small")
    x = sample(mixture, sampler, steps=10, seeds=range(N_SAMPLES))
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
