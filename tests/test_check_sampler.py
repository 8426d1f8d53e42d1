"""``diffplug.testing.check_sampler`` is proven by the bugs it catches: a Heun sampler written
from the docs passes it, and three bugs planted in it (a sign error in the predictor, one in
the corrector, a corrector that keeps only the second slope) each fail it, although all four
pass the structural checks."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import diffplug
from diffplug.level_sampler import LevelSampler
from diffplug.schedules import Karras
from diffplug.testing import check_sampler, check_scheduler
from diffplug.testing.convergence import exact_solution
from diffplug.testing.mixture import mixture_for


@dataclass
class _Heun:
    """Karras et al. (2022), Algorithm 1 without churn; its bug variants below."""

    levels: list[float]
    bug: str = ""
    slope: torch.Tensor | None = None
    start: torch.Tensor | None = None

    def update(self, j, x, x0, eps, z):
        step, corrector = divmod(j, 2)
        s, nxt = self.levels[step], self.levels[step + 1]
        if not corrector:
            d = (x0 - x) / s if self.bug == "predictor-sign" else (x - x0) / s
            if nxt == 0:
                return x + d * (nxt - s)  # the last step is Euler's
            self.slope, self.start = d, x
            return x + d * (nxt - s)
        d2 = (x - x0) / nxt
        assert self.slope is not None and self.start is not None
        if self.bug == "corrector-sign":
            return self.start + (self.slope - d2) / 2 * (nxt - s)
        if self.bug == "second-slope-only":
            return self.start + d2 * (nxt - s)
        return self.start + (self.slope + d2) / 2 * (nxt - s)


class Heun(LevelSampler):
    """Two evaluations per step, second order."""

    order = 2.0
    evaluations_per_step = 2
    bug = ""

    def evaluations(self, levels):
        calls = []
        for s, nxt in zip(levels, levels[1:]):
            calls += [s] if nxt == 0 else [s, nxt]
        return calls

    def stepper(self, levels):
        # call j is step j // 2's predictor (even) or corrector (odd); the last step has one
        return _Heun(levels, self.bug)


def heun(bug=""):
    sampler = Heun()
    sampler.bug = bug
    sampler.schedule = Karras()
    return sampler


def test_a_correct_heun_passes_with_its_order():
    report = check_sampler(heun(), order=2)
    assert 1.7 <= report.measured_order <= 2.3, report
    assert report.errors[0] > report.errors[-1]


@pytest.mark.parametrize("bug", ["predictor-sign", "corrector-sign", "second-slope-only"])
def test_each_planted_heun_bug_fails_check_sampler_but_passes_check_scheduler(bug):
    sampler = heun(bug)
    check_scheduler(sampler, mixture_for(sampler).process)  # structure cannot tell
    with pytest.raises(AssertionError, match="converge|order"):
        check_sampler(sampler, order=2)


def test_ddim_is_first_order_and_declaring_more_fails():
    ddim = diffplug.default_registry().load("scheduler", "ddim")
    report = check_sampler(ddim.from_options(spacing="trailing"), order=1)
    assert 0.7 <= report.measured_order <= 1.3
    with pytest.raises(AssertionError, match="declared order 2"):
        check_sampler(ddim.from_options(spacing="trailing"), order=2)


def test_a_stochastic_sampler_must_draw_the_mixture():
    ddpm = diffplug.default_registry().load("scheduler", "ddpm")
    assert check_sampler(ddpm()).stochastic

    class Overdamped(type(ddpm())):
        def step(self, t, abar, abar_next):
            a, b, c, d = super().step(t, abar, abar_next)
            return a, b, c, d * 1.5  # too much noise: the wrong distribution

    with pytest.raises(AssertionError):
        check_sampler(Overdamped())


def test_the_reference_is_independent_and_exact():
    """The reference ODE solution does not move when its own step is halved, and a
    1000-step DDIM (first order, never used by the reference) lands on it."""
    import diffplug.testing.convergence as convergence

    ddim = diffplug.default_registry().load("scheduler", "ddim").from_options(spacing="trailing")
    oracle = mixture_for(ddim)
    from diffplug.testing import circle_mixture

    oracle = circle_mixture(variance=0.05, process=oracle.process.spec())
    seeds = range(16)
    ref = exact_solution(oracle, ddim, 1000, seeds)
    saved = convergence.REFERENCE_DENSITY
    try:
        convergence.REFERENCE_DENSITY = 2 * saved
        finer = exact_solution(oracle, ddim, 1000, seeds)
    finally:
        convergence.REFERENCE_DENSITY = saved
    assert float((ref - finer).abs().max()) < 1e-8
    x = diffplug.sample(oracle, ddim, steps=1000, seeds=seeds, dtype=torch.float64)
    assert float((x - ref).flatten(1).norm(dim=1).mean()) < 5e-3


def test_check_scheduler_still_rejects_times_that_increase_or_never_move():
    """Repeated times are allowed (a two-call step); rising or frozen ones are not."""
    import dataclasses

    ddim = diffplug.default_registry().load("scheduler", "ddim")

    class Rising(ddim):
        def plan(self, process, steps):
            plan = super().plan(process, steps)
            return dataclasses.replace(plan, t=plan.t.flip(0))

    class Frozen(ddim):
        def plan(self, process, steps):
            plan = super().plan(process, steps)
            return dataclasses.replace(plan, t=torch.full_like(plan.t, float(plan.t[0])))

    with pytest.raises(AssertionError, match="times increase"):
        check_scheduler(Rising())
    with pytest.raises(AssertionError, match="never moves"):
        check_scheduler(Frozen())
    check_scheduler(heun())  # repeats its levels: accepted
