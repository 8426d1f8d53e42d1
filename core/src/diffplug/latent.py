"""Latent diffusion's bookkeeping: which autoencoder a denoiser's space belongs to.

A denoiser trained on an autoencoder's latents records that autoencoder (where it came from,
its config and a fingerprint of its weights) in its checkpoint; sampling loads it back and
decodes, and refuses another autoencoder, whose latents would mean something else.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import torch

from diffplug.components import Autoencoder, Denoiser
from diffplug.errors import CheckpointError, IncompatibleError


def fingerprint(autoencoder: Autoencoder) -> str:
    """SHA-256 of the weights (names, dtypes, shapes, bytes): equal exactly when the latents
    mean the same thing."""
    digest = hashlib.sha256()
    for name, value in sorted(autoencoder.state_dict().items()):
        tensor = value.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def autoencoder_record(autoencoder: Autoencoder, source: str) -> dict[str, Any]:
    """What a latent denoiser's checkpoint keeps: ``source`` is the pretrained name or path
    the autoencoder was loaded from."""
    from diffplug.checkpoint import identify

    plugin, name = identify(autoencoder, "autoencoder")
    return {
        "source": source,
        "plugin": plugin,
        "name": name,
        "config": dataclasses.asdict(autoencoder.config)
        if dataclasses.is_dataclass(autoencoder.config)
        else {},
        "sha256": fingerprint(autoencoder),
    }


def load_autoencoder(source: str, registry: Any = None, device: str | torch.device = "cpu") -> Any:
    """An autoencoder from a pretrained name or a .safetensors checkpoint path."""
    from diffplug.checkpoint import load_component
    from diffplug.registry import default_registry
    from diffplug.resolve import is_path

    registry = registry or default_registry()
    if is_path(source):
        if not Path(source).is_file():
            raise CheckpointError(f"autoencoder {source}: no such checkpoint file")
        path = source
    else:
        path = registry.get("pretrained", source).load()
    ae = load_component(path, kind="autoencoder", registry=registry, device=device)
    return ae


def encode_dataset(autoencoder: Autoencoder, data: Any, batch_size: int = 256) -> Any:
    """The dataset in the autoencoder's space: latents of every image, labels kept. Encoded
    once before training (deterministically, by the autoencoder's ``encode``), so a latent
    model trains as fast as a pixel one of the latent's size."""
    from diffplug.data import Dataset

    autoencoder.eval()
    with torch.no_grad():
        latents = torch.cat([autoencoder.encode(data.images[i : i + batch_size])
                             for i in range(0, len(data.images), batch_size)])  # fmt: skip
    return Dataset(latents.float(), data.labels)


def recorded_autoencoder(denoiser: Denoiser, registry: Any = None, check: bool = True) -> Any:
    """The autoencoder a latent denoiser was trained with (None for a pixel-space model),
    loaded on the denoiser's device and (unless the caller checks later, as ``prepare``
    does) checked against its fingerprint."""
    record = getattr(denoiser, "checkpoint_extra", {}).get("autoencoder")
    if record is None:
        return None
    param = next(denoiser.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    from diffplug.registry import default_registry
    from diffplug.resolve import recorded_name

    registry = registry or default_registry()
    try:
        ae = load_autoencoder(recorded_name(registry, record["source"]), registry, device)
    except Exception as exc:  # name it as the model's dependency, whatever went wrong
        raise CheckpointError(
            f"the model works in the latents of autoencoder {record['source']!r}, which "
            f"cannot be loaded: {exc}"
        ) from None
    if check:
        check_autoencoder(denoiser, ae)
    return ae


def is_pixel_space(autoencoder: Autoencoder | None) -> bool:
    """No autoencoder, or the identity one: the denoiser works on images directly."""
    return autoencoder is None or getattr(autoencoder, "is_identity", False)


def check_autoencoder(denoiser: Denoiser, autoencoder: Autoencoder | None) -> None:
    """Refuse a pixel model under an autoencoder, a latent model without its own, or latents
    of the wrong shape."""
    record = getattr(denoiser, "checkpoint_extra", {}).get("autoencoder")
    pixel = is_pixel_space(autoencoder)
    if record is None:
        if not pixel:
            raise IncompatibleError(
                "the denoiser works in pixel space, but an autoencoder was given: its latents "
                "are not images the model has seen"
            )
        return
    if pixel:
        raise IncompatibleError(
            f"the denoiser works in the latent space of autoencoder {record['source']!r}; "
            "sample it with that autoencoder (diffplug run loads it from the checkpoint)"
        )
    assert autoencoder is not None
    if fingerprint(autoencoder) != record["sha256"]:
        raise IncompatibleError(
            f"the denoiser was trained in the latents of autoencoder {record['source']!r} "
            "(weights fingerprint differs): another autoencoder's latents mean something else"
        )
    from diffplug.errors import UserError

    try:
        image = autoencoder.image_shape(denoiser.sample_shape)
        latent = tuple(autoencoder.latent_shape(image))
    except UserError as exc:
        raise IncompatibleError(
            f"the denoiser's samples are not this autoencoder's latents: {exc}"
        ) from None
    if latent != tuple(denoiser.sample_shape):
        raise IncompatibleError(
            f"the autoencoder's latents for {image} images have shape {latent}, the "
            f"denoiser's are {tuple(denoiser.sample_shape)}"
        )
