"""img2img's and inpainting's inputs: init images and masks, one per sample, checked.

``--init-image`` and ``--mask`` take one image (for every sample), a folder (its k-th image,
in sorted order, goes to sample k), or a ``.safetensors`` of samples as ``diffplug run``
writes them (row k to sample k). Images are not resized: one of another size than the model
makes is refused with both sizes, since a silent resize would blur the known region that
inpainting promises to keep. A folder or file with fewer images than samples is refused with
both counts (extra images are left unused).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffplug.data import IMAGE_SUFFIXES
from diffplug.errors import UserError

#: what ``--init-image`` / ``--mask`` / ``init=`` / ``mask=`` accept
Source = str | os.PathLike[str] | torch.Tensor | Any


@dataclass(frozen=True)
class Init:
    """What a draw starts from: one init image per sample and, for inpainting, its mask.

    ``images`` (N, C, H, W) are in [-1, 1] at the model's image size; ``mask`` (N, 1, H, W)
    is 1 where the sample is regenerated and 0 where the init is kept. ``strength`` in
    (0, 1] is how much of the plan runs (``diffplug.plan.kept_steps``); ``repaint`` is the
    number of RePaint resamplings per step (inpainting only)."""

    images: torch.Tensor
    strength: float = 1.0
    mask: torch.Tensor | None = None
    repaint: int = 0
    #: how the recipe names the init and the mask (``describe``)
    names: tuple[str, str | None] = ("", None)
    #: the image of the source each sample took (None: sample k took image k)
    index: tuple[int, ...] | None = None

    def rows(self, start: int, size: int) -> Init:
        """The init of samples ``start .. start + size - 1``."""
        mask = None if self.mask is None else self.mask[start : start + size]
        return dataclasses.replace(self, images=self.images[start : start + size], mask=mask)

    def record(self) -> dict[str, Any]:
        """What a recipe keeps: where the init (and mask) came from, per sample, how strong."""
        n = len(self.images)
        out: dict[str, Any] = {"init_image": self.names[0], "strength": self.strength,
                               "init_index": list(self.index or range(n))}  # fmt: skip
        if self.mask is not None:
            out.update(mask=self.names[1], repaint=self.repaint)
        return out


def check_strength(strength: Any) -> float:
    """``strength`` as a float in (0, 1], else a one-line refusal."""
    if isinstance(strength, bool) or not isinstance(strength, int | float):
        raise UserError(f"strength must be a number in (0, 1]; got {strength!r}")
    if not 0 < strength <= 1:  # NaN too
        raise UserError(f"strength must be in (0, 1] (1: the whole plan); got {strength!r}")
    return float(strength)


def check_repaint(repaint: Any) -> int:
    if isinstance(repaint, bool) or not isinstance(repaint, int) or not 0 <= repaint <= 100:
        raise UserError(f"repaint must be a whole number from 0 to 100; got {repaint!r}")
    return repaint


def load_images(
    source: Source, n: int, shape: Sequence[int], what: str = "--init-image",
    index: Sequence[int] | None = None,
) -> torch.Tensor:  # fmt: skip
    """(n, C, H, W) in [-1, 1] for ``n`` samples of images of ``shape`` (C, H, W): a path
    (an image, a folder, a samples ``.safetensors``), a PIL image, or a tensor in [0, 1]
    ((C, H, W) for all, or (N, C, H, W), as ``Samples.tensor``). ``index`` picks which
    image each sample takes (a replayed sample of a folder-fed run)."""
    channels, height, width = (int(v) for v in shape)
    unit = _unit_images(source, channels, what)
    if unit.shape[-2:] != (height, width) or unit.shape[1] != channels:
        got = f"{unit.shape[-1]}x{unit.shape[-2]}"
        raise UserError(
            f"{what} {_name(source)}: {got} with {unit.shape[1]} channel(s), but the model "
            f"makes {width}x{height} images with {channels}; resize it first"
        )
    return _per_sample(unit, n, what, source, index) * 2 - 1


def load_masks(
    source: Source, n: int, size: Sequence[int], index: Sequence[int] | None = None
) -> torch.Tensor:
    """(n, 1, H, W) masks, 1 = regenerate (white), 0 = keep (black), binarised at 1/2 as
    diffusers does; forms as ``load_images`` (colour masks are read as grey)."""
    height, width = (int(v) for v in size)
    unit = _unit_images(source, 1, "--mask")
    if unit.shape[1] != 1:
        unit = unit.mean(1, keepdim=True)
    if unit.shape[-2:] != (height, width):
        raise UserError(
            f"--mask {_name(source)}: {unit.shape[-1]}x{unit.shape[-2]}, but the init image "
            f"is {width}x{height}; give a mask of the image's size"
        )
    return (_per_sample(unit, n, "--mask", source, index) >= 0.5).float()


def _per_sample(
    unit: torch.Tensor, n: int, what: str, source: Source, index: Sequence[int] | None
) -> torch.Tensor:
    """One row per sample: a single image for all, else row k for sample k."""
    if unit.shape[0] == 1 and not _is_collection(source):
        return unit.expand(n, *unit.shape[1:]).clone()
    if index is not None:
        if max(index, default=0) >= unit.shape[0]:
            raise UserError(f"{what} {_name(source)}: holds {unit.shape[0]} images; the "
                            f"recipe used image {max(index)}")  # fmt: skip
        return unit[list(index)]
    if unit.shape[0] < n:
        raise UserError(
            f"{what} {_name(source)}: {unit.shape[0]} image(s) for {n} samples (image k goes "
            "to sample k); give one per sample, or a single image for all"
        )
    return unit[:n]


def _is_collection(source: Source) -> bool:
    """A folder or samples file: row k is sample k even when it holds one."""
    if isinstance(source, torch.Tensor):
        return source.ndim == 4
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        return path.is_dir() or path.suffix.lower() == ".safetensors"
    return False


def _unit_images(source: Source, channels: int, what: str) -> torch.Tensor:
    """(N, C, H, W) float32 in [0, 1] from any accepted form."""
    if isinstance(source, torch.Tensor):
        x = source.detach().float().cpu()
        x = x.unsqueeze(0) if x.ndim == 3 else x
        x = x.unsqueeze(0).unsqueeze(0) if x.ndim == 2 else x
        if x.ndim != 4 or x.shape[0] == 0:
            raise UserError(f"{what}: a tensor (C, H, W) or (N, C, H, W); got {tuple(x.shape)}")
        _check_range(x, what, "tensor")
        return x
    if not isinstance(source, str | os.PathLike):
        return _from_pil(source, channels, what, "image").unsqueeze(0)
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise UserError(f"{what} {path}: no images in the folder")
        images = [_read(file, channels, what) for file in files]
        sizes = {tuple(im.shape) for im in images}
        if len(sizes) > 1:
            raise UserError(f"{what} {path}: the images differ in size ({sorted(sizes)})")
        return torch.stack(images)
    if not path.is_file():
        raise UserError(f"{what} {path}: no such file or folder")
    if path.suffix.lower() == ".safetensors":
        return _samples_file(path, what)
    return _read(path, channels, what).unsqueeze(0)


def _read(path: Path, channels: int, what: str) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return _from_pil(im, channels, what, path)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
        raise UserError(
            f"{what} {path}: not an image PIL can read (give a PNG or JPEG, a folder of them, "
            "or a samples .safetensors)"
        ) from None


def _from_pil(image: Any, channels: int, what: str, name: Any) -> torch.Tensor:
    """(C, H, W) in [0, 1] from a PIL image, as grey (L) or RGB."""
    if not hasattr(image, "convert"):
        raise UserError(f"{what}: give a path, a PIL image or a tensor; got {type(image).__name__}")
    im = image.convert("L" if channels == 1 else "RGB")
    data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    return data.view(im.height, im.width, -1).permute(2, 0, 1).float() / 255


def _samples_file(path: Path, what: str) -> torch.Tensor:
    from diffplug.checkpoint import load_tensors

    try:
        samples = load_tensors(path).get("samples")
    except UserError as exc:
        raise UserError(f"{what} {path}: {exc}") from None
    if samples is None or samples.ndim != 4 or samples.shape[0] == 0:
        raise UserError(
            f"{what} {path}: needs a 'samples' tensor (N, C, H, W) with N >= 1, as "
            "`diffplug run -o FILE.safetensors` writes"
        )
    samples = samples.float()
    _check_range(samples, what, path)
    return samples


def _check_range(x: torch.Tensor, what: str, name: Any) -> None:
    if not bool(torch.isfinite(x).all()) or x.min() < 0 or x.max() > 1:
        raise UserError(f"{what} {name}: values must be finite and in [0, 1]")


def _name(source: Source) -> str:
    return os.fspath(source) if isinstance(source, str | os.PathLike) else "(given)"


def describe(source: Source) -> str:
    """How a recipe names an input: its path, or that it cannot be replayed."""
    if isinstance(source, str | os.PathLike):
        return os.fspath(source)
    return "(given in Python: not replayable)"


__all__ = ["Init", "check_repaint", "check_strength", "describe", "load_images", "load_masks"]
