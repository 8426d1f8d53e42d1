"""DDPM's ancestral sampler against exact answers (moved here from core's
tests/test_oracle_convergence.py): the Gaussian-mixture oracle makes the denoiser exact, so
what is left is the sampler's own error. Its 1000-step run draws from the data
distribution: the samples' mean, covariance, mode weights and within-mode spread match the
mixture's within sampling error.

DDPM against DDIM with eta = 1 stays in core's tests (it needs both plugins), and the check's
power against 10 coarse ancestral steps is core's (a fixture sampler serves).
"""

from __future__ import annotations

import pytest
import torch

from diffplug import sample
from diffplug.testing import (
    GaussianMixtureDenoiser,
    assert_matches_mixture,
    circle_mixture,
    exact_draws,
    statistics,
    torch_threads,
)
from diffplug_ddpm.scheduler import DDPM

LINEAR = {
    "name": "vp",
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "rescale_zero_terminal_snr": False,
}
N_SAMPLES = 4096


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def mixture() -> GaussianMixtureDenoiser:
    """8 Gaussians (variance 0.02) on a circle in 4-D (1x2x2), linear-beta VP process."""
    return circle_mixture(process=LINEAR)


def spread_ratio(x: torch.Tensor, model: GaussianMixtureDenoiser) -> float:
    """Within-mode spread of x over the mixture's (from exact draws)."""
    exact = statistics(exact_draws(model), model)["spread"].mean()
    return (statistics(x, model)["spread"].mean() / exact).item()


# Measured max |z| over each group at 4096 samples (seeds 0..4095):
#   sampler             mean  covariance  modes  spread (ratio to exact)
#   DDPM fixed_small    0.66  1.32        1.44   5.04   (0.944)
#   DDPM fixed_large    0.67  1.16        1.54   0.53   (1.006)
# DDPM's fixed_small variance (the posterior variance, also DDIM eta=1's: the same samples)
# ignores the uncertainty of x0_hat, which for modes this narrow (variance 0.02) leaves the
# samples ~5% under-dispersed within modes at T = 1000: a discretization effect, not noise
# (with 8192 samples: 4.9% at T = 1000, 0.7% for the same process discretised into
# T = 4000 steps); diffusers' DDPMScheduler does the same to 1e-13 (test_parity_diffusers).
# Mean, covariance and mode weights are unaffected; the spread is checked as a bound there.
@pytest.mark.slow
@pytest.mark.parametrize(
    "variance, exact_spread",
    [("fixed_small", False), ("fixed_large", True)],
    ids=["ddpm-fixed_small", "ddpm-fixed_large"],
)
def test_1000_step_ddpm_draws_the_mixture(mixture, variance, exact_spread):
    sampler = DDPM.from_options(variance=variance)
    x = sample(mixture, sampler, steps=1000, seeds=range(N_SAMPLES))
    assert x.shape == (N_SAMPLES, 1, 2, 2)
    if exact_spread:
        assert_matches_mixture(x, mixture)
    else:
        assert_matches_mixture(x, mixture, keys=("mean", "covariance", "modes"))
        # under-dispersed by 1..10% (measured 5.6%; standard error of the ratio 1.1%)
        assert 0.90 <= spread_ratio(x, mixture) <= 0.99
