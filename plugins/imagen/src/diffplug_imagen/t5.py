"""A frozen T5 encoder as the text conditioner, Imagen's choice (T5-XXL there).

Loads a checkpoint from a local folder the user names (a Hugging Face ``save_pretrained``
folder with safetensors weights and a tokenizer); nothing is downloaded and pickle weights
are refused. Needs ``pip install 'diffplug-imagen[t5]'`` (transformers).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffplug import Cond, Conditioner, UserError, option


@dataclass
class T5Config:
    path: str = option("", "local folder with the T5 encoder (safetensors) and its tokenizer")
    max_tokens: int = option(64, "prompt length in tokens; longer prompts are cut", min=1)


class T5Conditioner(Conditioner):
    """Prompts -> {"text": (B, L, d_model), "text_mask": (B, L), "text_pooled": (B, d_model)}.

    The pooled vector is the mean of the unmasked token embeddings. Frozen: never trained,
    kept in eval mode. ``None`` prompts are the empty prompt (the guidance null).
    """

    Config = T5Config
    kind = "text"

    def __init__(self, config: T5Config | None = None) -> None:
        super().__init__(config)
        try:
            from transformers import AutoTokenizer, T5EncoderModel
        except ImportError:
            raise UserError(
                "conditioner t5 needs transformers: pip install 'diffplug-imagen[t5]'"
            ) from None
        folder = Path(self.config.path)
        if not self.config.path or not folder.is_dir():
            raise UserError(
                f"conditioner t5: --path must name a local folder holding a T5 encoder saved "
                f"with save_pretrained (got {self.config.path!r}); nothing is downloaded"
            )
        if not any(folder.glob("*.safetensors")):
            raise UserError(
                f"conditioner t5: {folder} has no .safetensors weights (pickle checkpoints "
                "are refused); re-save it with save_pretrained(safe_serialization=True)"
            )
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            self.encoder = T5EncoderModel.from_pretrained(
                folder, local_files_only=True, use_safetensors=True
            )
        except (OSError, ValueError) as exc:
            raise UserError(f"conditioner t5: cannot load {folder}: {exc}") from None
        self.encoder.requires_grad_(False).eval()

    @property
    def dim(self) -> int:
        return int(self.encoder.config.d_model)

    def train(self, mode: bool = True) -> T5Conditioner:
        super().train(mode)
        self.encoder.eval()  # frozen: dropout stays off even while the denoiser trains
        return self

    @torch.no_grad()
    def forward(self, inputs: Sequence[Any]) -> Cond:
        prompts = ["" if p is None else p for p in inputs]
        for k, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise UserError(f"t5 conditioner: prompt {k} must be a string or None")
        device = next(self.encoder.parameters()).device
        for k, prompt in enumerate(prompts):  # never cut a prompt silently
            length = len(self.tokenizer(prompt)["input_ids"])
            if length > self.config.max_tokens:
                raise UserError(
                    f"t5 conditioner: prompt {k} is {length} tokens, more than --max-tokens "
                    f"{self.config.max_tokens}: shorten it or raise --max-tokens"
                )
        batch = self.tokenizer(prompts, padding="max_length", truncation=True,
                               max_length=self.config.max_tokens, return_tensors="pt")  # fmt: skip
        ids = batch["input_ids"].to(device)
        mask = batch["attention_mask"].to(device).bool()
        text = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        text = text * mask[..., None]
        pooled = text.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return {"text": text, "text_mask": mask, "text_pooled": pooled}

    def from_data(
        self,
        x0: torch.Tensor,
        generator: torch.Generator,
        labels: torch.Tensor | None = None,
        captions: Sequence[str] | None = None,
    ) -> Cond:
        """The data's captions, or digit labels phrased as the text conditioner phrases
        them, then encoded."""
        from diffplug_imagen.text import training_prompts

        return self.forward(training_prompts("auto", labels, captions, generator, "t5"))
