"""The shipped weights still meet a quality bar (a regression test, scored by the evaluator)."""

import pytest
import torch

from diffplug.evaluate import evaluate
from diffplug.registry import default_registry
from diffplug.resolve import load_model
from diffplug.sampling import sample
from diffplug_ddim.scheduler import DDIM


@pytest.mark.slow
def test_ddpm_digits_draws_recognisable_digits_of_every_class():
    model, _ = load_model(default_registry(), "ddpm-digits")
    x = sample(model, DDIM(), steps=25, seeds=range(300), batch_size=100)
    report = evaluate(x)
    hist = report["class_histogram"]
    assert min(hist) >= 0.04 and max(hist) <= 0.18, hist  # all ten classes appear
    assert report["confidence"] > 0.9  # the classifier is sure: these look like digits
    assert report["digits_fd"] < 3 * report["floor"], report
    noise = evaluate(torch.rand(300, 1, 8, 8) * 2 - 1)
    assert report["digits_fd"] < noise["digits_fd"] / 20
