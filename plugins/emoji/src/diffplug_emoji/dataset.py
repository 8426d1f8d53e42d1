"""The emoji data set: Google's Noto Emoji (from the npm package emoji-datasource-google
16.0.0) composited on white, one lossless PNG atlas per split, and ``emoji.json`` describing
every image in atlas order (``scripts/prepare_emoji.py`` in the repository wrote them).

Importing this module and calling ``info()`` import no torch (``diffplug list datasets``).
"""

from __future__ import annotations

import functools
import hashlib
import json
from importlib import resources
from typing import Any

from diffplug import DatasetInfo, ImageDataset, PluginError, UserError

SPLITS = ("train", "heldout")
LICENSE = "Apache-2.0 (images: Google's Noto Emoji); MIT (metadata: emoji-datasource)"


def data_file(name: str) -> Any:
    """A shipped file of the package's ``data/`` folder (an importlib.resources path)."""
    return resources.files(__package__).joinpath("data", name)


@functools.cache
def metadata() -> dict[str, Any]:
    """``emoji.json``: the source, the split rule, and per split its atlas and records."""
    return json.loads(data_file("emoji.json").read_text(encoding="utf-8"))


class Emoji(ImageDataset):
    """3786 emoji images (3428 train, 358 held out), 64x64 RGB, 4 captions each.

    Every record (``records(split)``, in image order) has ``unified`` (the code point
    sequence, e.g. ``1F44D-1F3FD``), ``emoji`` (the characters), ``base`` (the base emoji's
    ``unified``), ``name``, ``short_names``, ``category``, ``subcategory``, ``skin_tone``
    (None, or e.g. ``"medium skin tone"``) and ``captions``. A base emoji and all its
    skin-tone variations are in one split.
    """

    def info(self) -> DatasetInfo:
        meta = metadata()
        side = int(meta["resolution"])
        return DatasetInfo(
            splits={s: int(meta["splits"][s]["count"]) for s in SPLITS},
            resolution=(side, side),
            channels=int(meta["channels"]),
            license=LICENSE,
            captions=True,
            source=f"{meta['source']['package']} {meta['source']['version']} (npm): "
            "Noto Emoji by Google; emoji.json by Cal Henderson",
            notes={"split": meta["split"], "background": meta["background"]},
        )

    def records(self, split: str) -> list[dict[str, Any]]:
        """The split's per-image metadata, in image order."""
        return metadata()["splits"][_split(split)]["emoji"]

    def images(self, split: str) -> Any:
        return _atlas_images(_split(split)).clone()  # the cache stays as decoded

    def captions(self, split: str) -> list[list[str]]:
        return [list(r["captions"]) for r in self.records(split)]


def _split(split: str) -> str:
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; use {', '.join(SPLITS)}")
    return split


@functools.cache
def _atlas_images(split: str) -> Any:
    """The split's atlas cut into a uint8 tensor (N, 3, 64, 64), checked against the
    SHA-256 recorded when it was written. Cached: callers must not write into it."""
    import io

    import torch
    from PIL import Image

    entry = metadata()["splits"][split]
    raw = data_file(entry["atlas"]).read_bytes()
    if hashlib.sha256(raw).hexdigest() != entry["sha256"]:
        raise PluginError(f"diffplug-emoji: {entry['atlas']} is corrupt (SHA-256 mismatch)")
    side, columns, count = int(metadata()["resolution"]), int(metadata()["columns"]), entry["count"]
    with Image.open(io.BytesIO(raw)) as im:
        rgb = im.convert("RGB")
    rows = rgb.height // side
    pixels = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
    grid = pixels.view(rows, side, columns, side, 3).permute(0, 2, 4, 1, 3)
    return grid.reshape(rows * columns, 3, side, side)[:count].contiguous()
