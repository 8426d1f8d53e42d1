"""A small UNet denoiser (Ho et al. 2020 / Nichol & Dhariwal 2021 style) for any process.

Residual blocks with a timestep embedding (scale and shift after GroupNorm), self-attention
at chosen resolutions, skip connections by concatenation, zero-initialised output layers so
training starts from the identity. Sized by ``width``, ``mults`` and ``blocks`` so a digits
model trains on two CPU cores in minutes. Optional class conditioning adds a label embedding
(label ``num_classes`` is the null label used for classifier-free guidance).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from diffplug import (
    Attention,
    Cond,
    Denoiser,
    DenoiserConfig,
    ResBlock,
    group_norm,
    option,
    timestep_embedding,
    zero_init,
)


@dataclass
class UNetConfig(DenoiserConfig):
    width: int = option(32, "channels at the first level", min=8)
    mults: list[int] = option([1, 2], "channel multiplier per level (each level halves the size)")
    blocks: int = option(1, "residual blocks per level", min=1)
    attention: list[int] = option([4], "resolutions with self-attention")
    heads: int = option(4, "attention heads", min=1)
    dropout: float = option(
        0.1,
        "dropout in residual blocks (0.1 keeps the digits model from memorising)",
        min=0.0,
        max=1.0,
    )
    num_classes: int = option(
        0, "class-conditional with this many classes (0: unconditional)", min=0
    )


class UNet(Denoiser):
    """The DDPM plugin's UNet; runs under any sampler of the process it was trained on."""

    Config = UNetConfig

    def __init__(self, config: UNetConfig | None = None) -> None:
        super().__init__(config)
        cfg = self.config
        temb = 4 * cfg.width
        self.t_scale = 1000.0 / max(self.process.t_range[1], 1e-9)
        self.time = nn.Sequential(nn.Linear(cfg.width, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.label = nn.Embedding(cfg.num_classes + 1, temb) if cfg.num_classes else None
        self.conv_in = nn.Conv2d(cfg.channels, cfg.width, 3, padding=1)

        self.down = nn.ModuleList()
        skips, ch, res = [cfg.width], cfg.width, cfg.size
        for level, mult in enumerate(cfg.mults):
            for _ in range(cfg.blocks):
                block = nn.ModuleList([ResBlock(ch, cfg.width * mult, temb, cfg.dropout)])
                ch = cfg.width * mult
                if res in cfg.attention:
                    block.append(Attention(ch, cfg.heads))
                self.down.append(block)
                skips.append(ch)
            if level < len(cfg.mults) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(ch, ch, 3, stride=2, padding=1)]))
                skips.append(ch)
                res //= 2
        self.mid = nn.ModuleList(
            [
                ResBlock(ch, ch, temb, cfg.dropout),
                Attention(ch, cfg.heads),
                ResBlock(ch, ch, temb, cfg.dropout),
            ]
        )
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.mults))):
            for _ in range(cfg.blocks + 1):
                block = nn.ModuleList(
                    [ResBlock(ch + skips.pop(), cfg.width * mult, temb, cfg.dropout)]
                )
                ch = cfg.width * mult
                if res in cfg.attention:
                    block.append(Attention(ch, cfg.heads))
                self.up.append(block)
            if level > 0:
                self.up.append(
                    nn.ModuleList(
                        [
                            nn.Upsample(scale_factor=2, mode="nearest"),
                            nn.Conv2d(ch, ch, 3, padding=1),
                        ]
                    )
                )
                res *= 2
        self.norm_out = group_norm(ch)
        self.conv_out = zero_init(nn.Conv2d(ch, cfg.channels, 3, padding=1))

    @property
    def null_label(self) -> int:
        return self.config.num_classes  # the extra embedding row, learned by label dropout

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Cond = None) -> torch.Tensor:
        emb = self.time(timestep_embedding(t * self.t_scale, self.config.width))
        if self.label is not None:
            labels = cond["labels"] if cond is not None else None
            if labels is None:
                labels = torch.full((x.shape[0],), self.config.num_classes, device=x.device)
            emb = emb + self.label(labels)
        h = self.conv_in(x)
        hs = [h]
        for block in self.down:
            h = self._run_block(block, h, emb)
            hs.append(h)
        for layer in self.mid:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        for block in self.up:
            if isinstance(block[0], ResBlock):
                h = torch.cat([h, hs.pop()], dim=1)
            h = self._run_block(block, h, emb)
        return self.conv_out(F.silu(self.norm_out(h)))

    @staticmethod
    def _run_block(block: nn.ModuleList, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in block:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        return h
