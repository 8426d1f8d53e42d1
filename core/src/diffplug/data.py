"""Training data: a registered data set (``digits``, a plugin's) or a folder of the user's
images, found by one name (``find_data``).

In memory (``load_data``, and ``open_data`` for a data set) both give float32 tensors
(N, C, S, S) in [-1, 1]; ``open_data`` streams a folder instead (``diffplug.streaming``).
Nothing is downloaded: the digits ship inside scikit-learn, a plugin's data set inside its
package. Data sets are registered with the ``register_datasets`` hook; their contract is
``diffplug.datasets.ImageDataset``.

The digits split is fixed: image i (in ``load_digits`` order) is held out when i % 6 == 0,
giving 1497 training and 300 held-out images with every class in both.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from diffplug.datasets import Digits, ImageDataset
from diffplug.errors import DiffplugError, PluginError, UnknownComponentError, UserError
from diffplug.folders import scan_folder

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
HELD_OUT_EVERY = Digits.HELD_OUT_EVERY
#: the side and channels of a folder's images when --size / --channels are not given
FOLDER_SIZE, FOLDER_CHANNELS = 8, 1


@dataclass
class Dataset:
    """Images in [-1, 1] and, where known, integer labels and captions."""

    images: torch.Tensor
    labels: torch.Tensor | None = None
    #: per image, one or more captions (a data set that has them)
    captions: list[list[str]] | None = None
    #: where the images came from, for a checkpoint's record: a registered data set's
    #: ``dataset``, ``plugin``, ``version``, ``split`` and ``license``; empty for a folder
    source: dict[str, Any] = field(default_factory=dict)

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
    return from_dataset(Digits(), split, size, name="digits")


def from_dataset(
    dataset: ImageDataset,
    split: str = "train",
    size: int | None = None,
    channels: int | None = None,
    *,
    name: str = "data set",
) -> Dataset:
    """A split of a registered data set (``diffplug.datasets.ImageDataset``) in memory:
    its uint8 images mapped to [-1, 1] (``x / (max_value / 2) - 1``), centre-cropped to a
    square if they are not one and resized to ``size`` (default: their own side), with its
    labels and captions. ``channels``, if given, must be the data set's."""
    info = dataset.info()
    if channels is not None and channels != info.channels:
        what = {1: "greyscale", 3: "RGB"}.get(info.channels, f"{info.channels}-channel")
        raise UserError(
            f"data set {name!r} is {what}: use --channels {info.channels} (or leave it out)"
        )
    images = dataset.images(split)
    if not (
        isinstance(images, torch.Tensor)
        and images.dtype == torch.uint8
        and images.ndim == 4
        and images.shape[1] == info.channels
        and len(images) > 0
    ):
        found = (
            f"{images.dtype} {tuple(images.shape)}"
            if isinstance(images, torch.Tensor)
            else type(images).__name__
        )
        raise PluginError(
            f"data set {name!r}: images({split!r}) gave {found}; expected a non-empty uint8 "
            f"tensor (N, {info.channels}, H, W)"
        )
    x = images.float() / (info.max_value / 2) - 1
    side = min(x.shape[-2:])
    if x.shape[-1] != x.shape[-2]:
        top, left = (x.shape[-2] - side) // 2, (x.shape[-1] - side) // 2
        x = x[..., top : top + side, left : left + side]
    labels = dataset.labels(split)
    captions = dataset.captions(split)
    for what, values in (("labels", labels), ("captions", captions)):
        if values is not None and len(values) != len(x):
            raise PluginError(
                f"data set {name!r}: {len(values)} {what} for {len(x)} images in {split!r}"
            )
    if labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.long)
    return Dataset(resize(x, size or side), labels, captions)


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


def load_data(
    spec: str,
    size: int | None = None,
    split: str = "train",
    channels: int | None = None,
    registry: Any = None,
) -> Dataset:
    """A registered data set by name (``digits``, ``emoji``, ``plugin:name``), or a folder,
    in memory.

    A spec with a path separator (or starting with ``.`` or ``~``) is always a folder; a
    bare word is a data set's name, else a folder of that name in the working directory;
    neither is a ``UserError`` naming the installed data sets. ``size`` and ``channels``
    default to the data set's own (a folder's here: 8 px, greyscale; ``open_data`` infers
    them from a folder's images and streams it)."""
    found = find_data(spec, registry)
    if isinstance(found, Path):
        return image_folder(found, size or FOLDER_SIZE, channels or FOLDER_CHANNELS)
    entry, registry = found
    return _registered(spec, entry, registry, split, size, channels)


def open_data(
    spec: str,
    size: int | None = None,
    channels: int | None = None,
    registry: Any = None,
    *,
    crop: str = "centre",
    hflip: bool = False,
    labels_from_folders: bool = False,
    captions: bool = False,
    workers: int | None = None,
) -> Any:
    """What ``diffplug train --data SPEC`` trains on: a registered data set's training split
    in memory (exactly as ``load_data``), or a folder as a ``diffplug.streaming.FolderData``
    read by DataLoader workers, its size and channels inferred from its images unless given,
    with its captions (``captions``: the conditioner reads them) and sub-folder labels.
    ``crop``, ``hflip`` and ``labels_from_folders`` are for folders only."""
    from diffplug import streaming  # here: streaming builds on this module's Dataset

    found = find_data(spec, registry)
    if isinstance(found, Path):
        scan = scan_folder(found, labels_from_folders=labels_from_folders, captions=captions)
        return streaming.FolderData(
            scan, size, channels, crop=crop, hflip=hflip,
            workers=streaming.DEFAULT_WORKERS if workers is None else workers,
        )  # fmt: skip
    asked = [flag for flag, on in (("--hflip", hflip), ("--crop random", crop == "random"),
             ("--labels-from-folders", labels_from_folders)) if on]  # fmt: skip
    if asked:
        raise UserError(
            f"{' and '.join(asked)}: for image folders; data set {spec!r} is read into memory "
            "as it is"
        )
    entry, registry = found
    return _registered(spec, entry, registry, "train", size, channels)


def find_data(spec: str, registry: Any = None) -> Path | tuple[Any, Any]:
    """A folder's path, or (the registry entry, the registry) of a registered data set."""
    if _is_path(spec):
        return Path(os.path.expanduser(spec))
    if registry is None:
        from diffplug.registry import default_registry

        registry = default_registry()
    try:
        return registry.get("dataset", spec), registry
    except UnknownComponentError:
        if os.path.isdir(spec):
            return Path(spec)
        installed = ", ".join(registry.names("dataset")) or "none"
        hints = "".join(f". {h}" for h in registry.missing_hints("dataset"))
        raise UserError(
            f"unknown data set {spec!r}: not an installed data set ({installed}) nor an "
            f"image folder; `diffplug list datasets` lists them{hints}"
        ) from None


def _registered(
    spec: str, entry: Any, registry: Any, split: str, size: int | None, channels: int | None
) -> Dataset:
    try:
        dataset = entry.construct(cls=registry.load("dataset", spec))
        data = from_dataset(dataset, split, size, channels, name=entry.name)
        info = dataset.info()
    except DiffplugError:
        raise
    except Exception as exc:  # a plugin's bug must not look like ours
        raise PluginError(
            f"plugin {entry.dist}: data set {entry.name!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    plugin = registry.plugins.get(entry.dist)
    data.source = {
        "dataset": entry.name,
        "plugin": entry.dist,
        "version": plugin.version if plugin is not None else "?",
        "split": split,
        "license": info.license,
    }
    return data


def _is_path(spec: str) -> bool:
    return os.sep in spec or "/" in spec or spec.startswith((".", "~"))
