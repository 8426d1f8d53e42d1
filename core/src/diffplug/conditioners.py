"""Core's conditioners beyond ``none``: a low-resolution image, for super-resolution.

The image-conditioning contract every plugin shares: ``cond["image"]`` (B, C, h, w) in
[-1, 1], and optionally ``cond["aug_level"]`` (B,) in [0, 1], how strongly the image was
corrupted by noise-conditioning augmentation (absent: 0, a clean image).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffplug.components import Cond, Conditioner
from diffplug.data import resize
from diffplug.errors import UserError
from diffplug.options import option

AUG_LEVEL = "aug_level"


@dataclass
class LowResConfig:
    # ``low_size``, not ``size``: ``diffplug train --size`` is already the model's side
    low_size: int = option(8, "side of the low-resolution condition image", min=1)
    channels: int = option(1, "channels of the condition image (the data's)", min=1)
    image_size: int = option(
        0,
        "side the training images had (train sets it from --size): sampling inputs are brought "
        "to it before shrinking, as training images were (0: shrink directly)",
        min=0,
    )


class LowResConditioner(Conditioner):
    """A low-resolution image, ``{"image": (B, channels, low_size, low_size)}`` in [-1, 1].

    Inputs of any size take the training images' path: resized to ``image_size`` (as the
    data loader resized every training image; an 8x8 digit becomes the blurred 32x32 the model
    was trained on), then shrunk to ``low_size`` with ``diffplug.data.resize``, so any input
    gives exactly the condition its training twin had. Without that round trip a sharp 8x8
    sample (a base model's) is a condition no training image ever produced.
    """

    Config = LowResConfig
    kind = "image"
    _anchor: torch.Tensor

    def __init__(self, config: LowResConfig | None = None) -> None:
        super().__init__(config)
        # no weights, but ``.to(device)`` must still decide where conditions are made
        self.register_buffer("_anchor", torch.zeros(0), persistent=False)

    def forward(self, inputs: Sequence[Any]) -> Cond:
        cfg = self.config
        null = torch.zeros(cfg.channels, cfg.low_size, cfg.low_size, device=self._anchor.device)
        images = []
        for k, item in enumerate(inputs):
            if item is None:
                images.append(null)
                continue
            if (
                not isinstance(item, torch.Tensor)
                or item.ndim != 3
                or item.shape[0] != cfg.channels
            ):
                got = tuple(item.shape) if isinstance(item, torch.Tensor) else type(item).__name__
                raise UserError(
                    f"lowres conditioner: input {k} must be a ({cfg.channels}, h, w) tensor in "
                    f"[-1, 1] or None; got {got}"
                )
            image = item.to(device=null.device, dtype=torch.float32)
            if cfg.image_size:
                image = resize(image[None], cfg.image_size)[0]
            images.append(resize(image[None], cfg.low_size)[0])
        return {"image": torch.stack(images)}

    def from_data(
        self, x0: torch.Tensor, generator: torch.Generator, labels: torch.Tensor | None = None
    ) -> Cond:
        """The clean batch shrunk to ``low_size``: the model learns to undo exactly that."""
        if x0.ndim != 4 or x0.shape[1] != self.config.channels:
            raise UserError(
                f"lowres conditioner: made for {self.config.channels}-channel images, but the "
                f"training batch has shape {tuple(x0.shape)} (set its channels to the data's)"
            )
        return {"image": resize(x0, self.config.low_size)}


def build_conditioner(
    registry: Any, name: str, options: dict[str, Any], inherited: dict[str, Any]
) -> Conditioner:
    """The conditioner ``--conditioner NAME`` asks for, built from its ``options`` over the
    ``inherited`` values (the data's or the model's shape: channels, sizes) it declares."""
    from diffplug.options import build_config, describe

    entry = registry.get("conditioner", name)
    cls = entry.load()
    known = {o.name for o in describe(cls.Config)}
    given = {k: v for k, v in inherited.items() if k in known and v}
    conditioner = entry.construct(
        build_config(cls.Config, {**given, **options}, owner=f"conditioner {entry.name!r}"),
        cls=cls,
    )
    conditioner.name = entry.name
    return conditioner


def recorded_conditioner(denoiser: Any, registry: Any = None) -> Conditioner | None:
    """The conditioner a checkpoint's training recorded (``extra["conditioner"]``).

    Image-conditional models saved without a record get ``lowres`` at its defaults with the
    model's channels; unconditional ones get None.
    """
    from diffplug.errors import CheckpointError, UnknownComponentError
    from diffplug.options import build_config
    from diffplug.registry import default_registry

    registry = registry or default_registry()
    record = getattr(denoiser, "checkpoint_extra", {}).get("conditioner")
    if record is None:
        if denoiser.conditioning != "image":
            return None
        record = {"plugin": "", "name": "lowres", "config": {"channels": denoiser.config.channels}}
    name = f"{record['plugin']}:{record['name']}" if record.get("plugin") else record["name"]
    try:
        entry = registry.get("conditioner", name)
    except UnknownComponentError:
        raise CheckpointError(
            f"the model was trained with conditioner {record['name']!r} from "
            f"{record.get('plugin') or 'an unknown plugin'}, which is not installed"
        ) from None
    cls = entry.load()
    config = build_config(cls.Config, record["config"], owner=f"conditioner {entry.name!r}")
    conditioner = entry.construct(config, cls=cls)
    conditioner.name = entry.name
    if record.get("weights"):  # trained with the model: its weights are in the model's file
        state = getattr(denoiser, "conditioner_state", None)
        if state is None:
            raise CheckpointError(
                f"the model's conditioner {record['name']!r} was trained with it, but the "
                "checkpoint has no conditioner weights"
            )
        try:
            conditioner.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"the model's conditioner weights do not fit: {exc}") from None
    conditioner.eval()
    param = next(denoiser.parameters(), None)
    if param is not None:
        conditioner.to(param.device)
    return conditioner


def load_condition_images(path: str | os.PathLike[str], size: int, channels: int) -> list[Any]:
    """Condition images (C, h, w) in [-1, 1] from a folder or a ``diffplug run`` .safetensors.

    A folder is read as training data is (centre crop, resize to ``size``), so the conditioner
    then shrinks it exactly as it shrank the training images.
    """
    from diffplug.data import image_folder

    root = Path(path)
    if root.is_dir():
        try:
            return list(image_folder(root, size, channels).images)
        except UserError as exc:
            raise UserError(f"--condition-images: {exc}") from None
    if root.suffix.lower() != ".safetensors" or not root.is_file():
        raise UserError(
            f"--condition-images {root}: not a folder of images or a .safetensors file of samples"
        )
    from diffplug.checkpoint import load_tensors

    samples = load_tensors(root).get("samples")
    if samples is None or samples.ndim != 4 or samples.shape[0] == 0:
        raise UserError(
            f"--condition-images {root}: needs a 'samples' tensor (N, C, H, W) with N >= 1, "
            "as `diffplug run -o FILE.safetensors` writes"
        )
    if samples.shape[1] != channels:
        raise UserError(
            f"--condition-images {root}: {samples.shape[1]}-channel samples for a "
            f"{channels}-channel condition"
        )
    samples = samples.float()
    if not bool(torch.isfinite(samples).all()) or samples.min() < 0 or samples.max() > 1:
        raise UserError(f"--condition-images {root}: samples must be finite and in [0, 1]")
    return list(samples * 2 - 1)
