"""Writing samples: a PNG grid with the recipe in its text metadata, or a safetensors tensor.

Both are written atomically. Samples arrive in the data range [-1, 1] and are stored in [0, 1].
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from diffplug.atomic import atomic_path
from diffplug.errors import UserError

SUFFIXES = {".png": "a grid", ".safetensors": "the tensor"}
MIN_CELL = 32


def check_output_path(
    path: str | os.PathLike[str],
    overwrite: bool,
    suffixes: dict[str, str] | None = None,
) -> Path:
    """Refuse a bad output path before any work is done. ``suffixes`` maps the extensions a
    command writes to what each holds (default: a samples grid or tensor)."""
    path = Path(path)
    suffixes = suffixes or SUFFIXES
    if path.suffix.lower() not in suffixes:
        kinds = " or ".join(f"{ext} ({what})" for ext, what in suffixes.items())
        raise UserError(
            f"output {path}: unknown extension {path.suffix or '(none)'!r}; use {kinds}"
        )
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"output {path}: directory {parent} does not exist")
    if path.is_dir():
        raise UserError(f"output {path} is a directory")
    if path.exists() and not overwrite:
        raise UserError(f"output {path} exists; pass --overwrite to replace it")
    if not os.access(parent, os.W_OK):
        raise UserError(f"output {path}: directory {parent} is not writable")
    return path


def to_unit(samples: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], float32, on the CPU."""
    return ((samples.detach().float().cpu() + 1) / 2).clamp(0, 1)


def grid(images: torch.Tensor, ncols: int | None = None, min_cell: int = MIN_CELL) -> torch.Tensor:
    """(N, C, H, W) in [0, 1] -> one (C, H', W') image, cells upscaled (nearest) to >= min_cell."""
    n, c, h, w = images.shape
    scale = max(1, math.ceil(min_cell / min(h, w)))
    if scale > 1:
        images = images.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    pad = 2
    H, W = images.shape[2], images.shape[3]
    canvas = torch.ones(c, nrows * (H + pad) + pad, ncols * (W + pad) + pad)
    for k in range(n):
        r, q = divmod(k, ncols)
        y, x = pad + r * (H + pad), pad + q * (W + pad)
        canvas[:, y : y + H, x : x + W] = images[k]
    return canvas


def write_samples(
    samples: torch.Tensor, path: str | os.PathLike[str], recipe: dict[str, Any]
) -> None:
    """Write samples (data range) as a PNG grid or a safetensors file, atomically."""
    path = Path(path)
    unit = to_unit(samples)
    text = json.dumps(recipe, sort_keys=True)
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import save_file

        with atomic_path(path) as tmp:
            save_file(
                {"samples": unit.contiguous()}, os.fspath(tmp), metadata={"diffplug.recipe": text}
            )
        return
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    canvas = grid(unit)
    array = (canvas * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    mode = "L" if array.shape[2] == 1 else "RGB"
    image = Image.fromarray(array[:, :, 0] if mode == "L" else array, mode=mode)
    info = PngInfo()
    info.add_text("diffplug.recipe", text)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)


def read_recipe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The recipe stored in a PNG or safetensors output."""
    path = Path(path)
    if path.suffix.lower() == ".png":
        from PIL import Image

        with Image.open(path) as im:
            return json.loads(im.text["diffplug.recipe"])  # type: ignore[attr-defined]
    from diffplug.checkpoint import read_header

    _, meta = read_header(path)
    return json.loads(meta["diffplug.recipe"])
