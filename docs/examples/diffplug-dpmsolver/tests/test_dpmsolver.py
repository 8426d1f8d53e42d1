"""The example plugin's own tests, written with diffplug.testing only."""

import diffplug_dpmsolver.plugin as plugin
from diffplug import sample
from diffplug.testing import (
    check_sampler_deterministic,
    check_scheduler,
    circle_mixture,
    fresh_registry,
)


def make():
    registry = fresh_registry(plugin)
    return registry.load("scheduler", "example-dpmpp-2m")()


def test_contract():
    check_scheduler(make())
    check_sampler_deterministic(make())


def test_second_order_beats_first_order_on_the_exact_oracle():
    oracle = circle_mixture(variance=0.2)
    seeds = range(128)
    reference = sample(oracle, make(), steps=1000, seeds=seeds)
    err = {}
    for n in (10, 20):
        x = sample(oracle, make(), steps=n, seeds=seeds)
        err[n] = (x - reference).flatten(1).norm(dim=1).mean().item()
    # halving the step halves a first-order method's error; this one's falls ~3.5x
    assert err[10] / err[20] > 2.8, err
