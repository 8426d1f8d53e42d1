"""Building blocks for plugin authors' denoisers: time features, residual blocks, attention.

Small and dependency-free (torch and einops), so two plugins' UNets share them instead of
each copying them. Output layers start at zero, so a new block is the identity.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of t (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=1)


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with the most groups (<= 32) that keep at least 4 channels per group."""
    groups = next(
        g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0 and channels // g >= 4 or g == 1
    )
    return nn.GroupNorm(groups, channels)


def zero_init(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice; the embedding sets a scale and shift after the second norm."""

    def __init__(self, cin: int, cout: int, temb: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = group_norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(temb, 2 * cout)
        self.norm2 = group_norm(cout)
        self.drop = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.drop(F.silu(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head self-attention over the pixels of a feature map, residual."""

    def __init__(self, channels: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        q, k, v = rearrange(
            self.qkv(self.norm(x)), "b (three n d) h w -> three b n (h w) d", three=3, n=self.heads
        )
        o = F.scaled_dot_product_attention(q, k, v)
        return x + self.out(rearrange(o, "b n (h w) d -> b (n d) h w", h=h, w=w))


class CrossAttention(nn.Module):
    """Pixels attend to a sequence of context tokens (text), residual.

    ``mask`` (B, L) marks real tokens. A learned null key/value is always attendable, so a
    sample whose tokens are all masked (the empty prompt) still has a defined output.
    """

    def __init__(self, channels: int, context_dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.kv = nn.Linear(context_dim, 2 * channels)
        self.null_kv = nn.Parameter(torch.randn(2, channels) * 0.02)
        self.out = zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        q = rearrange(self.q(self.norm(x)), "b (n d) h w -> b n (h w) d", n=self.heads)
        kv = torch.cat([self.null_kv[None, None].expand(b, 1, 2, -1).flatten(2),
                        self.kv(context)], dim=1)  # fmt: skip
        k, v = rearrange(kv, "b l (two n d) -> two b n l d", two=2, n=self.heads)
        keep = torch.cat([mask.new_ones(b, 1), mask], dim=1).bool()[:, None, None, :]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        return x + self.out(rearrange(o, "b n (h w) d -> b (n d) h w", h=h, w=w))
