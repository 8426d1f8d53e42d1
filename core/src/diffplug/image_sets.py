"""The image sets ``diffplug eval`` compares, from what a user points at: a samples file of
``diffplug run`` (``.safetensors``), a folder of images, or a registered data set by name
(``emoji``: its held-out split; ``emoji:train``, ``digits:all`` for another).

Every set comes out square, (N, 1|3, S, S), with a one-line description and the notes of
what was done to it: a folder's images are centre-cropped to squares and those of another
size than the most common one resized to it (antialiased), images with transparency are
composited on white (as the emoji data set is), and a folder is grey only if every image
in it is.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffplug.errors import UserError

FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
TOLERANCE = 1e-4  # [0, 1] up to rounding
#: split names a data set spec may end in (``emoji:train``); a bare name is held out
SPLITS = ("train", "heldout", "all")
#: a folder's images are brought to at most this side (FID resizes to 299 anyway)
MAX_SIDE = 512
GREY_MODES = {"1", "L", "LA", "I", "I;16", "F"}


@dataclass
class ImageSet:
    """Images (N, 1|3, S, S): uint8 (0..255) or floats in [0, 1]."""

    images: torch.Tensor
    #: where they came from, in words: ``folder runs/x``, ``data set emoji:heldout``
    source: str
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    def describe(self) -> str:
        n, c, h, w = self.images.shape
        return f"{self.source} ({n} images, {h}x{w} {'grey' if c == 1 else 'RGB'})"


def load_image_set(spec: str, registry: Any = None) -> ImageSet:
    """A samples file, a folder or a data set (``NAME`` or ``NAME:SPLIT``), by what exists."""
    path = Path(os.path.expanduser(spec))
    if path.suffix.lower() == ".safetensors" or path.is_file():
        return ImageSet(read_samples(path), f"samples {spec}")
    if path.is_dir():
        return read_folder(path)
    name, _, split = spec.rpartition(":")
    if split not in SPLITS:
        name, split = spec, "heldout"
    registry = _registry(registry)
    if not registry.sharing("dataset", name.rpartition(":")[2]):
        installed = ", ".join(registry.names("dataset")) or "none"
        raise UserError(
            f"{spec}: no such file, folder or data set (data sets: {installed}; "
            "a split as NAME:train)"
        )
    from diffplug.data import load_data

    data = load_data(name, split=split, registry=registry)
    return ImageSet((data.images + 1) / 2, f"data set {name}:{split}")


def _registry(registry: Any) -> Any:
    if registry is None:
        from diffplug.registry import default_registry

        registry = default_registry()
    return registry


def read_samples(path: Path) -> torch.Tensor:
    """The "samples" tensor of a safetensors file, validated: (N>=2, 1|3, S, S), in [0, 1]."""
    from safetensors import safe_open

    from diffplug.checkpoint import read_header

    if path.suffix.lower() == ".png":
        raise UserError(f"{path}: a PNG grid cannot be scored; sample with -o NAME.safetensors")
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if not path.is_file():
        raise UserError(f"{path} is not a file")
    header, _ = read_header(path)  # a CheckpointError (exit 2) if it is not safetensors
    entry = header.get("samples")
    if entry is None:
        found = ", ".join(sorted(header)) or "none"
        raise UserError(
            f"{path}: no 'samples' tensor (found: {found}); write one with "
            "`diffplug run -o NAME.safetensors`"
        )
    shape = entry["shape"]
    if entry["dtype"] not in FLOAT_DTYPES:
        raise UserError(f"{path}: 'samples' is {entry['dtype']}; expected floats in [0, 1]")
    if len(shape) != 4 or shape[1] not in (1, 3) or shape[0] < 2 or not shape[2] == shape[3] > 0:
        raise UserError(
            f"{path}: 'samples' has shape {tuple(shape)}; expected (N>=2, 1 or 3, S, S)"
        )
    with safe_open(os.fspath(path), framework="pt") as fh:
        images = fh.get_tensor("samples").float()
    if not torch.isfinite(images).all():
        raise UserError(f"{path}: 'samples' holds NaN or Inf")
    low, high = float(images.min()), float(images.max())
    if low < -TOLERANCE or high > 1 + TOLERANCE:
        raise UserError(
            f"{path}: 'samples' values span [{low:.3g}, {high:.3g}]; expected [0, 1] "
            "(diffplug writes samples in [0, 1])"
        )
    return images.clamp(0, 1)


def read_folder(root: Path) -> ImageSet:
    """Every readable image under ``root`` (recursively) as uint8 squares of one size."""
    from PIL import Image, UnidentifiedImageError

    from diffplug.data import IMAGE_SUFFIXES

    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    pictures, skipped, composited, cropped = [], 0, 0, 0
    for file in files:
        try:
            with Image.open(file) as im:
                im.load()
                grey = im.mode in GREY_MODES
                if "A" in im.getbands() or "transparency" in im.info:
                    rgba = im.convert("RGBA")
                    im = Image.alpha_composite(Image.new("RGBA", im.size, "white"), rgba)
                    composited += 1
                im = im.convert("L" if grey else "RGB")
                side = min(im.size)
                cropped += im.width != im.height
                left, top = (im.width - side) // 2, (im.height - side) // 2
                pictures.append(im.crop((left, top, left + side, top + side)))
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
            skipped += 1
    if not pictures:
        raise UserError(
            f"{root}: no readable images (looked for {', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    notes = []
    if skipped:
        notes.append(f"skipped {skipped} unreadable image file(s)")
        print(f"diffplug: skipped {skipped} unreadable image file(s) in {root}", file=sys.stderr)
    if composited:
        notes.append(f"{composited} image(s) with transparency composited on white")
    sides = Counter(p.width for p in pictures)
    side = min(sides.most_common(1)[0][0], MAX_SIDE)
    resized = sum(n for s, n in sides.items() if s != side)
    if resized:
        notes.append(
            f"resized {resized} of {len(pictures)} images to {side}x{side} "
            f"(sizes found: {', '.join(f'{s}x{s}' for s in sorted(sides))})"
        )
    if cropped:
        notes.append(f"centre-cropped {cropped} non-square image(s) to squares")
    channels = 1 if all(p.mode == "L" for p in pictures) else 3
    images = torch.empty(len(pictures), channels, side, side, dtype=torch.uint8)
    for k, picture in enumerate(pictures):
        picture = picture.convert("L" if channels == 1 else "RGB")
        if picture.width != side:
            picture = picture.resize((side, side), Image.Resampling.BICUBIC, reducing_gap=None)
        pixels = torch.frombuffer(bytearray(picture.tobytes()), dtype=torch.uint8)
        images[k] = pixels.view(side, side, channels).permute(2, 0, 1)
    return ImageSet(images, f"folder {root}", notes)
