"""DDIM against exact answers (moved here from core's tests/test_oracle_convergence.py): the
Gaussian-mixture oracle makes the denoiser exact, so what is left is the sampler's own error.

* DDIM (eta = 0) is a first-order solver of the probability-flow ODE: its distance to a
  1000-step run from the same x_T shrinks ~linearly with the step count.
* Its 1000-step samples draw the mixture: mean, covariance, mode weights and within-mode
  spread match within sampling error.

DDIM with eta = 1 against DDPM stays in core's tests (it needs both plugins).
"""

from __future__ import annotations

import pytest
import torch

from diffplug import sample
from diffplug.testing import (
    GaussianMixtureDenoiser,
    assert_matches_mixture,
    circle_mixture,
    mean_distance,
    torch_threads,
)
from diffplug_ddim.scheduler import DDIM

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


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def mixture() -> GaussianMixtureDenoiser:
    """8 Gaussians (variance 0.02) on a circle in 4-D (1x2x2), linear-beta VP process."""
    return circle_mixture(process=LINEAR)


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


# Measured max |z| over each group at 4096 samples (seeds 0..4095), DDIM eta = 0:
#   mean 0.59, covariance 1.76, modes 0.74, spread 2.32 (ratio to exact 0.974)
# (DDPM's, for comparison, are in diffplug-ddpm's test_ddpm_core_moved.py.)
@pytest.mark.slow
def test_1000_step_ddim_draws_the_mixture(mixture):
    x = sample(mixture, DDIM.from_options(eta=0.0), steps=1000, seeds=range(N_SAMPLES))
    assert x.shape == (N_SAMPLES, 1, 2, 2)
    assert_matches_mixture(x, mixture)
