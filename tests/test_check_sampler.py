"""``diffplug.testing.check_sampler`` is proven by the bugs it catches. The Heun it is shown
on is the plugin guide's worked example (``docs/examples/diffplug-heun``, imported here, not
copied): it passes, and the example's own tests plant three bugs in it (a sign error in the
predictor, one in the corrector, a corrector that keeps only the second slope) that each fail
it although they pass the structural checks. Here: DDIM's first order, stochastic samplers,
and the exactness of the reference."""

from __future__ import annotations

import pytest
import torch

import diffplug
from diffplug.schedules import Karras
from diffplug.testing import check_sampler, check_scheduler
from diffplug.testing.convergence import exact_solution
from diffplug.testing.mixture import mixture_for
from diffplug_heun.sampler import Heun


def heun():
    sampler = Heun()
    sampler.schedule = Karras()
    return sampler


def test_the_guides_heun_passes_with_its_order():
    report = check_sampler(heun(), order=2)
    assert 1.7 <= report.measured_order <= 2.3, report
    assert report.errors[0] > report.errors[-1]
    assert heun().order == 2  # what check_sampler holds it to when no order is given


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
