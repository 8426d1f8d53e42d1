"""The emoji subcategory classifier: a small CNN that names an image's subcategory (99 of
them: ``face-smiling``, ``food-fruit``, ``country-flag``, ...).

Why: a text-to-emoji model is scored by whether its samples show what their prompts asked
for, and FD needs a feature space that knows emoji. Trained on the training split only by
``scripts/train_emoji_classifier.py`` (seeded, deterministic); the shipped weights
(``data/emoji-classifier.safetensors``) record their held-out accuracy in their metadata.
Images are taken in [0, 1] (as ``diffplug run`` writes samples), any size, grey or RGB.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diffplug import UserError, read_header
from diffplug_emoji.dataset import Emoji, data_file

#: the side the network sees: emoji are shrunk from 64 with an antialiased resize
SIZE = 32
FEATURES = 128
FORMAT = "diffplug-emoji-classifier/1"
WEIGHTS = data_file("emoji-classifier.safetensors")


def _conv(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class EmojiClassifier(nn.Module):
    """Three stages of two 3x3 convolutions (32, 64, 128 channels) at 32, 16 and 8 px, a
    2x2 average pool (keeping coarse layout: flags differ by where their colours are), a
    128-d ReLU feature layer and a linear head."""

    def __init__(self, classes: int = 99, width: int = 32, features: int = FEATURES) -> None:
        super().__init__()
        w = width
        self.body = nn.Sequential(
            *_conv(3, w), *_conv(w, w), nn.MaxPool2d(2),
            *_conv(w, 2 * w), *_conv(2 * w, 2 * w), nn.MaxPool2d(2),
            *_conv(2 * w, 4 * w), *_conv(4 * w, 4 * w), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(),
            nn.Linear(16 * w, features), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(features, classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (N, 128) of (N, 3, 32, 32) images in [-1, 1]."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Subcategory logits (N, 99)."""
        return self.head(self.features(x))


@functools.cache
def subcategories() -> tuple[str, ...]:
    """The classes in label order: subcategories by first appearance in the data set's
    records (training split, then held out), i.e. Unicode's emoji order."""
    dataset = Emoji()
    names = (r["subcategory"] for split in ("train", "heldout") for r in dataset.records(split))
    return tuple(dict.fromkeys(names))


def labels(split: str) -> torch.Tensor:
    """The subcategory index (N,) of every image of a split of the emoji data set."""
    index = {name: k for k, name in enumerate(subcategories())}
    return torch.tensor([index[r["subcategory"]] for r in Emoji().records(split)])


def prepare(images: torch.Tensor) -> torch.Tensor:
    """(N, 1|3, H, W) in [0, 1] -> (N, 3, 32, 32) in [-1, 1]: grey made RGB, square images
    resized (antialiased when shrinking), as the training data was."""
    if images.ndim != 4 or images.shape[1] not in (1, 3) or images.shape[2] != images.shape[3]:
        raise UserError(f"images must be (N, 1 or 3, S, S); got {tuple(images.shape)}")
    x = images.detach().float().cpu().expand(-1, 3, -1, -1)
    if x.shape[-1] != SIZE:
        shrink = x.shape[-1] > SIZE
        x = F.interpolate(
            x, size=(SIZE, SIZE), mode="bilinear", align_corners=False, antialias=shrink
        )
    return (x * 2 - 1).clamp(-1, 1)


def metadata(path: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """The weights file's metadata: how it was trained and what it measured."""
    _, meta = read_header(os.fspath(path or WEIGHTS))
    return meta


@functools.cache
def _load(path: str) -> EmojiClassifier:
    from diffplug import load_tensors

    if not os.path.isfile(path):
        raise UserError(f"emoji classifier weights {path} are missing; rebuild them with "
                        "`uv run python scripts/train_emoji_classifier.py`")  # fmt: skip
    meta = metadata(path)
    if meta.get("diffplug.format") != FORMAT:
        raise UserError(f"{path} is not an emoji classifier ({FORMAT}) file")
    classes = json.loads(meta["classes"])
    if tuple(classes) != subcategories():
        raise UserError(f"{path} was trained on other subcategories than this data set's")
    model = EmojiClassifier(classes=len(classes), width=int(meta["width"]))
    model.load_state_dict(load_tensors(path), strict=True)
    return model.eval()


def load_classifier(path: str | os.PathLike[str] | None = None) -> EmojiClassifier:
    """The shipped (or given) classifier from safetensors; loaded once per path."""
    return _load(os.fspath(path or WEIGHTS))


@torch.no_grad()
def classify(
    images: torch.Tensor, path: str | os.PathLike[str] | None = None, batch_size: int = 512
) -> tuple[torch.Tensor, torch.Tensor]:
    """The subcategory of each image (N, 1|3, S, S) in [0, 1]: ``(indices (N,),
    probabilities (N, 99))``; ``subcategories()[i]`` names index ``i``."""
    model = load_classifier(path)
    x = prepare(images)
    logits = torch.cat([model(x[k : k + batch_size]) for k in range(0, len(x), batch_size)])
    probabilities = logits.softmax(1)
    return probabilities.argmax(1), probabilities


def describe(meta: Any) -> str:
    """One line on the weights: what they measured on held-out emoji."""
    return (
        f"emoji subcategory classifier ({len(json.loads(meta['classes']))} classes, "
        f"held-out accuracy {float(meta['heldout_accuracy']):.3f})"
    )
