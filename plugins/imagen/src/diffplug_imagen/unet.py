"""Imagen's Efficient U-Net, sized for small images: a text- or image-conditional denoiser.

What makes it "efficient" (Saharia et al. 2022, appendix): more residual blocks at the low
resolutions where they are cheap, skip connections scaled by 1/sqrt(2), downsampling before
a level's blocks and upsampling after them. Text enters twice: the pooled vector is added to
the time embedding, and the per-token embeddings are attended to (padding masked). A
super-resolution stage (``--low-size``) takes the low-resolution condition image, upsampled
bilinearly, as extra input channels, and the noise-augmentation level of that image
(``cond["aug_level"]``, 0 when absent) as a second embedded scalar.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from diffplug import (
    Attention,
    Cond,
    CrossAttention,
    Denoiser,
    DenoiserConfig,
    IncompatibleError,
    OptionError,
    ResBlock,
    group_norm,
    option,
    timestep_embedding,
    zero_init,
)

SKIP_SCALE = 1 / math.sqrt(2)


@dataclass
class EfficientUNetConfig(DenoiserConfig):
    width: int = option(32, "channels at the first level", min=8)
    mults: list[int] = option([1, 2], "channel multiplier per level (each level halves the size)")
    blocks: list[int] = option([1, 2], "residual blocks per level (more where it is cheap)")
    attention: list[int] = option([4], "resolutions with self-attention")
    cross_attention: list[int] = option([8, 4], "resolutions attending to the text tokens")
    heads: int = option(4, "attention heads", min=1)
    dropout: float = option(0.1, "dropout in residual blocks", min=0.0, max=1.0)
    text_dim: int = option(0, "width of the text embeddings (0: no text)", min=0)
    low_size: int = option(0, "super-resolution: side of the condition image (0: a base model)",
                           min=0)  # fmt: skip
    low_channels: int = option(1, "super-resolution: channels of the condition image", min=1)

    def __post_init__(self) -> None:
        owner = "denoiser efficient-unet"
        if self.conditioning == "none":
            self.conditioning = None
        wanted = "image" if self.low_size else ("text" if self.text_dim else None)
        if self.low_size and self.text_dim:
            raise OptionError(
                f"{owner}: a stage is conditioned on text (--text-dim) or on a low-resolution "
                "image (--low-size), not both"
            )
        if self.conditioning not in (None, wanted):
            raise OptionError(
                f"{owner}: --conditioning {self.conditioning!r} does not fit; it follows from "
                "--text-dim (text) or --low-size (image)"
            )
        self.conditioning = wanted
        if not self.mults or len(self.blocks) != len(self.mults):
            raise OptionError(f"{owner}: --blocks needs one count per level of --mults")
        if any(m < 1 for m in self.mults) or any(b < 1 for b in self.blocks):
            raise OptionError(f"{owner}: --mults and --blocks must be positive")
        factor = 2 ** (len(self.mults) - 1)
        if self.size % factor:
            raise OptionError(f"{owner}: --size {self.size} must be divisible by {factor}")
        for mult in self.mults:
            if (self.width * mult) % self.heads:
                raise OptionError(f"{owner}: width * mult must be divisible by --heads")


class Level(nn.Module):
    """Residual blocks, then optional cross-attention to text and self-attention."""

    def __init__(self, cin: int, cout: int, blocks: int, temb: int, cfg: EfficientUNetConfig,
                 res: int) -> None:  # fmt: skip
        super().__init__()
        self.blocks = nn.ModuleList(
            ResBlock(cin if i == 0 else cout, cout, temb, cfg.dropout) for i in range(blocks)
        )
        self.cross = (
            CrossAttention(cout, cfg.text_dim, cfg.heads)
            if cfg.text_dim and res in cfg.cross_attention
            else None
        )
        self.attn = Attention(cout, cfg.heads) if res in cfg.attention else None

    def forward(self, h: torch.Tensor, emb: torch.Tensor, text: tuple | None) -> torch.Tensor:
        for block in self.blocks:
            h = block(h, emb)
        if self.cross is not None and text is not None:
            h = self.cross(h, *text)
        if self.attn is not None:
            h = self.attn(h)
        return h


class EfficientUNet(Denoiser):
    """Runs under any sampler of the process it was trained on (eps, x0 or v)."""

    Config = EfficientUNetConfig

    def __init__(self, config: EfficientUNetConfig | None = None) -> None:
        super().__init__(config)
        cfg = self.config
        temb = 4 * cfg.width
        self.t_scale = 1000.0 / max(self.process.t_range[1], 1e-9)
        self.time = nn.Sequential(nn.Linear(cfg.width, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.pooled = nn.Linear(cfg.text_dim, temb) if cfg.text_dim else None
        self.aug = (
            nn.Sequential(nn.Linear(cfg.width, temb), nn.SiLU(), zero_init(nn.Linear(temb, temb)))
            if cfg.low_size
            else None
        )
        extra = cfg.low_channels if cfg.low_size else 0
        self.conv_in = nn.Conv2d(cfg.channels + extra, cfg.width, 3, padding=1)

        chans = [cfg.width * m for m in cfg.mults]
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        ch, res = cfg.width, cfg.size
        for level, (cout, blocks) in enumerate(zip(chans, cfg.blocks, strict=True)):
            if level > 0:  # downsample first: the level's blocks run at the smaller size
                self.downsample.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                res //= 2
            self.down.append(Level(ch, cout, blocks, temb, cfg, res))
            ch = cout
        self.mid = Level(ch, ch, 2, temb, cfg, res)
        self.mid_attn = Attention(ch, cfg.heads)
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for level in reversed(range(len(chans))):
            cout = chans[level]
            self.up.append(Level(ch + chans[level], cout, cfg.blocks[level], temb, cfg, res))
            ch = cout
            if level > 0:  # upsample last
                self.upsample.append(
                    nn.Sequential(
                        nn.Upsample(scale_factor=2, mode="nearest"),
                        nn.Conv2d(ch, chans[level - 1], 3, padding=1),
                    )  # fmt: skip
                )
                ch = chans[level - 1]
                res *= 2
        self.norm_out = group_norm(ch)
        self.conv_out = zero_init(nn.Conv2d(ch, cfg.channels, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Cond = None) -> torch.Tensor:
        cfg = self.config
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        emb = self.time(timestep_embedding(t * self.t_scale, cfg.width))
        text = None
        if self.pooled is not None:
            text_cond = self._text(cond, x.shape[0])
            emb = emb + self.pooled(text_cond[2])
            text = text_cond[:2]
        if self.aug is not None:
            image, level = self._image(cond, x)
            x = torch.cat([x, image], dim=1)
            emb = emb + self.aug(timestep_embedding(level * 1000.0, cfg.width))
        h = self.conv_in(x)
        skips = []
        for level, block in enumerate(self.down):
            if level > 0:
                h = self.downsample[level - 1](h)
            h = block(h, emb, text)
            skips.append(h)
        h = self.mid_attn(self.mid(h, emb, text))
        for k, block in enumerate(self.up):
            h = block(torch.cat([h, skips.pop() * SKIP_SCALE], dim=1), emb, text)
            if k < len(self.upsample):
                h = self.upsample[k](h)
        return self.conv_out(F.silu(self.norm_out(h)))

    def _text(self, cond: Cond, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        keys = ("text", "text_mask", "text_pooled")
        if cond is None or any(k not in cond for k in keys):
            raise IncompatibleError(
                "efficient-unet: this model is text-conditional; it needs cond with "
                f"{', '.join(keys)} (a text conditioner: text or t5)"
            )
        tokens, mask, pooled = (cond[k] for k in keys)
        if tokens.shape[-1] != self.config.text_dim:
            raise IncompatibleError(
                f"efficient-unet: text embeddings of width {tokens.shape[-1]}, but the model "
                f"was built for --text-dim {self.config.text_dim}"
            )
        return tokens.expand(batch, -1, -1), mask.expand(batch, -1), pooled.expand(batch, -1)

    def _image(self, cond: Cond, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        image = cond.get("image") if cond is not None else None
        if image is None or image.ndim != 4 or image.shape[1] != cfg.low_channels:
            got = tuple(image.shape) if image is not None else None
            raise IncompatibleError(
                f"efficient-unet: a super-resolution stage needs cond['image'] of shape "
                f"(B, {cfg.low_channels}, h, w); got {got}"
            )
        if tuple(image.shape[-2:]) != (cfg.low_size, cfg.low_size):
            raise IncompatibleError(
                f"efficient-unet: this stage was trained on {cfg.low_size}x{cfg.low_size} "
                f"conditions; got {image.shape[-2]}x{image.shape[-1]} (a conditioner's "
                "--low-size must be the model's)"
            )
        up = F.interpolate(image.to(x.dtype), size=x.shape[-2:], mode="bilinear",
                           align_corners=False)  # fmt: skip
        level = cond.get("aug_level") if cond is not None else None
        if level is None:
            level = torch.zeros(x.shape[0], device=x.device)
        return up.expand(x.shape[0], -1, -1, -1), level.to(x.device).expand(x.shape[0])
