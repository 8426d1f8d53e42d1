"""Writing samples: a PNG grid with the recipe in its text metadata, a safetensors tensor,
or a folder of one PNG per sample.

All are written atomically. Samples arrive in the data range [-1, 1] and are stored in [0, 1].
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from diffplug.atomic import atomic_path, remove_stale
from diffplug.errors import UserError
from diffplug.parameters import parameters

SUFFIXES = {".png": "a grid", ".safetensors": "the tensor"}
MIN_CELL = 32


def is_folder_target(path: str | os.PathLike[str]) -> bool:
    """A path meant as a folder of PNGs: it ends in a separator, is an existing folder, or
    has no extension (``pathlib`` drops a trailing ``/``)."""
    text = os.fspath(path)
    return text.endswith(("/", os.sep)) or Path(text).is_dir() or not Path(text).suffix


def check_output_path(
    path: str | os.PathLike[str],
    overwrite: bool,
    suffixes: dict[str, str] | None = None,
    folders: bool = False,
) -> Path:
    """Refuse a bad output path before any work is done. ``suffixes`` maps the extensions a
    command writes to what each holds (default: a samples grid or tensor); with ``folders``
    a folder target (``DIR/``) is accepted too, refused if it holds files. Temporary files a
    killed write of this target left behind are removed first (one stderr line)."""
    if folders and is_folder_target(path):
        return _check_folder(Path(path), overwrite)
    path = Path(path)
    suffixes = suffixes or SUFFIXES
    if path.suffix.lower() not in suffixes:
        kinds = " or ".join(f"{ext} ({what})" for ext, what in suffixes.items())
        folder = " or DIR/ (one PNG per sample)" if folders else ""
        raise UserError(
            f"output {path}: unknown extension {path.suffix or '(none)'!r}; use {kinds}{folder}"
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
    if _writer():
        target = Path(os.path.realpath(path))
        remove_stale(target.parent, target.name)
    return path


def _check_folder(path: Path, overwrite: bool) -> Path:
    if path.exists() and not path.is_dir():
        raise UserError(f"output {path}/ exists and is not a directory")
    parent = path.parent if str(path.parent) else Path(".")
    if not path.exists() and not parent.is_dir():
        raise UserError(f"output {path}/: directory {parent} does not exist")
    if path.is_dir() and _writer():
        remove_stale(path)  # a killed earlier write's temporary files do not make it full
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise UserError(f"output {path}/ is not empty; pass --overwrite to write into it")
    if not os.access(path if path.is_dir() else parent, os.W_OK):
        raise UserError(f"output {path}/ is not writable")
    return path


def _writer() -> bool:
    """Whether this process writes outputs (rank 0 of a torchrun job, or a lone process)."""
    return os.environ.get("RANK", "0") == "0"


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
    """Write samples (data range) as a PNG grid or a safetensors file, atomically; a grid's
    A1111 ``parameters`` are its first sample's (A1111's grids say the same)."""
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
    size = (unit.shape[-1], unit.shape[-2])
    _write_png(grid(unit), path, text, parameters(recipe, size))


def to_pil(image: torch.Tensor) -> Any:
    """One (C, H, W) image in [0, 1] as a PIL image (L or RGB)."""
    from PIL import Image

    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)


def _write_png(image: torch.Tensor, path: Path, recipe_text: str, params: str) -> None:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("diffplug.recipe", recipe_text)
    info.add_text("parameters", params)  # as A1111 writes it (iTXt when not Latin-1)
    with atomic_path(path) as tmp:
        to_pil(image).save(tmp, format="PNG", pnginfo=info)


def save_folder(images: torch.Tensor, folder: Path, recipes: list[dict[str, Any]]) -> None:
    """One PNG per sample (``00000.png``...), each written atomically with its own recipe
    and A1111 ``parameters``."""
    folder.mkdir(exist_ok=True)
    for k, (image, recipe) in enumerate(zip(images, recipes, strict=True)):
        size = (image.shape[-1], image.shape[-2])
        _write_png(image.float(), folder / f"{k:05d}.png", json.dumps(recipe, sort_keys=True),
                   parameters(recipe, size))  # fmt: skip


def read_recipe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The recipe stored in a PNG or safetensors output."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe {path}: no such file")
    try:
        if path.suffix.lower() == ".png":
            from PIL import Image

            with Image.open(path) as im:
                text = im.text["diffplug.recipe"]  # type: ignore[attr-defined]
        elif path.suffix.lower() == ".safetensors":
            from diffplug.checkpoint import read_header

            text = read_header(path)[1]["diffplug.recipe"]
        else:
            raise UserError(f"recipe {path}: give a .png or .safetensors output of diffplug run")
        recipe = json.loads(text)
    except (KeyError, OSError, ValueError, SyntaxError):
        raise UserError(
            f"recipe {path}: holds no diffplug recipe (not written by diffplug run)"
        ) from None
    if not isinstance(recipe, dict):
        raise UserError(f"recipe {path}: malformed recipe")
    return recipe
