"""Single-file Stable Diffusion checkpoints (the original layout) as diffplug checkpoints.

The file's top-level prefixes tell the family: ``model.diffusion_model.`` and
``first_stage_model.`` with ``cond_stage_model.transformer.`` (SD 1.x, OpenAI CLIP),
``cond_stage_model.model.`` (SD 2.x, OpenCLIP) or ``conditioner.embedders.0/1`` (SDXL).
SD 2 base (eps, 512) and SD 2 v (768) have the same keys, so ``--variant sd2|sd2-v`` names
it. The configs are read off the tensors' shapes plus each family's fixed conventions (32
GroupNorm groups; 8 attention heads in SD 1.x, 64-wide heads otherwise; the VAE's scaling
factor; the scheduler); ``keymap`` renames every tensor, and what it leaves unconsumed in a
part is refused. The parts are written as a diffusers pipeline folder in a temporary
directory and imported as one (``pipeline.read_pipeline``). A single file holds no
tokenizer: ``--tokenizer DIR`` gives one (a CLIP tokenizer folder, or a pipeline folder's).
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from diffplug import CheckpointError, UserError, read_header
from diffplug_diffusers import keymap
from diffplug_diffusers.pipeline import Bundle, read_pipeline, sha256
from diffplug_diffusers.unet import _diffusers

VARIANTS = ("sd15", "sd2", "sd2-v", "sdxl")
#: the parts each family's file holds, by prefix
FAMILIES = {
    "sd15": (keymap.UNET, keymap.VAE, keymap.SD_CLIP),
    "sd2": (keymap.UNET, keymap.VAE, keymap.SD2_CLIP),
    "sdxl": (keymap.UNET, keymap.VAE, keymap.XL_CLIP, keymap.XL_BIGG),
}
#: keys a file may hold that are not weights of a part (schedules, EMA copies, CLIP's scale)
IGNORED = re.compile(r"(model_ema\..*|betas|alphas_cumprod.*|sqrt_.*|log_one_minus_.*|"
                     r"posterior_.*|.*logit_scale|.*attn_mask|.*position_ids)")  # fmt: skip


def family(keys: list[str]) -> str | None:
    """sd15, sd2 or sdxl from the prefixes present, or None."""
    for name, prefixes in sorted(FAMILIES.items(), key=lambda kv: -len(kv[1])):
        if all(any(k.startswith(p) for k in keys) for p in prefixes):
            return name
    return None


def prefixes(keys: list[str]) -> str:
    """The top-level key prefixes found (``a.b.*``), for a refusal."""
    heads = sorted({".".join(k.split(".")[:2]) + ".*" if "." in k else k for k in keys})
    return ", ".join(heads[:8]) + (f", ... ({len(heads)} in all)" if len(heads) > 8 else "")


def is_single_file(path: Path) -> bool:
    header, _ = read_header(path)
    return family(list(header)) is not None


def read_single_file(
    path: str | Path, *, variant: str | None = None, tokenizer: str | Path | None = None
) -> Bundle:
    """The checkpoint at ``path`` converted and imported, ``variant`` where the file cannot
    tell; anything but the three families is refused with the prefixes found."""
    path = Path(path)
    header, _ = read_header(path)  # refuses pickles, truncated and hostile files
    keys = list(header)
    found = family(keys)
    if found is None:
        raise UserError(
            f"{path}: not a Stable Diffusion checkpoint in the original layout (SD 1.x, 2.x, "
            f"SDXL) nor a diffplug one; found {prefixes(keys) or 'no tensors'}"
        )
    variant = _variant(path, found, variant)
    if tokenizer is None:
        raise UserError(
            f"{path}: a single-file checkpoint holds no tokenizer; give --tokenizer DIR (a "
            "CLIP tokenizer folder, or a diffusers SD pipeline folder with tokenizer/)"
        )
    with safe_open(str(path), framework="pt", device="cpu") as fh:
        state = {k: fh.get_tensor(k) for k in keys if not IGNORED.fullmatch(k)}
    with tempfile.TemporaryDirectory(prefix="diffplug-sd-") as tmp:
        write_folder(Path(tmp), state, variant, Path(tokenizer))
        bundle = read_pipeline(tmp)
    source = bundle.extra["diffusers"]
    source.update(source=path.name, single_file=variant, sha256={path.name: sha256(path)})
    return bundle


def _variant(path: Path, found: str, variant: str | None) -> str:
    allowed = {"sd15": ("sd15",), "sd2": ("sd2", "sd2-v"), "sdxl": ("sdxl",)}[found]
    if variant is None:
        if len(allowed) > 1:
            raise UserError(
                f"{path}: an SD 2.x checkpoint; its keys do not say whether it predicts eps "
                "(512 base) or v (768): give --variant sd2 or --variant sd2-v"
            )
        return allowed[0]
    if variant not in allowed:
        raise UserError(
            f"{path}: --variant {variant}, but the file is an {found} checkpoint "
            f"(--variant {' or '.join(allowed)})"
        )
    return variant


def write_folder(root: Path, state: dict[str, torch.Tensor], variant: str, tok: Path) -> None:
    """The parts of an original-layout state dict as a diffusers pipeline folder."""
    sdxl = variant == "sdxl"
    texts = [("text_encoder", keymap.XL_CLIP if sdxl else keymap.SD_CLIP, "clip")]
    if variant.startswith("sd2"):
        texts = [("text_encoder", keymap.SD2_CLIP, "openclip")]
    if sdxl:
        texts.append(("text_encoder_2", keymap.XL_BIGG, "openclip"))
    configs = {}
    for part, prefix, kind in texts:
        configs[part] = _text(root / part, state, prefix, kind, variant, part == "text_encoder_2")
    pooled = configs.get("text_encoder_2", {}).get("projection_dim", 0)
    unet_cfg = unet_config(state, variant, pooled)
    _save_part(root / "unet", "UNet2DConditionModel", unet_cfg, state, _unet_names(unet_cfg))
    vae_cfg = vae_config(state, variant)
    levels = len(vae_cfg["block_out_channels"])
    _save_part(root / "vae", "AutoencoderKL", vae_cfg, state,
               lambda k: keymap.vae_key(k, levels))  # fmt: skip
    leftover = sorted(k for k in state if k.startswith((keymap.UNET, keymap.VAE)))
    if leftover:
        raise CheckpointError(f"unexpected keys in the file: {', '.join(leftover[:4])}")
    _tokenizers(root, tok, variant)
    schedule = {"_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
                "steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False,
                "timestep_spacing": "leading",
                "prediction_type": "v_prediction" if variant == "sd2-v" else "epsilon"}  # fmt: skip
    _json(root / "scheduler" / "scheduler_config.json", schedule)
    pipeline = "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline"
    if unet_cfg["in_channels"] == 2 * unet_cfg["out_channels"] + 1:
        pipeline = pipeline.replace("Pipeline", "InpaintPipeline")
    index = {"_class_name": pipeline, "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "DDIMScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"]}  # fmt: skip
    if sdxl:
        index.update(text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                     tokenizer_2=["transformers", "CLIPTokenizer"],
                     force_zeros_for_empty_prompt=True)  # fmt: skip
    _json(root / "model_index.json", index)


def _json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))


def _count(keys: list[str], pattern: str) -> int:
    found = {m[1] for k in keys if (m := re.match(pattern, k))}
    return len(found)


def unet_config(state: dict[str, torch.Tensor], variant: str, pooled: int) -> dict[str, Any]:
    """A ``UNet2DConditionModel`` config read off the original UNet's shapes."""
    p = keymap.UNET
    u = {k[len(p) :]: v for k, v in state.items() if k.startswith(p)}
    keys = list(u)
    op = re.compile(r"input_blocks\.(\d+)\.0\.op\.weight")
    ops = sorted(int(m[1]) for k in keys if (m := op.fullmatch(k)))
    blocks = _count(keys, r"input_blocks\.(\d+)\.")
    layers = ops[0] - 1 if ops else blocks - 1
    levels = len(ops) + 1
    first = [1 + i * (layers + 1) for i in range(levels)]
    channels = [int(u[f"input_blocks.{b}.0.out_layers.3.weight"].shape[0]) for b in first]
    attention = [f"input_blocks.{b}.1.proj_in.weight" in u for b in first]
    depth = [max(1, _count(keys, rf"input_blocks\.{b}\.1\.transformer_blocks\.(\d+)\."))
             for b in first]  # fmt: skip
    attn2 = next((v for k, v in u.items() if k.endswith("attn2.to_k.weight")), None)
    proj = next((v for k, v in u.items() if k.endswith("proj_in.weight")), None)
    if attn2 is None or proj is None:
        raise CheckpointError("the UNet has no cross-attention: not a text-to-image SD UNet")
    heads = 8 if variant == "sd15" else [max(1, c // 64) for c in channels]
    cfg: dict[str, Any] = {
        "sample_size": {"sd15": 64, "sd2": 64, "sd2-v": 96, "sdxl": 128}[variant],
        "in_channels": int(u["input_blocks.0.0.weight"].shape[1]),
        "out_channels": int(u["out.2.weight"].shape[0]),
        "block_out_channels": channels,
        "layers_per_block": layers,
        "norm_num_groups": 32,
        "cross_attention_dim": int(attn2.shape[1]),
        "attention_head_dim": heads,
        "use_linear_projection": proj.ndim == 2,
        "upcast_attention": variant == "sd2-v",
        "transformer_layers_per_block": depth,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in attention[::-1]],
    }
    if "label_emb.0.0.weight" in u:  # SDXL's pooled text and size ids
        total = int(u["label_emb.0.0.weight"].shape[1])
        cfg.update(addition_embed_type="text_time", addition_time_embed_dim=(total - pooled) // 6,
                   projection_class_embeddings_input_dim=total)  # fmt: skip
    return cfg


def _unet_names(cfg: dict[str, Any]) -> Any:
    up_attention = [t.startswith("CrossAttn") for t in cfg["up_block_types"]]
    return lambda k: keymap.unet_key(k, cfg["layers_per_block"], up_attention)


def vae_config(state: dict[str, torch.Tensor], variant: str) -> dict[str, Any]:
    """An ``AutoencoderKL`` config read off the original VAE's shapes."""
    p = keymap.VAE
    v = {k[len(p) :]: t for k, t in state.items() if k.startswith(p)}
    levels = _count(list(v), r"encoder\.down\.(\d+)\.")
    return {
        "in_channels": int(v["encoder.conv_in.weight"].shape[1]),
        "out_channels": int(v["decoder.conv_out.weight"].shape[0]),
        "latent_channels": int(v["decoder.conv_in.weight"].shape[1]),
        "block_out_channels": [
            int(v[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) for i in range(levels)
        ],  # fmt: skip
        "layers_per_block": _count(list(v), r"encoder\.down\.0\.block\.(\d+)\."),
        "norm_num_groups": 32,
        "scaling_factor": 0.13025 if variant == "sdxl" else 0.18215,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "use_quant_conv": "quant_conv.weight" in v,
        "use_post_quant_conv": "post_quant_conv.weight" in v,
    }


def _save_part(folder: Path, cls_name: str, cfg: dict[str, Any],
               state: dict[str, torch.Tensor], original: Any) -> None:  # fmt: skip
    """Build the diffusers model on the meta device, take each of its tensors from the
    original key ``original`` names (consumed from ``state``), write the folder."""
    with torch.device("meta"):
        model = getattr(_diffusers(), cls_name).from_config(cfg)
    out = {}
    for key, want in model.state_dict().items():
        name = original(key)
        if name not in state:
            raise CheckpointError(f"the file lacks {name} (for {cls_name} {key})")
        out[key] = keymap.from_original(state.pop(name), want.shape, None).contiguous()
    _json(folder / "config.json", {"_class_name": cls_name, **cfg})
    save_file(out, str(folder / "diffusion_pytorch_model.safetensors"))


def _text(folder: Path, state: dict[str, torch.Tensor], prefix: str, kind: str, variant: str,
          projected: bool) -> dict[str, Any]:  # fmt: skip
    """One text encoder as a transformers CLIP folder; returns its config."""
    import transformers

    t = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if kind == "clip":
        t = {k.removeprefix("text_model."): v for k, v in t.items()}
        vocab, width = t["embeddings.token_embedding.weight"].shape
        positions = t["embeddings.position_embedding.weight"].shape[0]
        layers = _count(list(t), r"encoder\.layers\.(\d+)\.")
        inner = t["encoder.layers.0.mlp.fc1.weight"].shape[0]
        act, proj = "quick_gelu", width
    else:
        vocab, width = t["token_embedding.weight"].shape
        positions = t["positional_embedding"].shape[0]
        layers = _count(list(t), r"transformer\.resblocks\.(\d+)\.")
        inner = t["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        act = "gelu"
        proj = t["text_projection"].shape[1] if "text_projection" in t else width
        if not projected:  # SD 2 reads the penultimate layer: its last is never used
            layers -= 1
    cls_name = "CLIPTextModelWithProjection" if projected else "CLIPTextModel"
    config = transformers.CLIPTextConfig(
        vocab_size=int(vocab), hidden_size=int(width), intermediate_size=int(inner),
        num_hidden_layers=layers, num_attention_heads=max(1, int(width) // 64),
        max_position_embeddings=int(positions), projection_dim=int(proj), hidden_act=act,
        bos_token_id=int(vocab) - 2, eos_token_id=int(vocab) - 1, architectures=[cls_name],
    )  # fmt: skip
    with torch.device("meta"):
        model = getattr(transformers, cls_name)(config)
    out = {}
    for key, want in model.state_dict().items():
        if kind == "clip":
            name, third = keymap.clip_key(key, prefix), None
        else:
            name, third = keymap.openclip_key(key, prefix)
        if name not in state:
            raise CheckpointError(f"the file lacks {name} (for {cls_name} {key})")
        tensor = state[name]
        if name.endswith("text_projection"):  # (D, P) there, a (P, D) Linear weight here:
            tensor = tensor.T  # always transposed, even square (shape cannot tell then)
        out[key] = keymap.from_original(tensor, want.shape, third).contiguous()
    for k in [k for k in state if k.startswith(prefix)]:
        del state[k]  # consumed (SD 2's last layer and projection deliberately unused)
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    save_file(out, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return config.to_dict()


def _tokenizers(root: Path, given: Path, variant: str) -> None:
    """Copy the given tokenizer(s); SD 2's and SDXL's second pad with "!"."""
    if not given.is_dir():
        raise UserError(f"--tokenizer {given}: no such folder")
    first = given / "tokenizer" if (given / "tokenizer").is_dir() else given
    second = given / "tokenizer_2" if (given / "tokenizer_2").is_dir() else None
    shutil.copytree(first, root / "tokenizer")
    if variant.startswith("sd2") and first == given:
        _pad_with_bang(root / "tokenizer")
    if variant == "sdxl":
        shutil.copytree(second or first, root / "tokenizer_2")
        if second is None:
            _pad_with_bang(root / "tokenizer_2")


def _pad_with_bang(folder: Path) -> None:
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    config["pad_token"] = "!"
    config_file.write_text(json.dumps(config, indent=1))
