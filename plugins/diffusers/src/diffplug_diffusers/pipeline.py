"""A whole Stable Diffusion-family pipeline folder as one self-contained diffplug checkpoint.

``model_index.json`` names the parts: the UNet becomes the ``diffusers-unet`` denoiser; the
VAE the ``kl-vae`` autoencoder and the text encoder(s) with their tokenizer(s) the ``clip``
(SD 1.x / 2.x) or ``clip-sdxl`` (SDXL) conditioner, each found through the registry (this
plugin imports no other). Their weights go into the denoiser's file under ``autoencoder.``
and ``conditioner.``, their configs (the tokenizer files' text too) into its metadata, so
the file alone rebuilds the pipeline. The scheduler config gives the process and the
defaults a run starts from (``extra["sampling"]``: diffusers' scheduler and its options, 50
steps, guidance 7.5). Weights are read from safetensors only; the SHA-256 of every source
weight file is kept (``extra["diffusers"]["sha256"]``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffplug import CheckpointError, UserError, default_registry, pickle_files, read_header
from diffplug_diffusers.unet import (
    DiffusersUNet,
    _read_json,
    load_unet,
    read_folder,
    resolve_process,
)

#: the pipelines whose parts this import understands, by ``_class_name``
PIPELINES = (
    "StableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
    "StableDiffusionXLPipeline",
    "StableDiffusionXLImg2ImgPipeline",
    "StableDiffusionXLInpaintPipeline",
)
#: the stem of each part's weights file
STEMS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model",
         "text_encoder": "model", "text_encoder_2": "model"}  # fmt: skip
DEFAULT_STEPS, DEFAULT_GUIDANCE = 50, 7.5


@dataclass
class Bundle:
    """A pipeline ready to save: the denoiser, every tensor of the file, its metadata."""

    model: DiffusersUNet
    tensors: dict[str, torch.Tensor]
    extra: dict[str, Any]


def is_pipeline(root: Path) -> bool:
    """A folder with the parts of a text-to-image latent pipeline (not a UNet-only one)."""
    return any((root / part).is_dir() for part in ("vae", "text_encoder", "text_encoder_2"))


def read_pipeline(
    root: str | Path,
    *,
    variant: str | None = None,
    prediction: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> Bundle:
    """The whole pipeline at ``root``, checked (safetensors only) and loaded; ``prediction``
    and ``overrides`` (VP options) win over its scheduler config, as for a UNet folder."""
    root = Path(root)
    index_file = root / "model_index.json"
    if not index_file.is_file():
        raise UserError(
            f"{root}: no model_index.json, so not a diffusers pipeline folder (a pipeline's "
            "save_pretrained writes one beside unet/, vae/, text_encoder/, ...)"
        )
    index = _read_json(index_file)
    name = str(index.get("_class_name", ""))
    if name not in PIPELINES:
        raise UserError(
            f"{root}: a {name or 'pipeline of unknown class'}; diffplug imports "
            f"{', '.join(PIPELINES)}"
        )
    sdxl = "text_encoder_2" in index and index["text_encoder_2"][0] is not None
    if sdxl and index.get("requires_aesthetics_score"):
        raise UserError(f"{root}: an SDXL refiner (aesthetic-score conditioning) is not supported")
    parts = ["unet", "vae", "text_encoder"] + ["text_encoder_2"] * sdxl
    if sdxl and (index.get("text_encoder") or [None])[0] is None:
        raise UserError(f"{root}: an SDXL pipeline with one text encoder is not supported")
    files = [(part, f) for part in parts for f in weight_files(root / part, STEMS[part], variant)]
    digests = {f"{part}/{f.name}": sha256(f) for part, f in files}

    found = read_folder(root, variant=variant)
    kind, process, note = resolve_process(found.scheduler_config, prediction, overrides)
    vae = _autoencoder(root / "vae", variant)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    unet = load_unet(found)
    side = int(unet.config.sample_size) * factor  # the pipeline's default image side
    time_ids = [side, side, 0, 0, side, side] if sdxl else None
    model = DiffusersUNet.from_unet(unet, prediction=kind, process=process, time_ids=time_ids)
    entry, conditioner = (_sdxl_text if sdxl else _text)(root, index)
    tensors = {**model.state_dict()}
    tensors.update({f"conditioner.{k}": v for k, v in conditioner.state_dict().items()})
    tensors.update({f"autoencoder.{k}": v for k, v in vae.state_dict().items()})
    vae_entry = _entry("autoencoder", "kl-vae")
    extra = {
        "conditioner": {"plugin": entry.dist, "name": entry.name, "weights": True,
                        "config": dataclasses.asdict(conditioner.config)},
        "autoencoder": {"source": "(this file)", "plugin": vae_entry.dist, "weights": True,
                        "name": vae_entry.name, "config": dataclasses.asdict(vae.config)},
        "guidance": DEFAULT_GUIDANCE,
        "sampling": sampling_defaults(found.scheduler_config),
        "diffusers": {**found.extra()["diffusers"], "pipeline": name, "sha256": digests},
    }  # fmt: skip
    if note:
        extra["diffusers"]["note"] = note
    return Bundle(model, tensors, extra)


def weight_files(folder: Path, stem: str, variant: str | None = None) -> list[Path]:
    """A part's safetensors weights (one file or an index's shards), headers checked; a part
    whose weights are pickles only is refused, never loaded."""
    if not folder.is_dir():
        raise UserError(f"{folder}: missing (model_index.json names it)")
    name = f"{stem}.{variant}" if variant else stem
    single, index = folder / f"{name}.safetensors", folder / f"{name}.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        files = sorted({folder / f for f in _read_json(index).get("weight_map", {}).values()})
    else:
        pickles = pickle_files(folder)
        if pickles:
            raise CheckpointError(
                f"{folder}: pickled weights ({', '.join(pickles)}), which can run code when "
                "loaded; convert to safetensors where you trust them (from_pretrained, then "
                "save_pretrained(safe_serialization=True)); diffplug never loads pickles"
            )
        raise UserError(f"{folder}: no {name}.safetensors")
    for f in files:
        read_header(f)
    return files


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sampling_defaults(scheduler_config: dict[str, Any] | None) -> dict[str, Any]:
    """The run the pipeline's own scheduler makes: diffplug's ``diffusers`` sampler with that
    class and its options (betas and T come from the model), 50 steps, guidance 7.5."""
    from diffplug_diffusers.scheduler import PROCESS_KEYS, scheduler_class

    config = dict(scheduler_config or {"_class_name": "PNDMScheduler"})
    cls = scheduler_class(str(config.get("_class_name", "")))
    params = set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
    options = {k: v for k, v in sorted(config.items())
               if k in params and k not in PROCESS_KEYS}  # fmt: skip
    return {
        "sampler": "diffusers",
        "options": {"scheduler_class": cls.__name__, "scheduler_options": json.dumps(options)},
        "steps": DEFAULT_STEPS,
        "guidance": DEFAULT_GUIDANCE,
    }


def _entry(kind: str, name: str) -> Any:
    try:
        return default_registry().get(kind, name)
    except UserError as exc:
        raise UserError(f"importing a whole pipeline needs {kind} {name!r}: {exc}") from None


def _autoencoder(folder: Path, variant: str | None) -> Any:
    """The VAE as ``kl-vae`` (diffusers' AutoencoderKL layout, loaded strictly)."""
    (weights,) = weight_files(folder, STEMS["vae"], variant)[:1]
    cls = _entry("autoencoder", "kl-vae").load()
    return cls.from_diffusers(weights, folder / "config.json").eval()


def _text(root: Path, index: dict[str, Any]) -> tuple[Any, Any]:
    """SD 1.x / 2.x: one CLIP text encoder, its last hidden state (diffusers' folders of SD 2
    keep 23 of OpenCLIP's 24 layers, so the last is the original's penultimate)."""
    entry = _entry("conditioner", "clip")
    cond = entry.load().from_folders(root / "text_encoder", root / "tokenizer")
    return entry, cond


def _sdxl_text(root: Path, index: dict[str, Any]) -> tuple[Any, Any]:
    """SDXL: both encoders, the second with its pooled projection."""
    clip = _entry("conditioner", "clip").load()
    first = clip.from_folders(root / "text_encoder", root / "tokenizer")
    second = clip.from_folders(root / "text_encoder_2", root / "tokenizer_2", pooled=True)
    entry = _entry("conditioner", "clip-sdxl")
    cls = entry.load()
    zero_null = bool(index.get("force_zeros_for_empty_prompt", True))
    config = cls.Config(first=dataclasses.asdict(first.config),
                        second=dataclasses.asdict(second.config), zero_null=zero_null)  # fmt: skip
    cond = cls(config)
    cond.first.encoder.load_state_dict(first.encoder.state_dict())
    cond.second.encoder.load_state_dict(second.encoder.state_dict())
    return entry, cond.eval()
