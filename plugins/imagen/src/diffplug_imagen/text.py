"""A self-contained text encoder, trained with the model: needs no outside weights.

Prompts are lower-cased, whitespace-collapsed UTF-8 bytes (no vocabulary file to ship or
lose), prefixed by a summary token; a small pre-norm transformer encodes them. The output is
Imagen's pair: per-token embeddings for cross-attention (padding masked) and a pooled vector
(the summary token's) added to the time embedding. An empty or missing prompt is the null
condition: only the summary token is attended to, so its embedding is learned through
condition dropout and is the unconditional half of classifier-free guidance.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from diffplug import Cond, Conditioner, OptionError, UserError, option

PAD, SUMMARY, VOCAB = 0, 257, 258
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
#: phrasings of a digit label used to train on the digits ({n}: "7", {w}: "seven")
DIGIT_PHRASINGS = (
    "{n}",
    "{w}",
    "a handwritten {w}",
    "the digit {n}",
    "the number {w}",
    "a handwritten {n}",
)


def digit_prompt(label: int, phrasing: int) -> str:
    return DIGIT_PHRASINGS[phrasing].format(n=label, w=WORDS[label])


def normalise(prompt: str) -> str:
    return " ".join(prompt.lower().split())


@dataclass
class TextConfig:
    max_tokens: int = option(24, "prompt length in bytes; a longer prompt is refused", min=1)
    dim: int = option(64, "embedding width (the denoiser's --text-dim must match)", min=8)
    layers: int = option(2, "transformer layers", min=1)
    heads: int = option(4, "attention heads (must divide --dim)", min=1)
    prompts: str = option(
        "auto",
        "training prompts: the data's captions, or digit labels phrased (auto: captions "
        "when the data has them)",
        choices=("auto", "captions", "digits"),
    )

    def __post_init__(self) -> None:
        if self.dim % self.heads:
            raise OptionError(f"conditioner text: --dim {self.dim} must be divisible by --heads")


class TextConditioner(Conditioner):
    """Prompts -> {"text": (B, L, dim), "text_mask": (B, L), "text_pooled": (B, dim)}."""

    Config = TextConfig
    kind = "text"
    trainable = True

    def __init__(self, config: TextConfig | None = None) -> None:
        super().__init__(config)
        cfg = self.config
        self.tokens = nn.Embedding(VOCAB, cfg.dim)
        self.positions = nn.Parameter(torch.randn(cfg.max_tokens + 1, cfg.dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            cfg.dim, cfg.heads, 4 * cfg.dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.dim)

    def tokenize(self, prompts: Sequence[str | None], strict: bool = False) -> torch.Tensor:
        """(B, 1 + max_tokens) ids: the summary token, the prompt's bytes + 1, padding. A
        longer prompt is cut (training phrasings) or, ``strict`` (sampling), refused: a cut
        prompt would draw another prompt's image while the recipe records the whole one."""
        n = self.config.max_tokens
        ids = torch.full((len(prompts), n + 1), PAD, dtype=torch.long)
        ids[:, 0] = SUMMARY
        for k, prompt in enumerate(prompts):
            if prompt is None:
                continue
            if not isinstance(prompt, str):
                raise UserError(
                    f"text conditioner: prompt {k} must be a string or None; got "
                    f"{type(prompt).__name__}"
                )
            data = normalise(prompt).encode("utf-8", errors="replace")
            if strict and len(data) > n:
                raise UserError(
                    f"text conditioner: prompt {k} is {len(data)} bytes, but this model's "
                    f"encoder reads at most {n}: shorten it ({prompt[:40]!r}...)"
                )
            data = data[:n]
            if data:
                ids[k, 1 : 1 + len(data)] = torch.tensor(list(data)) + 1
        return ids

    def forward(self, inputs: Sequence[Any]) -> Cond:
        return self.encode(self.tokenize(inputs, strict=True))

    def encode(self, ids: torch.Tensor) -> Cond:
        """The conditioning of token ids (``tokenize``)."""
        device = self.positions.device
        ids = ids.to(device)
        mask = ids != PAD
        h = self.tokens(ids) + self.positions[: ids.shape[1]]
        h = self.norm(self.encoder(h, src_key_padding_mask=~mask))
        return {"text": h, "text_mask": mask, "text_pooled": h[:, 0]}

    def from_data(
        self,
        x0: torch.Tensor,
        generator: torch.Generator,
        labels: torch.Tensor | None = None,
        captions: Sequence[str] | None = None,
    ) -> Cond:
        """Each image's caption, or its label in a phrasing drawn from ``generator`` ("7",
        "a handwritten seven", ...). Training cuts a caption longer than ``max_tokens``."""
        prompts = training_prompts(self.config.prompts, labels, captions, generator, "text")
        return self.encode(self.tokenize(prompts))


def training_prompts(
    mode: str,
    labels: torch.Tensor | None,
    captions: Sequence[str] | None,
    generator: torch.Generator,
    owner: str,
) -> list[str]:
    """A batch's prompts under ``--prompts`` (``TextConfig.prompts``)."""
    if mode == "captions" or (mode == "auto" and captions is not None):
        if captions is None:
            raise UserError(
                f"{owner} conditioner: --prompts captions needs captioned data (a data set "
                "with captions, or a folder with a .txt beside each image)"
            )
        return list(captions)
    return digit_prompts(labels, generator, owner)


def digit_prompts(labels: torch.Tensor | None, generator: torch.Generator, owner: str) -> list[str]:
    """Training prompts for digit labels, one phrasing per image drawn from ``generator``."""
    if labels is None:
        raise UserError(
            f"{owner} conditioner: training needs labelled data to make prompts from "
            "(--data digits); a folder of images has no labels"
        )
    if int(labels.min()) < 0 or int(labels.max()) > 9:
        raise UserError(f"{owner} conditioner: digit prompts need labels 0..9")
    phrasing = torch.randint(len(DIGIT_PHRASINGS), (len(labels),), generator=generator)
    pairs = zip(labels.tolist(), phrasing.tolist(), strict=True)
    return [digit_prompt(int(y), int(p)) for y, p in pairs]
