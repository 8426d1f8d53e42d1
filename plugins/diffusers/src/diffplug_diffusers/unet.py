"""A diffusers ``UNet2DModel`` / ``UNet2DConditionModel`` as a diffplug denoiser.

The config keeps the UNet's class name and its whole diffusers config (as in its
config.json), the prediction kind and the VP process, so a diffplug checkpoint rebuilds the
UNet with ``from_config`` and its weights from the safetensors file: no folder, no network.
``from_folder`` reads a local diffusers UNet or pipeline folder (safetensors only) and maps
its scheduler config onto diffplug's VP process.
"""

from __future__ import annotations

import importlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffplug import (
    CheckpointError,
    Cond,
    Denoiser,
    DenoiserConfig,
    IncompatibleError,
    UserError,
    option,
)

UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")
#: diffusers prediction_type -> diffplug prediction kind
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
WEIGHTS = "diffusion_pytorch_model"
#: diffusers' own scheduler defaults, used when a folder has no scheduler config.
DEFAULT_PROCESS = {
    "name": "vp",
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "rescale_zero_terminal_snr": False,
}


@dataclass
class DiffusersUNetConfig(DenoiserConfig):
    prediction: str = option("eps", "what the UNet outputs", choices=tuple(PREDICTIONS.values()))
    unet_class: str = option("UNet2DModel", "the diffusers UNet class", choices=UNET_CLASSES)
    unet_config: dict = option({}, "the UNet's diffusers config (its config.json)")
    time_ids: list[float] = option(
        [],
        "SDXL's added size conditioning: original (h, w), crop top-left (y, x), target (h, w), "
        "in pixels (import-diffusers sets the pipeline's default size, no crop)",
    )


def _diffusers() -> Any:
    return importlib.import_module("diffusers")


def unet_facts(unet_class: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """What diffplug needs to know of a UNet config (channels, size, conditioning, text
    width), or an IncompatibleError saying why diffplug cannot run it."""
    if unet_class not in UNET_CLASSES:
        raise IncompatibleError(
            f"a {unet_class}: diffplug-diffusers wraps {' and '.join(UNET_CLASSES)}"
        )
    size = cfg.get("sample_size")
    if isinstance(size, list | tuple):
        if len(size) != 2 or size[0] != size[1]:
            raise IncompatibleError(f"{unet_class} sample_size {size}: diffplug samples squares")
        size = size[0]
    if not isinstance(size, int) or size < 1:
        raise IncompatibleError(f"{unet_class} has no sample_size; diffplug needs the image size")
    channels = cfg.get("in_channels", 3 if unet_class == "UNet2DModel" else 4)
    out = cfg.get("out_channels", channels)
    # SD's inpainting layout: latents, the mask and the masked image's latents, concatenated
    inpaint = unet_class == "UNet2DConditionModel" and channels == 2 * out + 1
    if inpaint:
        channels = out
    if out not in (channels, 2 * channels):
        raise IncompatibleError(
            f"{unet_class} maps {channels} channels to {out}; a denoiser's prediction has the "
            "sample's channels (or twice that: a learned variance, which is dropped)"
        )
    time_embedding = cfg.get("time_embedding_type", "positional")
    if time_embedding == "fourier":
        raise IncompatibleError(
            f"{unet_class} with Fourier time features is a score-SDE (VE) model, not a VP one"
        )
    facts: dict[str, Any] = {
        "channels": channels,
        "size": size,
        "learned_variance": out != channels,
        "conditioning": None,
        "text_width": None,
        "integer_times": time_embedding == "learned",
        "inpaint": inpaint,
        "text_time": False,
    }
    class_embed = cfg.get("class_embed_type")
    if unet_class == "UNet2DModel":
        if class_embed is not None:
            raise IncompatibleError(
                f"UNet2DModel class_embed_type {class_embed!r} (a non-label condition) is not "
                "supported; label embeddings (num_class_embeds) are"
            )
        if cfg.get("num_class_embeds"):
            facts["conditioning"] = "class"
        return facts
    if class_embed is not None or cfg.get("num_class_embeds"):
        raise IncompatibleError(
            "UNet2DConditionModel with class embeddings (e.g. a noise-level condition) is not "
            "supported; text-conditional ones are"
        )
    added = cfg.get("addition_embed_type")
    if added not in (None, "text_time"):
        raise IncompatibleError(
            f"UNet2DConditionModel addition_embed_type {added!r} is not supported (SDXL's "
            "text_time is)"
        )
    facts["text_time"] = added == "text_time"
    hid_type = cfg.get("encoder_hid_dim_type")
    if hid_type not in (None, "text_proj"):
        raise IncompatibleError(
            f"UNet2DConditionModel encoder_hid_dim_type {hid_type!r} is not supported"
        )
    width = (
        cfg.get("encoder_hid_dim") if hid_type == "text_proj" else cfg.get("cross_attention_dim")
    )
    if isinstance(width, list | tuple):
        if len(set(width)) != 1:
            raise IncompatibleError(
                f"UNet2DConditionModel cross_attention_dim {width} varies by block"
            )
        width = width[0]
    facts["conditioning"] = "text"
    facts["text_width"] = int(width) if width is not None else 1280
    return facts


class DiffusersUNet(Denoiser):
    """A diffusers UNet called with diffplug's (x_t, t, cond)."""

    Config = DiffusersUNetConfig

    def __init__(self, config: DiffusersUNetConfig | None = None, unet: Any = None) -> None:
        super().__init__(config)
        cfg = self.config
        if not cfg.unet_config:
            raise UserError(
                "denoiser diffusers-unet is built from a diffusers UNet: use "
                "`diffplug import-diffusers FOLDER -o OUT.safetensors` or "
                "DiffusersUNet.from_folder(FOLDER)"
            )
        self.facts = unet_facts(cfg.unet_class, cfg.unet_config)
        want = {
            "channels": self.facts["channels"],
            "size": self.facts["size"],
            "conditioning": self.facts["conditioning"],
        }
        have = {k: getattr(cfg, k) for k in want}
        if have != want:
            raise IncompatibleError(
                f"diffusers-unet config {have} disagrees with its UNet's {want}"
            )
        if self.facts["text_time"] and len(cfg.time_ids) != 6:
            raise IncompatibleError(
                "an SDXL UNet (addition_embed_type text_time) needs time_ids: original (h, w), "
                f"crop (y, x), target (h, w); got {cfg.time_ids}"
            )
        #: an inpainting UNet: the loop hands it cond["mask"] and cond["masked"] and leaves
        #: the known region to it (diffplug's generation modes read this)
        self.takes_mask = bool(self.facts["inpaint"])
        if unet is None:
            unet = getattr(_diffusers(), cfg.unet_class).from_config(cfg.unet_config)
        self.unet = unet.eval()

    @classmethod
    def from_unet(
        cls,
        unet: Any,
        *,
        prediction: str = "eps",
        process: dict[str, Any] | None = None,
        time_ids: list[float] | None = None,
    ) -> DiffusersUNet:
        """Wrap an in-memory diffusers UNet (its weights are shared, not copied)."""
        unet_class = type(unet).__name__
        unet_config = plain_config(unet.config)
        facts = unet_facts(unet_class, unet_config)
        config = DiffusersUNetConfig(
            channels=facts["channels"],
            size=facts["size"],
            prediction=prediction,
            process=dict(process or DEFAULT_PROCESS),
            conditioning=facts["conditioning"],
            unet_class=unet_class,
            unet_config=unet_config,
            time_ids=list(time_ids or []),
        )
        return cls(config, unet=unet)

    @classmethod
    def from_folder(
        cls,
        path: str | os.PathLike[str],
        *,
        prediction: str | None = None,
        process: dict[str, Any] | None = None,
        variant: str | None = None,
    ) -> DiffusersUNet:
        """Load a local diffusers UNet folder or pipeline folder (safetensors weights only).

        ``prediction`` ("eps", "x0", "v") and ``process`` (VP options, e.g.
        ``{"beta_schedule": "scaled_linear"}``) override what the folder's scheduler config
        says; without a scheduler config diffusers' defaults are assumed (and warned about).
        """
        found = read_folder(path, variant=variant)
        kind, spec, note = resolve_process(found.scheduler_config, prediction, process)
        if note:
            warnings.warn(note, stacklevel=2)
        return cls.from_unet(load_unet(found), prediction=kind, process=spec)

    @classmethod
    def convert_foreign(cls, path: str | os.PathLike[str]) -> Path | None:
        """Core's hook for ``--model FOLDER``: a diffusers pipeline folder's checkpoint
        (converted once, cached), or None for what this plugin does not convert."""
        from diffplug_diffusers.foreign import convert_foreign

        return convert_foreign(Path(path))

    @property
    def text_width(self) -> int | None:
        return self.facts["text_width"]

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Cond = None) -> torch.Tensor:
        if self.facts["integer_times"]:  # an embedding table of timesteps: integers only
            ti = t.round()
            if not torch.equal(ti, t):
                raise IncompatibleError(
                    "this UNet embeds integer timesteps (time_embedding_type 'learned'); the "
                    "sampler asked for fractional ones (a bridged or sigma-space sampler)"
                )
            t = ti.long()
        if self.config.unet_class == "UNet2DModel":
            labels = None
            if self.facts["conditioning"] == "class":
                labels = (cond or {}).get("labels")
                if labels is None:
                    raise IncompatibleError("this class-conditional UNet needs cond['labels']")
            out = self.unet(x, t, class_labels=labels, return_dict=False)[0]
        else:
            text = (cond or {}).get("text")
            if text is None:
                raise IncompatibleError(
                    "this text-conditional UNet needs cond['text'] (B, L, D) from a text "
                    "conditioner"
                )
            if text.ndim != 3 or text.shape[-1] != self.text_width:
                raise IncompatibleError(
                    f"the text conditioning is {tuple(text.shape)} wide but the UNet's "
                    f"cross-attention takes width {self.text_width} (cross_attention_dim): "
                    "use a text conditioner of that width"
                )
            mask = (cond or {}).get("text_mask")
            if self.facts["inpaint"]:
                x = self._with_mask(x, cond or {})
            out = self.unet(
                x,
                t,
                encoder_hidden_states=text.to(x.dtype),
                encoder_attention_mask=mask,
                added_cond_kwargs=self._added(x, cond or {}),
                return_dict=False,
            )[0]
        if self.facts["learned_variance"]:
            out = out[:, : x.shape[1]]  # the eps half; diffplug samplers use fixed variances
        return out

    def _with_mask(self, x: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        """SD's 9-channel input: the latents, the mask (1 regenerates), the masked image's
        latents (the VAE's encoding of init * (1 - mask)), concatenated as diffusers'
        inpainting pipeline does (the latents scaled for the model, the others not)."""
        mask, masked = cond.get("mask"), cond.get("masked")
        if mask is None or masked is None:
            raise IncompatibleError(
                "this inpainting UNet (latents, mask and masked-image latents, "
                f"{self.unet.config.in_channels} input channels) needs an image and a mask to "
                "inpaint: give --init-image and --mask"
            )
        return torch.cat([x, mask.to(x), masked.to(x)], dim=1)

    def _added(self, x: torch.Tensor, cond: dict[str, Any]) -> dict[str, torch.Tensor] | None:
        """SDXL's added conditioning: the pooled text embedding and the size/crop ids."""
        if not self.facts["text_time"]:
            return None
        pooled = cond.get("pooled")
        if pooled is None:
            raise IncompatibleError(
                "this SDXL UNet needs cond['pooled'] (the second text encoder's pooled "
                "projection): use the clip-sdxl conditioner"
            )
        ids = torch.tensor(self._time_ids(x), dtype=x.dtype, device=x.device)
        return {"text_embeds": pooled.to(x.dtype), "time_ids": ids.expand(x.shape[0], -1)}

    def _time_ids(self, x: torch.Tensor) -> list[float]:
        """The recorded size ids, scaled with the latents when they are sampled at another
        size than the model's own (``--size``): the original and target sizes follow the
        image, as diffusers' default (both the requested height and width); the crop stays."""
        oh, ow, top, left, th, tw = self.config.time_ids
        sy, sx = x.shape[-2] / self.config.size, x.shape[-1] / self.config.size
        return [oh * sy, ow * sx, top, left, th * sy, tw * sx]


def plain_config(config: Any) -> dict[str, Any]:
    """A diffusers config as plain JSON data, without diffusers' private keys."""
    return json.loads(json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}))


# ------------------------------------------------------------------------------ folders


@dataclass
class Folder:
    """Where a diffusers folder keeps its UNet and (optional) scheduler config."""

    root: Path
    unet_dir: Path
    unet_class: str
    weights: list[Path]
    variant: str | None
    scheduler_config: dict[str, Any] | None

    def extra(self) -> dict[str, Any]:
        """Facts for the checkpoint's metadata (the folder's name, not its full path)."""
        return {
            "diffusers": {
                "source": self.root.name,
                "unet_class": self.unet_class,
                "scheduler_config": self.scheduler_config,
                "version": getattr(_diffusers(), "__version__", "?"),
            }
        }


def read_folder(path: str | os.PathLike[str], *, variant: str | None = None) -> Folder:
    """Find the UNet, its safetensors weights and the scheduler config; refuse pickles."""
    root = Path(path)
    if not root.exists():
        raise UserError(f"{root}: no such folder")
    if not root.is_dir():
        raise UserError(
            f"{root} is not a folder; give a diffusers UNet folder (config.json + "
            f"{WEIGHTS}.safetensors) or a pipeline folder (unet/ and scheduler/)"
        )
    if (root / "unet" / "config.json").is_file():
        unet_dir = root / "unet"
        sched_files = [root / "scheduler" / "scheduler_config.json"]
    elif (root / "config.json").is_file():
        unet_dir = root
        sched_files = [
            root / "scheduler_config.json",
            root.parent / "scheduler" / "scheduler_config.json",
        ]
        if root.name != "unet":
            sched_files = sched_files[:1]
    else:
        raise UserError(
            f"{root}: no config.json and no unet/config.json: not a diffusers UNet or pipeline "
            "folder"
        )
    config = _read_json(unet_dir / "config.json")
    unet_class = str(config.get("_class_name", ""))
    if unet_class not in UNET_CLASSES:
        raise IncompatibleError(
            f"{unet_dir}: a {unet_class or 'model of unknown class'}; diffplug-diffusers wraps "
            f"{' and '.join(UNET_CLASSES)}"
        )
    weights = _weights(unet_dir, variant)
    sched = next((f for f in sched_files if f.is_file()), None)
    return Folder(
        root,
        unet_dir,
        unet_class,
        weights,
        variant,
        _read_json(sched) if sched is not None else None,
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: unreadable ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a JSON object")
    return data


def _weights(unet_dir: Path, variant: str | None) -> list[Path]:
    """The safetensors files holding the UNet (one, or the shards an index names), checked."""
    from diffplug import pickle_files, read_header

    name = f"{WEIGHTS}.{variant}" if variant else WEIGHTS
    single = unet_dir / f"{name}.safetensors"
    index = unet_dir / f"{name}.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        shards = _read_json(index).get("weight_map", {})
        files = [unet_dir / f for f in sorted(set(shards.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if not files or missing:
            raise UserError(f"{index}: shards missing: {', '.join(missing) or 'none listed'}")
    else:
        pickles = pickle_files(unet_dir)
        if pickles:
            raise CheckpointError(
                f"{unet_dir}: weights only as {', '.join(pickles)}, a pickle, which can run code "
                "when loaded; diffplug loads safetensors only. Convert it where you trust the "
                "file: diffusers' from_pretrained then save_pretrained(safe_serialization=True)"
            )
        raise UserError(f"{unet_dir}: no {name}.safetensors")
    for f in files:
        read_header(f)  # a hostile or truncated header is refused before diffusers reads it
    return files


def resolve_process(
    scheduler_config: dict[str, Any] | None,
    prediction: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> tuple[str, dict[str, Any], str | None]:
    """(prediction kind, VP process spec, a note when defaults were assumed) from a diffusers
    scheduler config, explicit values winning."""
    overrides = dict(overrides or {})
    overrides.pop("name", None)
    spec = dict(DEFAULT_PROCESS)
    kind = "eps"
    note = None
    if scheduler_config is not None:
        cls = scheduler_config.get("_class_name", "scheduler")
        if scheduler_config.get("trained_betas") is not None:
            raise IncompatibleError(
                f"{cls} has trained_betas (an explicit beta table); diffplug's VP process takes "
                "a named schedule (linear, scaled_linear, squaredcos_cap_v2) only"
            )
        if "beta_schedule" not in scheduler_config and "beta_schedule" not in overrides:
            raise IncompatibleError(
                f"{cls} has no beta_schedule: not a DDPM-family (VP) scheduler, so the UNet was "
                "not trained on diffplug's VP process"
            )
        schedule = scheduler_config.get("beta_schedule", "linear")
        if schedule not in BETA_SCHEDULES and "beta_schedule" not in overrides:
            raise IncompatibleError(
                f"{cls} beta_schedule {schedule!r} is not supported; diffplug's VP process has "
                f"{', '.join(BETA_SCHEDULES)}"
            )
        mapping = {
            "num_train_timesteps": "num_train_timesteps",
            "beta_schedule": "beta_schedule",
            "beta_start": "beta_start",
            "beta_end": "beta_end",
            "rescale_betas_zero_snr": "rescale_zero_terminal_snr",
        }
        for theirs, ours in mapping.items():
            if scheduler_config.get(theirs) is not None:
                spec[ours] = scheduler_config[theirs]
        their_kind = scheduler_config.get("prediction_type", "epsilon")
        if their_kind not in PREDICTIONS and prediction is None:
            raise IncompatibleError(
                f"{cls} prediction_type {their_kind!r} is not one of {', '.join(PREDICTIONS)}"
            )
        kind = PREDICTIONS.get(their_kind, kind)
    else:
        assumed = [] if overrides else ["linear betas 1e-4..0.02 over 1000 training steps"]
        assumed += ["eps prediction"] if prediction is None else []
        if assumed:
            note = (
                f"no scheduler config found: assuming diffusers' defaults, {' and '.join(assumed)}"
                "; give the model's own (--prediction, --beta-schedule, ... of import-diffusers) "
                "if it differs"
            )
    spec.update(overrides)
    if prediction is not None:
        if prediction not in PREDICTIONS.values():
            raise UserError(f"prediction {prediction!r}: choose eps, x0 or v")
        kind = prediction
    from diffplug import build_process

    build_process(spec)  # checked now (ranges, choices), not at the first sample
    return kind, spec, note


def load_unet(found: Folder) -> Any:
    """The UNet of a checked folder, through diffusers (offline, safetensors only)."""
    cls = getattr(_diffusers(), found.unet_class)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            unet = cls.from_pretrained(
                os.fspath(found.unet_dir),
                local_files_only=True,
                use_safetensors=True,
                low_cpu_mem_usage=False,
                variant=found.variant,
            )
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise UserError(f"{found.unet_dir}: diffusers could not load the UNet: {exc}") from None
    return unet.float().eval()


def from_folder(path: str | os.PathLike[str], **kwargs: Any) -> DiffusersUNet:
    """``DiffusersUNet.from_folder``: a local diffusers folder as a diffplug denoiser."""
    return DiffusersUNet.from_folder(path, **kwargs)
