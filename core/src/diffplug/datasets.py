"""The data-set contract: what a plugin registers with ``register_datasets``.

A registered target is a subclass of ``ImageDataset`` whose constructor takes no
arguments. ``diffplug list datasets`` builds it and calls ``info()`` alone, so importing the
module and calling ``info()`` must not import torch (read a small metadata file, or return
constants); ``images``, ``labels`` and ``captions`` are called when a run uses the data and
may import torch. ``diffplug train --data NAME`` reads a split into memory through
``diffplug.data.load_data``:

- ``images(split)``: a ``torch.uint8`` tensor (N, C, H, W), values 0..``info().max_value``
  (255 for 8-bit images; fewer grey levels, as the digits' 0..16, keep their exact values);
  core maps them to [-1, 1] as ``x / (max_value / 2) - 1`` and resizes to ``--size``;
- ``labels(split)``: integer class labels (N,) as a ``torch.long`` tensor, or None;
- ``captions(split)``: per image, a list of one or more phrasings, or None.

Splits are ``"train"`` and ``"heldout"`` (images a model is not trained on, for evaluation);
``info().splits`` gives their sizes. A data set may accept more (the digits take ``"all"``).

Data too large for memory can be served later through ``chunks(split, size)``, which
yields dicts ``{"images": uint8 (n, C, H, W), "labels": ..., "captions": ...}`` of at most
``size`` images in a fixed order: the default slices ``images``; a streaming data set
overrides it (and may make ``images`` refuse). Today's training loop takes ``images``.
"""

from __future__ import annotations

import functools
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from diffplug.errors import UserError

#: the splits every data set has
SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class DatasetInfo:
    """What ``diffplug list datasets`` shows of a data set, known without reading images."""

    #: images per split: ``{"train": n, "heldout": m}``
    splits: Mapping[str, int]
    #: (height, width) in pixels of every image
    resolution: tuple[int, int]
    #: 1 (greyscale) or 3 (RGB)
    channels: int
    #: the license of the images (and of their metadata, if it differs), in a few words
    license: str
    #: whether ``captions(split)`` gives text for every image
    captions: bool = False
    #: whether ``labels(split)`` gives a class for every image
    labels: bool = False
    #: the largest pixel value: 255 for 8-bit images; the digits have 17 levels, 0..16
    max_value: int = 255
    #: the class names by label index, when ``labels``
    classes: tuple[str, ...] = ()
    #: where the data comes from (authors, version, URL)
    source: str = ""
    #: anything else worth a line
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        """Images in every split together."""
        return sum(self.splits.values())


class ImageDataset(ABC):
    """A data set of images, with optional class labels and captions (module docstring)."""

    @abstractmethod
    def info(self) -> DatasetInfo:
        """Sizes, resolution, channels, license: cheap, and importing no torch."""

    @abstractmethod
    def images(self, split: str) -> Any:
        """The split's images: a ``torch.uint8`` tensor (N, C, H, W), 0..``max_value``."""

    def labels(self, split: str) -> Any:
        """The split's class labels, a ``torch.long`` tensor (N,), or None (no labels)."""
        return None

    def captions(self, split: str) -> list[list[str]] | None:
        """Per image, one or more captions (the first is the plainest), or None."""
        return None

    def chunks(self, split: str, size: int = 1024) -> Iterator[dict[str, Any]]:
        """The split in pieces of at most ``size`` images, in order (see the module
        docstring): the hook a streaming loader will use."""
        images, labels, captions = self.images(split), self.labels(split), self.captions(split)
        for start in range(0, len(images), size):
            end = start + size
            yield {
                "images": images[start:end],
                "labels": labels[start:end] if labels is not None else None,
                "captions": captions[start:end] if captions is not None else None,
            }


def check_split(split: str, allowed: tuple[str, ...] = SPLITS) -> str:
    """``split`` if the data set has it, else a clear error naming those it has."""
    if split not in allowed:
        raise UserError(f"unknown split {split!r}; use {', '.join(allowed)}")
    return split


class Digits(ImageDataset):
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, 17 grey levels, labels).

    The split is fixed: image i (in ``load_digits`` order) is held out when i % 6 == 0,
    giving 1497 training and 300 held-out images with every class in both; ``"all"`` is
    every image in ``load_digits`` order.
    """

    HELD_OUT_EVERY = 6
    SPLITS = (*SPLITS, "all")

    def info(self) -> DatasetInfo:
        return DatasetInfo(
            splits={"train": 1497, "heldout": 300},
            resolution=(8, 8),
            channels=1,
            license="CC BY 4.0 (UCI ML hand-written digits, bundled with scikit-learn)",
            labels=True,
            max_value=16,
            classes=tuple(str(d) for d in range(10)),
            source="scikit-learn's load_digits: the UCI ML Optical Recognition of Handwritten "
            "Digits test set (Alpaydin and Kaynak, 1998)",
        )

    def _keep(self, split: str, n: int) -> Any:
        import torch

        index = torch.arange(n)
        if check_split(split, self.SPLITS) == "train":
            return index % self.HELD_OUT_EVERY != 0
        if split == "heldout":
            return index % self.HELD_OUT_EVERY == 0
        return torch.ones(n, dtype=torch.bool)

    def images(self, split: str) -> Any:
        pixels, _ = _digits()
        return pixels[self._keep(split, len(pixels))]

    def labels(self, split: str) -> Any:
        _, labels = _digits()
        return labels[self._keep(split, len(labels))]


@functools.cache
def _digits() -> tuple[Any, Any]:
    """``load_digits`` as (uint8 (1797, 1, 8, 8), long (1797,)), read once per process
    (indexing with a mask copies, so callers never share storage)."""
    import torch

    rows = _digits_rows()
    return (
        torch.from_numpy(rows[:, :-1].reshape(-1, 1, 8, 8)).to(torch.uint8),
        torch.from_numpy(rows[:, -1]).long(),
    )


def _digits_rows() -> Any:
    """The (1797, 65) table ``load_digits`` reads (64 pixels, then the label), read from
    scikit-learn's installed data file without importing scikit-learn, whose import costs
    every command that touches the digits about 4 s; ``load_digits`` where the file moved."""
    import gzip
    import importlib.util

    import numpy

    spec = importlib.util.find_spec("sklearn")
    for root in (spec.submodule_search_locations or []) if spec is not None else []:
        path = os.path.join(root, "datasets", "data", "digits.csv.gz")
        if os.path.isfile(path):
            with gzip.open(path, "rt") as f:
                return numpy.loadtxt(f, delimiter=",", dtype=numpy.int64)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return numpy.concatenate([bunch.data, bunch.target[:, None]], axis=1).astype(numpy.int64)
