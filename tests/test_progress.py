"""The progress bar counts the user's steps, whatever the calls per step."""

import pytest

import diffplug
import diffplug.sampling as sampling
from diffplug.registry import default_registry
from diffplug.testing import circle_mixture


class Bar:
    """tqdm, recorded."""

    seen: dict = {}

    def __init__(self, total, **kw):
        Bar.seen = {"total": total, "done": 0}

    def update(self, n=1):
        Bar.seen["done"] += n

    def close(self):
        pass


@pytest.mark.parametrize(("name", "calls"), [("heun", 11), ("dpmpp-sde", 11), ("euler", 6),
                                             ("ddim", 6)])  # fmt: skip
def test_the_bar_counts_steps_not_denoiser_calls(monkeypatch, name, calls):
    monkeypatch.setattr(sampling, "tqdm", Bar)
    sampler = default_registry().load("scheduler", name)()
    assert len(sampler.plan(circle_mixture().process, 6)) == calls
    diffplug.sample(circle_mixture(), sampler, steps=6, seeds=[0, 1], progress=True)
    assert Bar.seen == {"total": 6, "done": 6}
