"""``--features emoji``: the emoji subcategory classifier's 128-d penultimate layer as a
feature space, so FD and KID of emoji samples see what emoji look like, not raw pixels."""

from __future__ import annotations

import os

import torch

from diffplug import FeatureSpace
from diffplug_emoji.classifier import FORMAT, describe, load_classifier, metadata, prepare


class EmojiFeatures(FeatureSpace):
    """The shipped classifier (or another of its format, ``weights``), at 32x32 RGB."""

    name = "emoji"
    weights_format = FORMAT

    def __init__(self, weights: str | os.PathLike[str] | None = None) -> None:
        super().__init__(weights)
        self.model = load_classifier(self.weights)  # a bad file fails before any image

    @property
    def label(self) -> str:
        return describe(metadata(self.weights)) + " features (128-d, 32x32 RGB)"

    def extract(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.features(prepare(images))
