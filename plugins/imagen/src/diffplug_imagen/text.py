"""A self-contained text encoder, trained with the model: needs no outside weights.

Prompts are lower-cased and whitespace-collapsed, then read as UTF-8 bytes or as words
(``--tokens``); neither needs a vocabulary file to ship or lose. A word's embedding is the
sum of two rows of a hashed table (``--buckets``): two words share both rows only by rare
chance, so every word of the training captions gets its own embedding, and a word never
seen in training gets untrained rows (its prompt reads as noise there; bytes degrade more
gracefully, but must learn to spell). The tokens are prefixed by a summary token; a small
pre-norm transformer encodes them. The output is
Imagen's pair: per-token embeddings for cross-attention (padding masked) and a pooled vector
(the summary token's) added to the time embedding. An empty or missing prompt is the null
condition: only the summary token is attended to, so its embedding is learned through
condition dropout and is the unconditional half of classifier-free guidance.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from diffplug import Cond, Conditioner, OptionError, UserError, option

PAD, SUMMARY, VOCAB = 0, 257, 258
#: a word is a run of letters and digits, or one other non-space character (":" "," "-")
WORD = re.compile(r"\w+|[^\w\s]")
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
    max_tokens: int = option(24, "prompt length in tokens; a longer prompt is refused", min=1)
    tokens: str = option(
        "bytes", "what a token is: a UTF-8 byte, or a word", choices=("bytes", "words")
    )
    buckets: int = option(4096, "--tokens words: rows of each of the two hashed tables", min=16)
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
        # words: ids 1..buckets hash into the first table, buckets+1..2*buckets the second
        rows = VOCAB if cfg.tokens == "bytes" else 2 * cfg.buckets + 2
        self.tokens = nn.Embedding(rows, cfg.dim)
        self.summary = SUMMARY if cfg.tokens == "bytes" else rows - 1
        self.positions = nn.Parameter(torch.randn(cfg.max_tokens + 1, cfg.dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            cfg.dim, cfg.heads, 4 * cfg.dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.dim)

    def tokenize(self, prompts: Sequence[str | None], strict: bool = False) -> torch.Tensor:
        """(B, 1 + max_tokens) ids, or (B, 1 + max_tokens, 2) for words (a word's two hashed
        rows): the summary token, the prompt's tokens, padding. A longer prompt is cut
        (training phrasings) or, ``strict`` (sampling), refused: a cut prompt would draw
        another prompt's image while the recipe records the whole one."""
        if self.config.tokens == "words":
            return self._tokenize_words(prompts, strict)
        n = self.config.max_tokens
        ids = torch.full((len(prompts), n + 1), PAD, dtype=torch.long)
        ids[:, 0] = SUMMARY
        for k, prompt in enumerate(prompts):
            if _check(k, prompt) is None:
                continue
            data = normalise(prompt).encode("utf-8", errors="replace")
            if strict and len(data) > n:
                raise _too_long(k, prompt, len(data), n, "bytes")
            data = data[:n]
            if data:
                ids[k, 1 : 1 + len(data)] = torch.tensor(list(data)) + 1
        return ids

    def _tokenize_words(self, prompts: Sequence[str | None], strict: bool) -> torch.Tensor:
        n, buckets = self.config.max_tokens, self.config.buckets
        ids = torch.full((len(prompts), n + 1, 2), PAD, dtype=torch.long)
        ids[:, 0] = self.summary
        for k, prompt in enumerate(prompts):
            if _check(k, prompt) is None:
                continue
            words = WORD.findall(normalise(prompt))
            if strict and len(words) > n:
                raise _too_long(k, prompt, len(words), n, "words")
            for j, word in enumerate(words[:n]):
                digest = hashlib.blake2b(word.encode("utf-8", "replace"), digest_size=8).digest()
                first, second = (int.from_bytes(digest[i : i + 4], "little") for i in (0, 4))
                ids[k, 1 + j] = torch.tensor([1 + first % buckets, 1 + buckets + second % buckets])
        return ids

    def forward(self, inputs: Sequence[Any]) -> Cond:
        return self.encode(self.tokenize(inputs, strict=True))

    def encode(self, ids: torch.Tensor) -> Cond:
        """The conditioning of token ids (``tokenize``)."""
        device = self.positions.device
        ids = ids.to(device)
        if ids.dim() == 3:  # words: the sum of a word's two hashed rows
            mask = ids[..., 0] != PAD
            h = self.tokens(ids).sum(2)
        else:
            mask = ids != PAD
            h = self.tokens(ids)
        h = h + self.positions[: ids.shape[1]]
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


def _check(k: int, prompt: object) -> str | None:
    if prompt is not None and not isinstance(prompt, str):
        raise UserError(
            f"text conditioner: prompt {k} must be a string or None; got {type(prompt).__name__}"
        )
    return prompt


def _too_long(k: int, prompt: str, length: int, limit: int, unit: str) -> UserError:
    return UserError(
        f"text conditioner: prompt {k} is {length} {unit}, but this model's encoder reads at "
        f"most {limit}: shorten it ({prompt[:40]!r}...)"
    )


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
