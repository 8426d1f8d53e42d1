"""The dual UNet of decoupled diffusion (Huang et al. 2023): one encoder, two decoders.

The decoupled process splits the noisy image into an attenuation part c (here -x0) and
Gaussian noise eps, so the network predicts both: a shared encoder and mid block, then two
"decouple" modules (norm, conv, spatial attention) that let each branch pick its own features,
and two decoders with the encoder's skips. Attention is linear ("efficient attention"), cheap
at any resolution. An optional timm backbone turns a condition image into tokens that every
block cross-attends to ("relation" layers), with 2-D position encodings on both sides so a
feature-grid cell can find the matching region of the condition. With ``precondition`` the
input and outputs are scaled as the authors do, so the raw decoder outputs stay near unit
variance at every t.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from diffplug import Cond, Denoiser, DenoiserConfig, OptionError, UserError, option

#: highest frequency of the 2-D position encodings, in half-cycles across the image: enough to
#: tell neighbouring cells apart on grids up to 64 wide.
MAX_POSITION_FREQ = 64.0


@dataclass
class DualUNetConfig(DenoiserConfig):
    prediction: str = option(
        "c_eps",
        "what the network outputs: the decoupled pair, or x0 = -c from the c branch alone (the "
        "one-head ablation; eps is then derived from x_t)",
        choices=("c_eps", "x0"),
    )
    process: dict = option({"name": "decoupled"}, "the forward process it is trained on")
    size: int = option(8, "image (or latent) height and width", min=1)
    channels: int = option(1, "image (or latent) channels", min=1)
    width: int = option(32, "channels at the first level", min=1)
    mults: list[int] = option(
        [1, 2, 2, 2],
        "channel multiplier per encoder level (each level but the last halves the size)",
    )
    dropout: float = option(0.1, "dropout in residual blocks", min=0.0, max=1.0)
    heads: int = option(4, "attention heads (linear self-attention and relation layers)", min=1)
    groups: int = option(8, "GroupNorm groups (must divide width * every mult)", min=1)
    precondition: bool = option(
        True, "the authors' input/output scaling (c_in = 1/sqrt(1+t) and skip terms)"
    )
    cond_encoder: str | None = option(
        None, "timm model that encodes a condition image (e.g. resnet18); None: unconditional"
    )
    cond_weights: str | None = option(
        None,
        "local safetensors file with the timm backbone's state_dict (features_only model); "
        "it initialises the backbone, which is then part of the denoiser's own weights",
    )
    cond_channels: int = option(1, "channels of the condition image", min=1)
    cond_resize: int = option(
        32, "the condition image is resized (bilinear) to this size for the backbone", min=1
    )
    cond_dim: int = option(64, "width of the condition tokens (multiple of 4)", min=4)

    def __post_init__(self) -> None:
        owner = "denoiser dual-unet"
        if self.prediction not in ("c_eps", "x0"):
            raise OptionError(
                f"{owner}: predicts the pair c_eps (or x0 with one head), not {self.prediction!r}"
            )
        if self.conditioning == "none":
            self.conditioning = None
        if self.cond_encoder is not None and self.conditioning is None:
            self.conditioning = "image"
        if self.cond_encoder is not None and self.conditioning != "image":
            raise OptionError(
                f"{owner}: --cond-encoder encodes a condition image, so --conditioning must be "
                f"'image' (or unset); got {self.conditioning!r}"
            )
        if self.cond_encoder is None and self.conditioning is not None:
            raise OptionError(
                f"{owner}: --conditioning {self.conditioning!r} needs a condition encoder: "
                "pass --cond-encoder (a timm model name such as resnet18) for 'image'; "
                "other conditioning kinds are not supported"
            )
        if self.cond_encoder is None and self.cond_weights is not None:
            raise OptionError(f"{owner}: --cond-weights needs --cond-encoder")
        if not self.mults or any(m < 1 for m in self.mults):
            raise OptionError(f"{owner}: --mults needs at least one positive multiplier")
        if self.width % self.groups:
            raise OptionError(
                f"{owner}: --width {self.width} must be divisible by --groups {self.groups}"
            )
        for mult in self.mults:
            ch = self.width * mult
            if ch % self.groups or ch % self.heads:
                raise OptionError(
                    f"{owner}: width * mult = {ch} must be divisible by --groups {self.groups} "
                    f"and --heads {self.heads}"
                )
        factor = 2 ** (len(self.mults) - 1)
        if self.size % factor:
            raise OptionError(
                f"{owner}: --size {self.size} must be divisible by 2**(len(mults) - 1) = {factor}"
            )
        if self.cond_dim % 4:
            raise OptionError(f"{owner}: --cond-dim must be a multiple of 4; got {self.cond_dim}")


def noise_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of 100*ln(t) (B,) -> (B, dim): ln spreads the small times apart."""
    c_noise = 100.0 * t.float().clamp_min(1e-12).log()
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    args = c_noise[:, None] * freqs[None]
    return F.pad(torch.cat([args.cos(), args.sin()], dim=1), (0, dim - 2 * half))


def grid_encoding(h: int, w: int, dim: int, device: torch.device) -> torch.Tensor:
    """2-D sinusoidal encoding (h*w, dim) of cell centres normalised to [0, 1].

    Normalised positions put grids of any resolution in one frame, so a feature cell and the
    condition cells over the same region get similar codes. Half the channels encode y, half x.
    """
    n = dim // 4
    freqs = math.pi * torch.exp(torch.linspace(0.0, math.log(MAX_POSITION_FREQ), n, device=device))
    ys = (torch.arange(h, device=device) + 0.5) / h
    xs = (torch.arange(w, device=device) + 0.5) / w
    ey = torch.cat([(ys[:, None] * freqs).sin(), (ys[:, None] * freqs).cos()], dim=1)
    ex = torch.cat([(xs[:, None] * freqs).sin(), (xs[:, None] * freqs).cos()], dim=1)
    grid = torch.cat([ey[:, None].expand(h, w, 2 * n), ex[None].expand(h, w, 2 * n)], dim=2)
    return F.pad(rearrange(grid, "h w d -> (h w) d"), (0, dim - 4 * n))


class ResBlock(nn.Module):
    """Norm, SiLU, conv, + time embedding, norm, SiLU, dropout, conv; residual."""

    def __init__(self, cin: int, cout: int, temb: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(temb, cout))
        self.norm2 = nn.GroupNorm(groups, cout)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.emb(emb)[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.skip(x) + h


class LinearAttention(nn.Module):
    """Efficient attention (Shen et al.): softmax q over features, k over tokens; O(N d^2)."""

    def __init__(self, channels: int, heads: int, groups: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        q, k, v = rearrange(
            self.qkv(self.norm(x)), "b (three n d) h w -> three b n (h w) d", three=3, n=self.heads
        )
        q, k = q.softmax(dim=-1), k.softmax(dim=-2)
        o = q @ (k.transpose(-1, -2) @ v)
        return x + self.out(rearrange(o, "b n (h w) d -> b (n d) h w", h=h, w=w))


class Relation(nn.Module):
    """Cross-attention from the feature map to the condition tokens, positions on q and k."""

    def __init__(self, channels: int, cond_dim: int, heads: int, groups: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, channels)
        self.q = nn.Linear(channels, channels)
        self.k = nn.Linear(cond_dim, channels)
        self.v = nn.Linear(cond_dim, channels)
        self.out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        query = rearrange(self.norm(x), "b c h w -> b (h w) c")
        query = query + grid_encoding(h, w, c, x.device).to(query.dtype)
        split = "b t (n d) -> b n t d"
        q = rearrange(self.q(query), split, n=self.heads)
        k = rearrange(self.k(tokens + pos.to(tokens.dtype)), split, n=self.heads)
        v = rearrange(self.v(tokens), split, n=self.heads)
        o = rearrange(F.scaled_dot_product_attention(q, k, v), "b n t d -> b t (n d)")
        return x + rearrange(self.out(o), "b (h w) c -> b c h w", h=h, w=w)


class Decouple(nn.Module):
    """A branch's own view of the shared features: norm, conv, CBAM-style spatial gate."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.gate = nn.Conv2d(2, 1, 7, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(self.norm(x))
        stats = torch.cat([h.mean(dim=1, keepdim=True), h.amax(dim=1, keepdim=True)], dim=1)
        return h * torch.sigmoid(self.gate(stats))


class Level(nn.Module):
    """One encoder (Down) or decoder (Up) block: resample, ResNet, relation, attention."""

    def __init__(
        self,
        cin: int,
        cout: int,
        cfg: DualUNetConfig,
        *,
        up: bool = False,
        skip: int = 0,
        down: bool = False,
    ) -> None:
        super().__init__()
        temb = 4 * cfg.width
        self.up = None
        if up:
            self.up = nn.Sequential(
                nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cin, cin, 3, padding=1)
            )
        self.res = ResBlock(cin + skip, cout, temb, cfg.groups, cfg.dropout)
        self.relation = (
            Relation(cout, cfg.cond_dim, cfg.heads, cfg.groups) if cfg.cond_encoder else None
        )
        self.attn = LinearAttention(cout, cfg.heads, cfg.groups)
        self.down = nn.Conv2d(cout, cout, 3, stride=2, padding=1) if down else None

    def forward(
        self,
        h: torch.Tensor,
        emb: torch.Tensor,
        context: tuple[torch.Tensor, torch.Tensor] | None,
        skip: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.up is not None:
            h = self.up(h)
        if skip is not None:
            h = torch.cat([h, skip], dim=1)
        h = self.res(h, emb)
        if self.relation is not None:
            assert context is not None
            h = self.relation(h, *context)
        return self.attn(h)


class Decoder(nn.Module):
    """Up blocks mirroring the encoder, then norm, SiLU and a zero-initialised conv."""

    def __init__(self, cfg: DualUNetConfig) -> None:
        super().__init__()
        widths = [cfg.width * m for m in cfg.mults]
        self.blocks = nn.ModuleList()
        ch = widths[-1]
        for level in reversed(range(len(widths))):
            up = level < len(widths) - 1
            self.blocks.append(Level(ch, widths[level], cfg, up=up, skip=widths[level]))
            ch = widths[level]
        self.norm_out = nn.GroupNorm(cfg.groups, ch)
        self.conv_out = nn.Conv2d(ch, cfg.channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(
        self,
        h: torch.Tensor,
        emb: torch.Tensor,
        context: tuple[torch.Tensor, torch.Tensor] | None,
        skips: list[torch.Tensor],
    ) -> torch.Tensor:
        for block, skip in zip(self.blocks, reversed(skips), strict=True):
            h = block(h, emb, context, skip)
        return self.conv_out(F.silu(self.norm_out(h)))


class ConditionEncoder(nn.Module):
    """A timm backbone's feature maps as one token sequence (B, N, cond_dim) with positions."""

    def __init__(self, cfg: DualUNetConfig) -> None:
        super().__init__()
        assert cfg.cond_encoder is not None
        self.resize = cfg.cond_resize
        self.dim = cfg.cond_dim
        self.backbone = _backbone(cfg.cond_encoder, cfg.cond_channels, cfg.cond_resize)
        if cfg.cond_weights is not None:
            _load_backbone(self.backbone, cfg.cond_encoder, cfg.cond_weights)
        self.nhwc = getattr(self.backbone, "output_fmt", "NCHW") == "NHWC"  # a str enum
        self.proj = nn.ModuleList(
            nn.Conv2d(ch, cfg.cond_dim, 1) for ch in self.backbone.feature_info.channels()
        )
        # backbone features have any scale; normalised tokens keep attention logits sane
        self.norm = nn.LayerNorm(cfg.cond_dim)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if image.shape[-2:] != (self.resize, self.resize):
            image = F.interpolate(
                image, size=(self.resize, self.resize), mode="bilinear", antialias=True
            )
        tokens, pos = [], []
        for feat, proj in zip(self.backbone(image), self.proj, strict=True):
            if self.nhwc:
                feat = rearrange(feat, "b h w c -> b c h w")
            feat = proj(feat)
            tokens.append(rearrange(feat, "b c h w -> b (h w) c"))
            pos.append(grid_encoding(*feat.shape[-2:], self.dim, feat.device))
        return self.norm(torch.cat(tokens, dim=1)), torch.cat(pos, dim=0)


def _backbone(name: str, in_chans: int, size: int) -> nn.Module:
    """``timm.create_model(name, features_only=True)``, never downloading weights."""
    import timm

    if not timm.is_model(name):
        near = timm.list_models(f"*{name}*")[:5]
        hint = f"; similar: {', '.join(near)}" if near else ""
        raise UserError(f"--cond-encoder: timm has no model {name!r}{hint}")
    kwargs: dict[str, Any] = {"pretrained": False, "features_only": True, "in_chans": in_chans}
    try:
        try:  # transformers (swin, vit) are built for one input size; CNNs take no img_size
            return timm.create_model(name, img_size=size, **kwargs)
        except TypeError:
            return timm.create_model(name, **kwargs)
    except Exception as exc:
        raise UserError(
            f"--cond-encoder: timm cannot build {name!r} as a feature extractor at "
            f"{size}x{size}: {type(exc).__name__}: {exc}"
        ) from None


def _load_backbone(backbone: nn.Module, name: str, path: str) -> None:
    """Strictly load a local safetensors state dict into the backbone."""
    from diffplug import load_tensors

    if not os.path.isfile(path):
        raise UserError(f"--cond-weights: {path}: no such file")
    state = load_tensors(path)  # validates the header; refuses pickles
    want = backbone.state_dict()
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    shapes = [f"{k}: {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in want.items()
              if k in state and state[k].shape != v.shape]  # fmt: skip
    if missing or unexpected or shapes:
        raise UserError(
            f"--cond-weights: {path} is not a state dict of timm {name!r} "
            "(features_only=True, with --cond-channels input channels): "
            f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}, "
            f"shapes {shapes[:3]}"
        )
    backbone.load_state_dict(state, strict=True)


class DualUNet(Denoiser):
    """Shared encoder and mid block, two decouple modules and decoders: (c_hat, eps_hat);
    with ``prediction="x0"`` the c branch alone, giving x0_hat = -c_hat."""

    Config = DualUNetConfig

    def __init__(self, config: DualUNetConfig | None = None) -> None:
        super().__init__(config)
        cfg = self.config
        if self.process.name != "decoupled":
            raise UserError(
                f"denoiser dual-unet predicts the decoupled pair (c, eps); its process must be "
                f"'decoupled', not {self.process.name!r}"
            )
        temb = 4 * cfg.width
        widths = [cfg.width * m for m in cfg.mults]
        self.time = nn.Sequential(nn.Linear(cfg.width, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.cond_encoder = ConditionEncoder(cfg) if cfg.cond_encoder else None
        if cfg.cond_weights is not None:
            # the weights now live in this model's state dict: a checkpoint rebuilt from the
            # config must not need the file (the user's own config object is left as it is)
            self.config = dataclasses.replace(cfg, cond_weights=None)
        self.conv_in = nn.Conv2d(cfg.channels, cfg.width, 3, padding=1)
        self.down = nn.ModuleList()
        ch = cfg.width
        for level, width in enumerate(widths):
            self.down.append(Level(ch, width, cfg, down=level < len(widths) - 1))
            ch = width
        self.mid = nn.ModuleList(
            [
                ResBlock(ch, ch, temb, cfg.groups, cfg.dropout),
                LinearAttention(ch, cfg.heads, cfg.groups),
                ResBlock(ch, ch, temb, cfg.groups, cfg.dropout),
            ]
        )
        self.decouple_c = Decouple(ch, cfg.groups)
        self.decoder_c = Decoder(cfg)
        self.two_heads = cfg.prediction == "c_eps"
        if self.two_heads:
            self.decouple_eps = Decouple(ch, cfg.groups)
            self.decoder_eps = Decoder(cfg)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, cond: Cond = None
    ) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
        cfg = self.config
        factor = 2 ** (len(cfg.mults) - 1)
        if x.ndim != 4 or x.shape[-1] % factor or x.shape[-2] % factor:
            raise UserError(
                f"dual-unet: input of shape {tuple(x.shape)} must be (B, C, H, W) with H and W "
                f"divisible by {factor}"
            )
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        context = self._context(cond, x.shape[0])
        tb = t.to(x.dtype)[:, None, None, None]
        inp = x / (1 + tb).sqrt() if cfg.precondition else x

        emb = self.time(noise_embedding(t, cfg.width).to(x.dtype))
        h = self.conv_in(inp)
        skips = []
        for block in self.down:
            h = block(h, emb, context)
            skips.append(h)
            if block.down is not None:
                h = block.down(h)
        h = self.mid[0](h, emb)
        h = self.mid[1](h)
        h = self.mid[2](h, emb)
        f1 = self.decoder_c(self.decouple_c(h), emb, context, skips)
        c_hat = (tb - 1) * x + (tb / (1 + tb).sqrt()) * f1 if cfg.precondition else f1
        if not self.two_heads:
            return -c_hat  # x0_hat: the loop derives eps_hat from x_t and it
        f2 = self.decoder_eps(self.decouple_eps(h), emb, context, skips)
        eps_hat = tb.sqrt() * x + ((1 - tb) / (1 + tb)).sqrt() * f2 if cfg.precondition else f2
        return c_hat, eps_hat

    def _context(self, cond: Cond, batch: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Condition tokens and their positions, computed once per forward."""
        if self.cond_encoder is None:
            return None
        image = cond.get("image") if cond is not None else None
        if image is None:
            raise UserError(
                "dual-unet: this model is image-conditional; pass cond={'image': (B, C, h, w)}"
            )
        if image.ndim != 4 or image.shape[1] != self.config.cond_channels:
            raise UserError(
                f"dual-unet: condition image of shape {tuple(image.shape)}; expected "
                f"(B, {self.config.cond_channels}, h, w)"
            )
        if image.shape[0] not in (1, batch):
            raise UserError(f"dual-unet: {image.shape[0]} condition images for a batch of {batch}")
        tokens, pos = self.cond_encoder(image)
        return tokens.expand(batch, -1, -1), pos
