"""The example plugin's own tests, written with diffplug.testing only.

``check_sampler`` proves the Heun correct: on an exact oracle its error falls at order 2. Three
bugs planted below (a sign error in the predictor, one in the corrector, a corrector that
keeps only the second slope) pass every structural check and fail that one.
"""

import pytest

import diffplug
import diffplug_heun.plugin as plugin
from diffplug.testing import (
    check_sampler,
    check_sampler_deterministic,
    check_scheduler,
    fresh_registry,
)
from diffplug_heun.sampler import Heun, HeunStepper


def make():
    registry = fresh_registry(plugin)  # core + this plugin, no entry points
    return registry.load("scheduler", "example-heun")()


def test_contract():
    check_scheduler(make())  # times never increase, in range, finite tables
    check_sampler_deterministic(make())  # same seeds -> same samples in any batch size


@pytest.mark.parametrize("steps", [1, 2, 10])
def test_steps_are_heun_steps_of_two_calls_and_the_last_is_euler(steps):
    plan = make().plan(diffplug.VP(), steps)
    assert len(plan.levels) == steps + 1 and plan.levels[-1] == 0
    assert len(plan) == 2 * steps - 1  # the denoiser calls
    s = plan.levels
    calls = [level for i in range(steps - 1) for level in (s[i], s[i + 1])] + [s[-2]]
    assert plan.sigma == calls  # the corrector's level again for the next predictor


def test_check_sampler_finds_it_second_order():
    report = check_sampler(make(), order=2)
    assert 1.7 <= report.measured_order <= 2.3, report
    assert report.errors[0] > report.errors[1] > report.errors[2]


# -- three planted bugs ------------------------------------------------------------------


class PredictorSign(HeunStepper):
    def predict(self, x, x0, s, s_next):
        self.start, self.slope = x, (x0 - x) / s  # the slope's sign flipped
        return x + self.slope * (s_next - s)


class CorrectorSign(HeunStepper):
    def correct(self, x, x0, s, s_next):
        slope = (x - x0) / s_next
        return self.start + (self.slope - slope) / 2 * (s_next - s)  # - for +


class SecondSlopeOnly(HeunStepper):
    def correct(self, x, x0, s, s_next):
        slope = (x - x0) / s_next
        return self.start + slope * (s_next - s)  # drops the predictor's slope


def planted(stepper):
    class Buggy(Heun):
        def stepper(self, levels):
            return stepper(levels)

    return Buggy()


@pytest.mark.parametrize(
    "stepper, message",
    [
        (PredictorSign, "does not converge"),
        (CorrectorSign, "does not converge"),
        (SecondSlopeOnly, r"declared order 2 but the error falls at order 1\."),
    ],
    ids=["predictor-sign", "corrector-sign", "second-slope-only"],
)
def test_each_planted_bug_passes_the_structural_checks_and_fails_check_sampler(stepper, message):
    sampler = planted(stepper)
    check_scheduler(sampler)  # the plan is the same: structure cannot tell
    check_sampler_deterministic(sampler)  # a wrong sampler is still a deterministic one
    with pytest.raises(AssertionError, match=message):
        check_sampler(sampler, order=2)
