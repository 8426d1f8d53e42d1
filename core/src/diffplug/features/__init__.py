"""Feature spaces: what turns images into the vectors ``diffplug eval --reference`` compares.

A feature space is a subclass of ``FeatureSpace``. Core's (``pixels``, ``inception``,
``digits``) are listed in ``CORE``; a plugin registers its own with the
``register_features`` hook (the emoji plugin's ``emoji``), and ``feature_space`` finds
either by name, or by the format recorded in a weights file (``--features FILE``).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from diffplug.errors import DiffplugError, UnknownComponentError, UserError

#: core's feature spaces: name -> "module:Class" (imported when used)
CORE = {
    "pixels": "diffplug.features.pixels:PixelFeatures",
    "inception": "diffplug.features.inception:InceptionFeatures",
    "digits": "diffplug.features.digits:DigitsFeatures",
}
#: the space used when none is given: it needs no weights file
DEFAULT = "pixels"


class FeatureSpace(ABC):
    """Maps images (N, 1|3, S, S), floats in [0, 1], to feature vectors (N, D).

    The constructor takes ``weights``: a path, or None for the space's own (shipped, or
    none needed); a space that reads a weights file names its format (``weights_format``,
    the file's ``diffplug.format`` metadata) so that ``--features FILE`` finds it.
    """

    #: a weights file's ``diffplug.format`` that this space reads (None: it takes none)
    weights_format: ClassVar[str | None] = None
    #: what the Frechet distance is called here ("FID" in Inception's pool3 only)
    fd_name: ClassVar[str] = "FD"
    #: images per forward pass
    batch_size: ClassVar[int] = 256

    def __init__(self, weights: str | os.PathLike[str] | None = None) -> None:
        if weights is not None and self.weights_format is None:
            raise UserError(f"the {self.name} feature space takes no weights file")
        self.weights = None if weights is None else os.fspath(weights)

    @property
    @abstractmethod
    def name(self) -> str:
        """The name ``--features`` takes."""

    @property
    @abstractmethod
    def label(self) -> str:
        """What the features are, in a few words: printed on every output line."""

    @abstractmethod
    def extract(self, images: torch.Tensor) -> torch.Tensor:
        """Features (n, D) of one batch (n, 1|3, S, S) in [0, 1]."""

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Features (N, D), float64, of every image, a batch at a time; uint8 images are
        read as 0..255."""
        out = []
        for k in range(0, len(images), self.batch_size):
            batch = images[k : k + self.batch_size]
            batch = batch.float() / 255 if batch.dtype == torch.uint8 else batch.float()
            out.append(self.extract(batch).double())
        return torch.cat(out)


def names(registry: Any = None) -> list[str]:
    """Every feature space's name: core's, then the plugins'."""
    return [*CORE, *(n for n in _registry(registry).names("feature") if n not in CORE)]


def feature_space(
    spec: str | None = None, weights: str | os.PathLike[str] | None = None, registry: Any = None
) -> FeatureSpace:
    """The feature space ``spec`` names (default ``pixels``), built with ``weights``; a
    ``.safetensors`` path as ``spec`` is a weights file whose format names its space."""
    spec = spec or DEFAULT
    if spec.endswith(".safetensors") or os.sep in spec or "/" in spec:
        if weights is not None:
            raise UserError("give the weights once: --features FILE or --features-weights FILE")
        spec, weights = _space_of_file(spec, registry), spec
    cls, entry = _find(spec, registry)
    if entry is None:
        return cls(weights=weights)
    return entry.construct(cls=cls, weights=weights)


def _registry(registry: Any) -> Any:
    if registry is None:
        from diffplug.registry import default_registry

        registry = default_registry()
    return registry


def _find(name: str, registry: Any) -> tuple[type[FeatureSpace], Any]:
    """(class, registry entry or None for core's) of the space ``name``."""
    if name in CORE:
        module, _, attr = CORE[name].partition(":")
        import importlib

        return getattr(importlib.import_module(module), attr), None
    registry = _registry(registry)
    try:
        entry = registry.get("feature", name)
    except UnknownComponentError:
        raise UserError(
            f"unknown feature space {name!r}; installed: {', '.join(names(registry))}"
        ) from None
    return registry.load("feature", name), entry


def _space_of_file(path: str, registry: Any) -> str:
    """The name of the feature space whose weights format ``path`` records."""
    from diffplug.checkpoint import read_header

    if not os.path.isfile(path):
        raise UserError(f"{path}: no such weights file")
    header, meta = read_header(path)  # not safetensors: a CheckpointError (exit 2)
    fmt = meta.get("diffplug.format")
    if fmt is None and "Mixed_7c.branch_pool.conv.weight" in header:
        return "inception"  # FID Inception weights saved without our metadata
    formats = {}
    for name in names(registry):
        try:
            formats[_find(name, registry)[0].weights_format] = name
        except DiffplugError:
            continue  # a broken plugin's space cannot be this file's
    if fmt in formats and fmt is not None:
        return formats[fmt]
    known = ", ".join(f"{n} ({f})" for f, n in formats.items() if f)
    raise UserError(f"{path}: not the weights of a feature space (format {fmt!r}; known: {known})")
