"""A KL autoencoder with exactly the architecture and state-dict names of diffusers'
``AutoencoderKL`` (Stable Diffusion's VAE), written independently of diffusers.

Why the same names: a user's SD-style VAE (a diffusers folder or a bare safetensors state
dict) then loads with strict key matching and no conversion table, and the parity tests can
compare the two implementations number for number.

Layout (``L`` = latent channels, ``n`` = number of levels in ``block_out_channels``)::

    encoder.conv_in                       3x3, in -> ch[0]
    encoder.down_blocks.i.resnets.j       layers_per_block residual blocks per level
    encoder.down_blocks.i.downsamplers.0  stride-2 3x3 conv after pad (0,1,0,1); not on the last
    encoder.mid_block                     resnets.0, attentions.0 (optional), resnets.1
    encoder.conv_norm_out, conv_out       GroupNorm, SiLU, 3x3 -> 2L (mean and log-variance)
    quant_conv                            optional 1x1, 2L -> 2L
    post_quant_conv                       optional 1x1, L -> L
    decoder.conv_in                       3x3, L -> ch[-1]
    decoder.mid_block                     as the encoder's
    decoder.up_blocks.i.resnets.j         layers_per_block + 1 blocks, levels in reverse order
    decoder.up_blocks.i.upsamplers.0      nearest x2 then 3x3 conv; not on the last
    decoder.conv_norm_out, conv_out       GroupNorm, SiLU, 3x3 -> out

Every GroupNorm has eps 1e-6, every activation is SiLU, and the one attention head spans all
channels with a residual connection (output scale 1).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diffplug import Autoencoder, CheckpointError, UserError, build_config, option

EPS = 1e-6
#: what ``AutoencoderKL.save_pretrained`` writes into a folder.
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


@dataclass
class KLVAEConfig:
    """The options of ``AutoencoderKL`` that change its weights or its numbers, same names.
    The defaults are the digits VAE's (32x32 grey -> 8x8x4), not diffusers' (see
    ``DIFFUSERS_DEFAULTS``, used for keys a diffusers config leaves out)."""

    in_channels: int = option(1, "image channels", min=1)
    out_channels: int = option(1, "decoded image channels", min=1)
    block_out_channels: list[int] = option(
        [8, 16, 32], "channels per level; each level but the last halves the size"
    )
    layers_per_block: int = option(
        1, "residual blocks per encoder level (the decoder has one more)", min=1
    )
    latent_channels: int = option(4, "latent channels", min=1)
    norm_num_groups: int = option(4, "GroupNorm groups (must divide every level's channels)", min=1)
    scaling_factor: float = option(
        1.0, "latents are multiplied by this (SD 1.x: 0.18215)", min=0.0, min_exclusive=True
    )
    shift_factor: float | None = option(
        None, "subtracted from latents before scaling (None: 0; SD3/Flux use one)"
    )
    use_quant_conv: bool = option(True, "1x1 conv on the encoder's moments")
    use_post_quant_conv: bool = option(True, "1x1 conv on the latents before the decoder")
    mid_block_add_attention: bool = option(True, "self-attention in the middle blocks")
    sample_posterior: bool = option(
        False, "encode draws from the posterior instead of returning its mean"
    )


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=EPS)


class ResnetBlock(nn.Module):
    """norm-SiLU-conv twice, plus the input (through a 1x1 conv when channels change)."""

    def __init__(self, cin: int, cout: int, groups: int) -> None:
        super().__init__()
        self.norm1 = _norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(cout, groups)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class AttentionBlock(nn.Module):
    """One-head self-attention over all positions, pre-GroupNorm, residual."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.group_norm = _norm(channels, groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.group_norm(x).reshape(b, c, h * w).transpose(1, 2)  # (B, HW, C)
        q, k, v = (proj(tokens).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        out = self.to_out[0](out)
        return out.transpose(1, 2).reshape(b, c, h, w) + x


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding one zero row/column on the bottom/right only."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """Residual blocks, then an optional down- or upsampler (``downsamplers``/``upsamplers``)."""

    def __init__(self, cin: int, cout: int, layers: int, groups: int, resample: str | None) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(cin if j == 0 else cout, cout, groups) for j in range(layers)
        )
        if resample == "down":
            self.downsamplers = nn.ModuleList([Downsample(cout)])
        elif resample == "up":
            self.upsamplers = nn.ModuleList([Upsample(cout)])
        self.resample = resample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resnets:
            x = block(x)
        if self.resample == "down":
            x = self.downsamplers[0](x)
        elif self.resample == "up":
            x = self.upsamplers[0](x)
        return x


class MidBlock(nn.Module):
    """Residual block, optional attention, residual block."""

    def __init__(self, channels: int, groups: int, attention: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([AttentionBlock(channels, groups)] if attention else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    """Images to the posterior's moments (2L channels), downsampled 2^(n-1) times."""

    def __init__(self, c: KLVAEConfig) -> None:
        super().__init__()
        ch, groups, last = c.block_out_channels, c.norm_num_groups, len(c.block_out_channels) - 1
        self.conv_in = nn.Conv2d(c.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            Level(ch[max(i - 1, 0)], ch[i], c.layers_per_block, groups,
                  None if i == last else "down")
            for i in range(len(ch))
        )  # fmt: skip
        self.mid_block = MidBlock(ch[-1], groups, c.mid_block_add_attention)
        self.conv_norm_out = _norm(ch[-1], groups)
        self.conv_out = nn.Conv2d(ch[-1], 2 * c.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for level in self.down_blocks:
            x = level(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """Latents (L channels) to images, upsampled 2^(n-1) times; levels in reverse order."""

    def __init__(self, c: KLVAEConfig) -> None:
        super().__init__()
        rev, groups = c.block_out_channels[::-1], c.norm_num_groups
        last = len(rev) - 1
        self.conv_in = nn.Conv2d(c.latent_channels, rev[0], 3, padding=1)
        self.mid_block = MidBlock(rev[0], groups, c.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            Level(rev[max(i - 1, 0)], rev[i], c.layers_per_block + 1, groups,
                  None if i == last else "up")
            for i in range(len(rev))
        )  # fmt: skip
        self.conv_norm_out = _norm(rev[-1], groups)
        self.conv_out = nn.Conv2d(rev[-1], c.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for level in self.up_blocks:
            x = level(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


def check_config(c: KLVAEConfig) -> None:
    """Refuse, with the option to fix, a config that cannot build a network."""
    if not c.block_out_channels:
        raise UserError("kl-vae: --block-out-channels needs at least one level")
    bad = [ch for ch in c.block_out_channels if ch < 1 or ch % c.norm_num_groups]
    if bad:
        raise UserError(
            f"kl-vae: --norm-num-groups {c.norm_num_groups} must divide every level's channels "
            f"(--block-out-channels {','.join(map(str, c.block_out_channels))}); it does not "
            f"divide {bad[0]}"
        )


class KLVAE(Autoencoder):
    """The KL autoencoder: ``encode`` gives scaled latents, ``decode`` takes them back.

    ``encode_distribution`` gives the posterior's unscaled (mean, log-variance), as diffusers'
    ``latent_dist``; ``encode`` returns ``(mean - shift) * scaling_factor``, or a posterior
    sample in place of the mean when ``sample_posterior`` is set or a generator is passed.
    """

    Config = KLVAEConfig

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        c = self.config
        check_config(c)
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)
        latent = c.latent_channels
        self.quant_conv = nn.Conv2d(2 * latent, 2 * latent, 1) if c.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(latent, latent, 1) if c.use_post_quant_conv else None

    # -- shapes ----------------------------------------------------------------------------
    @property
    def downsampling(self) -> int:
        """How many image pixels one latent pixel spans, per side."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    def latent_shape(self, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """(C, H, W) of images -> (L, H/f, W/f) of their latents; H and W must divide by f."""
        c, h, w = image_shape
        f = self.downsampling
        if c != self.config.in_channels:
            raise UserError(f"kl-vae encodes {self.config.in_channels}-channel images, not {c}")
        if h % f or w % f:
            raise UserError(f"kl-vae downsamples {f}x: image sides must be multiples of {f}")
        return (self.config.latent_channels, h // f, w // f)

    def image_shape(self, latent_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """(L, h, w) of latents -> (C, h*f, w*f) of the images they decode to."""
        c, h, w = latent_shape
        if c != self.config.latent_channels:
            wanted = self.config.latent_channels
            raise UserError(f"kl-vae decodes {wanted}-channel latents, not {c}")
        f = self.downsampling
        return (self.config.out_channels, h * f, w * f)

    # -- the two halves --------------------------------------------------------------------
    def encode_distribution(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior of images ``x`` in [-1, 1]: unscaled (mean, logvar), logvar clamped
        to [-30, 20] as diffusers does (so exp never overflows)."""
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(
        self,
        x: torch.Tensor,
        generator: torch.Generator | None = None,
        *,
        sample: bool | None = None,
    ) -> torch.Tensor:
        """Images in [-1, 1] -> scaled latents. ``sample`` (default: ``sample_posterior``, or
        True when a ``generator`` is given) draws mean + std * noise, the noise from
        ``generator`` on its own device, so the same seed gives the same latents anywhere."""
        mean, logvar = self.encode_distribution(x)
        if sample is None:
            sample = self.config.sample_posterior or generator is not None
        z = mean
        if sample:
            device = generator.device if generator is not None else mean.device
            noise = torch.randn(mean.shape, generator=generator, device=device, dtype=mean.dtype)
            z = mean + torch.exp(0.5 * logvar) * noise.to(mean.device)
        return self.scale(z)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images (about [-1, 1]; not clamped, as diffusers)."""
        return self.decode_unscaled(self.unscale(z))

    def decode_unscaled(self, z: torch.Tensor) -> torch.Tensor:
        """Latents as the posterior gives them (before ``scale``) -> images."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def scale(self, z: torch.Tensor) -> torch.Tensor:
        """Posterior latents -> the denoiser's space: (z - shift) * scaling_factor."""
        c = self.config
        if c.shift_factor:
            z = z - c.shift_factor
        return z * c.scaling_factor

    def unscale(self, z: torch.Tensor) -> torch.Tensor:
        """The inverse of ``scale``."""
        c = self.config
        z = z / c.scaling_factor
        return z + c.shift_factor if c.shift_factor else z

    def forward(
        self, x: torch.Tensor, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training's pass: (reconstruction, mean, logvar); the latent decoded is
        mean + std * ``noise`` (the reparameterisation), or the mean without noise. One call,
        so DistributedDataParallel sees the whole graph."""
        mean, logvar = self.encode_distribution(x)
        z = mean if noise is None else mean + torch.exp(0.5 * logvar) * noise
        return self.decode_unscaled(z), mean, logvar

    # -- loading a diffusers VAE -----------------------------------------------------------
    @classmethod
    def from_diffusers(
        cls,
        path: str | os.PathLike[str],
        config: dict[str, Any] | str | os.PathLike[str] | None = None,
        *,
        sample_posterior: bool = False,
    ) -> KLVAE:
        """A user's SD-style VAE as it is, with no network and no pickle.

        ``path`` is a folder as ``AutoencoderKL.save_pretrained`` writes it (``config.json``
        and ``diffusion_pytorch_model.safetensors``; a pipeline folder's ``vae/`` is found
        too), or a bare ``.safetensors`` state dict with ``config`` (a dict or a config.json
        path; default: the ``config.json`` beside the file). Keys must match exactly;
        diffusers' pre-0.14 attention names (query, key, value, proj_attn) are renamed.
        """
        weights, config_dict = _locate(Path(path), config)
        model = cls(config_from_diffusers(config_dict, sample_posterior=sample_posterior))
        state = _read_state(weights, model)
        model.load_state_dict(state, strict=True)
        return model.eval()


def fit_scaling_factor(vae: KLVAE, images: torch.Tensor, batch_size: int = 256) -> float:
    """1 / std of the posterior means of ``images``: the ``scaling_factor`` that gives a
    diffusion model unit-variance latents (how SD's 0.18215 was measured). Set it in the
    config of a trained VAE before saving it."""
    with torch.no_grad():
        means = [vae.encode_distribution(b)[0] for b in images.split(batch_size)]
    return float(1.0 / torch.cat(means).double().std())


# -- diffusers configs and files ---------------------------------------------------------------
#: AutoencoderKL's defaults, for keys a config.json leaves out.
DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": [64],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "scaling_factor": 0.18215,
    "shift_factor": None,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}
#: keys that change nothing here: the sample size only sets tiling, force_upcast a pipeline's
#: dtype choice.
_INERT = {"sample_size", "force_upcast"}


def config_from_diffusers(config: dict[str, Any], *, sample_posterior: bool = False) -> KLVAEConfig:
    """Our config for an ``AutoencoderKL`` config dict; refuses what this model cannot be."""
    if not isinstance(config, dict):
        kind = type(config).__name__
        raise UserError(f"a diffusers VAE config must be a JSON object, not {kind}")
    name = config.get("_class_name", "AutoencoderKL")
    if name != "AutoencoderKL":
        raise UserError(f"the config is for a diffusers {name}; kl-vae loads AutoencoderKL only")
    levels = len(config.get("block_out_channels", DIFFUSERS_DEFAULTS["block_out_channels"]))
    blocks = (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D"))
    for key, block in blocks:
        types = list(config.get(key, [block] * levels))
        if types != [block] * levels:
            raise UserError(f"unsupported {key} {types}: kl-vae has {levels} x {block}")
    act = config.get("act_fn", "silu")
    if act not in ("silu", "swish"):
        raise UserError(f"unsupported act_fn {act!r}: kl-vae uses SiLU")
    for key in ("latents_mean", "latents_std"):
        if config.get(key) is not None:
            raise UserError(
                f"the config sets {key}: per-channel latent normalisation is not supported "
                "(only scaling_factor and shift_factor)"
            )
    checked = {"_class_name", "down_block_types", "up_block_types", "act_fn", "latents_mean",
               "latents_std"}  # fmt: skip
    known = set(DIFFUSERS_DEFAULTS) | _INERT | checked
    unknown = sorted(k for k in config if k not in known and not k.startswith("_"))
    if unknown:
        raise UserError(f"unsupported AutoencoderKL config keys: {', '.join(unknown)}")
    values = {k: config.get(k, default) for k, default in DIFFUSERS_DEFAULTS.items()}
    values["sample_posterior"] = sample_posterior
    return build_config(KLVAEConfig, values, owner="diffusers VAE config")


def _locate(
    path: Path, config: dict[str, Any] | str | os.PathLike[str] | None
) -> tuple[Path, dict[str, Any]]:
    """(weights file, config dict) of a diffusers folder or a bare safetensors file."""
    from diffplug import pickle_files, read_header

    if path.is_dir():
        if not (path / CONFIG_NAME).is_file() and (path / "vae" / CONFIG_NAME).is_file():
            path = path / "vae"  # a whole pipeline folder
        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            pickled = pickle_files(path)
            if pickled:
                raise CheckpointError(
                    f"{path}: has only pickled weights ({pickled[0]}), which can run code when "
                    f"loaded; save them as safetensors (save_pretrained(..., "
                    f"safe_serialization=True)) and load {WEIGHTS_NAME}"
                )
            raise CheckpointError(f"{path}: no {WEIGHTS_NAME} in this folder")
        if config is None:
            config = path / CONFIG_NAME
    else:
        weights = path
        if not weights.exists():
            raise CheckpointError(f"{path}: no such file or folder")
        read_header(weights)  # a pickle is refused before anything else is asked of it
        if config is None:
            config = path.parent / CONFIG_NAME
            if not config.is_file():
                raise UserError(
                    f"{path}: a bare state dict needs its config: pass config= (a dict or a "
                    f"config.json path), or put the config.json beside it"
                )
    if isinstance(config, dict):
        return weights, config
    config_path = Path(config)
    if not config_path.is_file():
        raise UserError(f"{config_path}: no such config file")
    try:
        return weights, json.loads(config_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{config_path}: not a JSON config ({exc})") from None


#: diffusers before 0.14 named the attention projections differently.
_LEGACY = {"query.": "to_q.", "key.": "to_k.", "value.": "to_v.", "proj_attn.": "to_out.0."}


def _legacy_name(key: str) -> str:
    head, sep, tail = key.rpartition("attentions.0.")
    if sep:
        for old, new in _LEGACY.items():
            if tail.startswith(old):
                return head + sep + new + tail[len(old) :]
    return key


def _read_state(weights: Path, model: KLVAE) -> dict[str, torch.Tensor]:
    """The file's tensors, after checking names and shapes against ``model`` from the header
    alone (a mismatch reads no tensor data), in the model's dtype."""
    from diffplug import load_tensors, read_header

    header, _ = read_header(weights)  # refuses pickles, truncated and hostile files
    names = {_legacy_name(k): k for k in header}
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if any(k.startswith(("encoder.down.", "first_stage_model.")) for k in header):
        raise CheckpointError(
            f"{weights}: an original (CompVis/LDM) checkpoint, not a diffusers one: convert it "
            "with diffusers (AutoencoderKL.from_single_file, then save_pretrained) first"
        )
    missing = sorted(set(want) - set(names))
    unexpected = sorted(names[k] for k in set(names) - set(want))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} ({', '.join(missing[:4])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} ({', '.join(unexpected[:4])})")
        raise CheckpointError(f"{weights}: weights do not match the config: {'; '.join(parts)}")
    shapes = [
        f"{k}: file {tuple(header[names[k]]['shape'])}, config {want[k]}"
        for k in sorted(want)
        if tuple(header[names[k]]["shape"]) != want[k]
    ]
    if shapes:
        raise CheckpointError(
            f"{weights}: {len(shapes)} weight shape(s) do not match the config: "
            + "; ".join(shapes[:3])
        )
    tensors = load_tensors(weights)
    return {k: tensors[old] for k, old in names.items()}
