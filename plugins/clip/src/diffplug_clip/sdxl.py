"""SDXL's text conditioning: two CLIP encoders read together, ``clip-sdxl``.

Each encoder reads the prompt in its own 77-token windows (its own pad token) and gives its
penultimate layer's hidden states without the final layer norm; the two are concatenated
along the width, ``{"text": (B, 77*W, D1 + D2)}``, and the second encoder's projection of
its first window's end-of-text token is ``{"pooled": (B, P)}``, the UNet's added text
embedding (``added_cond_kwargs["text_embeds"]``), as diffusers' ``StableDiffusionXLPipeline``
forms them. The unconditional condition (no negative prompt) is all zeros when
``zero_null`` is set (SDXL's ``force_zeros_for_empty_prompt``), else the empty prompt's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from diffplug import Cond, Conditioner, UserError, option
from diffplug_clip.clip import WINDOW, CLIPConditioner, CLIPConfig, need_captions


@dataclass
class SDXLConfig:
    first: dict = option({}, "the first encoder's clip options (CLIP ViT-L: hidden states)")
    second: dict = option(
        {}, "the second encoder's clip options (OpenCLIP bigG, with projection: also pooled)"
    )
    zero_null: bool = option(
        True, "guidance's unconditional half is zeros, not the empty prompt (SDXL's default)"
    )


class SDXLConditioner(Conditioner):
    """Prompts -> SDXL's ``{"text", "pooled"}``; frozen like ``clip``."""

    Config = SDXLConfig
    kind = "text"

    def __init__(self, config: SDXLConfig | None = None) -> None:
        super().__init__(config)
        # both read the penultimate layer as it is (diffusers' hidden_states[-2])
        layer = {"clip_skip": 2, "final_norm": False}
        self.first = CLIPConditioner(CLIPConfig(**{**self.config.first, **layer}))
        self.second = CLIPConditioner(CLIPConfig(**{**self.config.second, **layer, "pooled": True}))
        self.first.name, self.second.name = "clip", "clip"

    def train(self, mode: bool = True) -> SDXLConditioner:
        super().train(mode)
        self.first.train(False)
        self.second.train(False)
        return self

    @torch.no_grad()
    def forward(self, inputs: Sequence[Any]) -> Cond:
        if not inputs:
            raise UserError("clip-sdxl conditioner: no prompts given")
        a, b = self.first(list(inputs)), self.second(list(inputs))
        if a["text"].shape[1] != b["text"].shape[1]:  # the two tokenizers share a vocabulary
            raise UserError("clip-sdxl conditioner: the two tokenizers split the prompt apart")
        text, pooled = torch.cat([a["text"], b["text"]], dim=-1), b["pooled"]
        if self.config.zero_null:
            real = torch.tensor([p is not None for p in inputs], device=text.device)
            text = torch.where(real.view(-1, 1, 1), text, torch.zeros_like(text))
            pooled = torch.where(real.view(-1, 1), pooled, torch.zeros_like(pooled))
        return {"text": text, "pooled": pooled}

    def align(self, conds: Sequence[Cond], inputs: Sequence[Any] = ()) -> list[Cond]:
        """Every condition padded to the draw's most windows: with the empty prompt's window
        (both encoders'), or with zeros for a zero condition."""
        conds = list(conds)
        present = [c for c in conds if c is not None]
        if not present:
            return conds
        most = max((self.first.count(p) for p in inputs if isinstance(p, str)), default=1)
        width = max(max(c["text"].shape[1] for c in present), WINDOW * most)
        with torch.no_grad():
            empty = torch.cat([self.first.encode(self.first._empty),
                               self.second.encode(self.second._empty)], dim=-1)  # fmt: skip
        out: list[Cond] = []
        for c in conds:
            if c is None or c["text"].shape[1] == width:
                out.append(c)
                continue
            text = c["text"]
            missing = (width - text.shape[1]) // WINDOW
            zero = (text.flatten(1).abs().amax(1) == 0).view(-1, 1, 1)
            pad = empty.to(text).repeat(missing, 1).expand(text.shape[0], -1, -1)
            pad = torch.where(zero, torch.zeros_like(pad), pad)
            out.append({**c, "text": torch.cat([text, pad], dim=1)})
        return out

    def from_data(
        self,
        x0: torch.Tensor,
        generator: torch.Generator,
        labels: torch.Tensor | None = None,
        captions: Sequence[str] | None = None,
    ) -> Cond:
        """Training's condition: the batch's captions."""
        return self.forward(need_captions(captions, "clip-sdxl"))
