"""Datasets: scikit-learn's bundled handwritten digits, and a folder of the user's images.

Both give float32 tensors (N, C, S, S) in [-1, 1]. Nothing is downloaded: the digits ship
inside scikit-learn.

The digits split is fixed: image i (in ``load_digits`` order) is held out when i % 6 == 0,
giving 1497 training and 300 held-out images with every class in both.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from diffplug.errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
HELD_OUT_EVERY = 6


@dataclass
class Dataset:
    """Images in [-1, 1] and, where known, integer labels."""

    images: torch.Tensor
    labels: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.images)


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear (antialiased when shrinking) resize of (N, C, H, W) to (N, C, size, size)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    shrink = size < images.shape[-1]
    out = F.interpolate(
        images, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink
    )
    return out.clamp(-1, 1)


def digits(split: str = "train", size: int = 8) -> Dataset:
    """The 8x8 digits (0..16 grey levels) scaled to [-1, 1], optionally resized.

    ``split`` is "train" (1497 images), "heldout" (300) or "all" (1797).
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    labels = torch.tensor(bunch.target, dtype=torch.long)
    index = torch.arange(len(images))
    if split == "train":
        keep = index % HELD_OUT_EVERY != 0
    elif split == "heldout":
        keep = index % HELD_OUT_EVERY == 0
    elif split == "all":
        keep = torch.ones_like(index, dtype=torch.bool)
    else:
        raise UserError(f"unknown split {split!r}; use train, heldout or all")
    return Dataset(resize(images[keep], size), labels[keep])


def image_folder(path: str | os.PathLike[str], size: int, channels: int = 1) -> Dataset:
    """Every readable image under ``path`` (recursively), centre-cropped and resized.

    Unreadable files are skipped with a count on stderr; an empty folder is an error.
    """
    from PIL import Image, UnidentifiedImageError

    root = Path(path)
    if not root.is_dir():
        raise UserError(f"data folder {root} does not exist or is not a directory")
    if channels not in (1, 3):
        raise UserError(f"channels must be 1 (greyscale) or 3 (RGB); got {channels}")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    images, skipped = [], 0
    for file in files:
        try:
            with Image.open(file) as im:
                im = im.convert("L" if channels == 1 else "RGB")
                side = min(im.size)
                left, top = (im.width - side) // 2, (im.height - side) // 2
                im = im.crop((left, top, left + side, top + side))
                im = im.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=None)
                tensor = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
            skipped += 1  # one oversized image (PIL's bomb guard) is skipped like a bad one
            continue
        images.append(tensor.view(size, size, channels).permute(2, 0, 1).float() / 127.5 - 1)
    if skipped:
        print(f"diffplug: skipped {skipped} unreadable image file(s) in {root}", file=sys.stderr)
    if not images:
        raise UserError(
            f"no readable images in {root} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    return Dataset(torch.stack(images))


def load_data(spec: str, size: int, split: str = "train", channels: int = 1) -> Dataset:
    """``digits`` or a folder path."""
    if spec == "digits":
        if channels != 1:
            raise UserError("the digits are greyscale: use --channels 1")
        return digits(split, size)
    return image_folder(spec, size, channels)
