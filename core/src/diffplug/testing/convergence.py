"""``check_sampler``: is a sampler correct, not only well-formed?

On the exact Gaussian-mixture oracle the denoiser is E[x0 | x_t] itself, so the
probability-flow ODE has an exact solution that no sampler computes: this module integrates
it independently (classical RK4 in float64, in lambda = -log s where ``dx/dlambda = D - x``
for ``x = x0 + s*eps``, ``s = sigma/alpha``), from each run's own start to its last noise
level, then takes the same final denoising step every sampler takes into s = 0. A
deterministic sampler must converge to it at its declared order (within 0.3); a stochastic
one must draw the mixture's exact mean and covariance within sampling error at many steps.
A sign error, or a corrector that drops a slope, fails here while passing every structural
check.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from diffplug.components import Scheduler
from diffplug.oracle import GaussianMixtureDenoiser, circle_mixture
from diffplug.plan import Plan
from diffplug.sampling import sample
from diffplug.testing.contracts import check_scheduler
from diffplug.testing.mixture import assert_matches_mixture, mixture_for

F64 = torch.float64
#: RK4 steps of the reference per unit of lambda (error ~1e-10 at the oracle's scales)
REFERENCE_DENSITY = 80


@dataclass
class SamplerReport:
    """What ``check_sampler`` measured."""

    stochastic: bool
    steps: tuple[int, ...] = ()
    errors: list[float] = field(default_factory=list)
    measured_order: float | None = None

    def __str__(self) -> str:
        if self.stochastic:
            return "stochastic: matches the mixture's mean and covariance"
        pairs = ", ".join(f"{n}: {e:.3g}" for n, e in zip(self.steps, self.errors, strict=True))
        return f"error against the exact ODE by steps ({pairs}); order {self.measured_order:.2f}"


def check_sampler(
    scheduler: Scheduler,
    *,
    order: float | None = None,
    steps: tuple[int, ...] = (20, 40, 80),
    samples: int = 64,
) -> SamplerReport:
    """Check ``scheduler``'s structure and correctness on the exact mixture oracle.

    ``order`` (default the sampler's ``order`` attribute, if any) is the declared order of
    accuracy of a deterministic sampler: the error against the exact ODE solution must fall
    as ``steps**-order`` within 0.3 between the two finest step counts. A stochastic sampler
    (one whose plan draws noise) must reproduce the mixture's moments at 100 steps. Raises
    ``AssertionError`` saying what failed; returns the measurements.
    """
    oracle = mixture_for(scheduler)
    oracle = circle_mixture(variance=0.05, process=oracle.process.spec())
    check_scheduler(scheduler, oracle.process)
    probe = scheduler.plan(_planning_process(scheduler, oracle), steps[0])
    if any(probe.noisy(i) for i in range(len(probe))):
        x = sample(oracle, scheduler, steps=100, seeds=range(2048), dtype=F64, batch_size=2048)
        assert_matches_mixture(x, oracle, keys=("mean", "covariance"))
        return SamplerReport(stochastic=True)
    declared = order if order is not None else getattr(scheduler, "order", None)
    seeds = range(samples)
    errors = []
    for n in steps:
        x = sample(oracle, scheduler, steps=n, seeds=seeds, dtype=F64)
        errors.append(float((x - exact_solution(oracle, scheduler, n, seeds)).flatten(1)
                            .norm(dim=1).mean()))  # fmt: skip
    assert all(math.isfinite(e) for e in errors), f"non-finite samples: errors {errors}"
    assert errors[-1] < 0.05, (
        f"does not converge to the probability-flow ODE's solution: mean error {errors[-1]:.3g} "
        f"at {steps[-1]} steps (errors by steps {dict(zip(steps, errors, strict=True))})"
    )
    # the order from the two finest runs: coarse runs are not yet asymptotic (Heun on
    # karras: 2.6 from 10 to 20 steps, 2.3 from 20 to 40)
    measured = math.log(errors[-2] / errors[-1]) / math.log(steps[-1] / steps[-2])
    report = SamplerReport(False, tuple(steps), errors, measured)
    if declared is not None:
        assert abs(measured - declared) <= 0.3, (
            f"declared order {declared} but the error falls at order {measured:.2f} ({report})"
        )
    return report


def _planning_process(scheduler: Scheduler, oracle: GaussianMixtureDenoiser):  # noqa: ANN202
    from diffplug.bridge import planning_process

    return planning_process(scheduler, oracle.process)


def exact_solution(
    oracle: GaussianMixtureDenoiser, scheduler: Scheduler, steps: int, seeds: range
) -> torch.Tensor:
    """Where the exact probability-flow ODE takes the sampler's own starting point: from the
    plan's first noise level to its last, then the final denoising step into s = 0."""
    process = _planning_process(scheduler, oracle)
    plan = scheduler.plan(process, steps)
    first, last = _level(plan, 0), _level(plan, len(plan) - 1)
    # the sampler's x_T (its own per-sample noise), in x0 + s*eps form
    from diffplug.noise import NoiseSource

    z = NoiseSource(list(seeds), oracle.sample_shape, steps=0, dtype=F64).initial()
    x = (z * plan.init_scale / plan.alpha[0]).flatten(1).to(F64)
    lam0, lam1 = -math.log(first), -math.log(last)
    n = max(16, math.ceil(REFERENCE_DENSITY * (lam1 - lam0)))
    h = (lam1 - lam0) / n

    def slope(x: torch.Tensor, lam: float) -> torch.Tensor:
        s = torch.full((x.shape[0],), math.exp(-lam), dtype=F64)
        return oracle.posterior_mean(x, torch.ones_like(s), s) - x

    lam = lam0
    for _ in range(n):
        k1 = slope(x, lam)
        k2 = slope(x + h / 2 * k1, lam + h / 2)
        k3 = slope(x + h / 2 * k2, lam + h / 2)
        k4 = slope(x + h * k3, lam + h)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        lam += h
    s = torch.full((x.shape[0],), last, dtype=F64)
    return oracle.posterior_mean(x, torch.ones_like(s), s).reshape(-1, *oracle.sample_shape)


def _level(plan: Plan, i: int) -> float:
    """The noise level s = sigma/alpha of plan entry i (in the plan's own parametrisation)."""
    return plan.sigma[i] / plan.alpha[i]


__all__ = ["SamplerReport", "check_sampler", "exact_solution"]
