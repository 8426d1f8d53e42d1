"""``digits``: the digits classifier's 64-d penultimate features, the space of today's
``diffplug eval`` (images made grey and 8x8 as the digits evaluator makes them)."""

from __future__ import annotations

import torch

from diffplug.evaluate import FORMAT, load_classifier, to_digits
from diffplug.features import FeatureSpace


class DigitsFeatures(FeatureSpace):
    """The shipped digits classifier (or another of its format, ``weights``)."""

    name = "digits"
    weights_format = FORMAT

    @property
    def label(self) -> str:
        which = f", {self.weights}" if self.weights else ""
        return f"digits classifier features (64-d, 8x8 grey{which})"

    def extract(self, images: torch.Tensor) -> torch.Tensor:
        return load_classifier(self.weights).features(to_digits(images * 2 - 1))
