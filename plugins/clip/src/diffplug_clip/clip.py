"""A frozen CLIP text encoder as the text conditioner: Stable Diffusion's conditioning.

Loads transformers' ``CLIPTextModel`` (or ``CLIPTextModelWithProjection``) and
``CLIPTokenizer`` from a local folder the user names (``--clip-path DIR``: a
``save_pretrained`` folder, or a Stable Diffusion folder with ``text_encoder/`` and
``tokenizer/``); nothing is downloaded and pickle weights are refused.

A prompt is read in SD's 77-token window: BOS, up to 75 tokens, EOS, padded with the
tokenizer's pad token (EOS for SD 1.x) to 77. The condition is ``{"text": (B, 77*W, D)}``,
the hidden state of the last layer (``--clip-skip 1``) or of the layer N - 1 before it,
through the final layer norm (``--clip-skip N``, as diffusers' ``clip_skip=N-1`` and A1111's
"clip skip N"). A longer prompt is split into W windows of 75 tokens, each with its own BOS
and EOS, encoded apart and concatenated along the sequence (A1111, compel), or refused
(``--long-prompt refuse``); it is never cut. Conditions with fewer windows than others they
meet (a short prompt beside a long one, guidance's null condition, a negative prompt) are
padded with the empty prompt's window (``align``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffplug import Cond, Conditioner, UserError, option

#: tokens of one window: BOS + 75 + EOS (SD's context length)
WINDOW = 77
#: prompt tokens per window
PER_WINDOW = WINDOW - 2


@dataclass
class CLIPConfig:
    clip_path: str = option(
        "",
        "local folder with a CLIP text encoder (safetensors) and its tokenizer, saved with "
        "save_pretrained, or a Stable Diffusion folder holding text_encoder/ and tokenizer/; "
        "nothing is downloaded",
    )
    clip_skip: int = option(
        1,
        "the layer whose hidden state conditions: 1 the last (SD 1.x), 2 the penultimate "
        "(SD 2.x, A1111's clip skip 2); the final layer norm is applied to it",
        min=1,
    )
    long_prompt: str = option(
        "split",
        "a prompt over 75 tokens: split into 75-token windows, each with its own BOS and EOS, "
        "encoded apart and concatenated (A1111, compel), or refuse it",
        choices=("split", "refuse"),
    )
    final_norm: bool = option(
        True,
        "with --clip-skip N > 1, pass that layer's hidden state through the final layer norm "
        "(SD 2.x, A1111); SDXL reads its penultimate layer without it",
    )
    pooled: bool = option(
        False,
        "also give the projection's pooled embedding of the first window, cond['pooled'] "
        "(B, P) (SDXL's second encoder; needs a CLIPTextModelWithProjection)",
    )
    encoder_config: dict = option(
        {},
        "the text encoder's transformers config, for an encoder whose weights are in the "
        "model's checkpoint (set by import-diffusers; --clip-path, when given, wins)",
    )
    tokenizer_files: dict = option(
        {}, "the tokenizer's files (vocab.json, merges.txt, ...) by name, as text, with it"
    )


class CLIPConditioner(Conditioner):
    """Prompts -> ``{"text": (B, 77*W, D)}``, W the number of 75-token windows (1 for a
    prompt of up to 75 tokens). Frozen: never trained, kept in eval mode. ``None`` is the
    empty prompt, which is the guidance null, as in Stable Diffusion.

    Each distinct window is encoded once per call, alone (a batch of one): a prompt's
    encoding is bitwise the same whatever else shares its batch, and a batch of one
    repeated prompt costs one encoder call.
    """

    Config = CLIPConfig
    kind = "text"

    def __init__(self, config: CLIPConfig | None = None) -> None:
        super().__init__(config)
        self._loaded = ""
        self._load(self.config.clip_path)
        self._counts: dict[str, int] = {}
        #: (the inputs of the last draw ``align`` saw, the most windows one of them needs)
        self._draw: tuple[Sequence[Any], int] | None = None

    # -- loading -----------------------------------------------------------------------
    def _load(self, path: str) -> None:
        try:
            from transformers import (
                CLIPTextConfig,
                CLIPTextModel,
                CLIPTextModelWithProjection,
                CLIPTokenizer,
            )
        except ImportError:
            raise UserError(
                "conditioner clip needs transformers: pip install transformers"
            ) from None
        from transformers.utils import logging as hf_logging

        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # no "Loading weights" bar on the CLI's stderr
        try:
            if path or not self.config.encoder_config:
                encoder_dir, tokenizer_dir = _folders(path)
                config = CLIPTextConfig.from_pretrained(encoder_dir, local_files_only=True)
                tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
            else:  # self-contained: the weights come from the model's file (load_state_dict)
                encoder_dir = tokenizer_dir = "the model's checkpoint"
                config = CLIPTextConfig.from_dict(self.config.encoder_config)
                tokenizer = tokenizer_from_files(self.config.tokenizer_files)
            projected = "CLIPTextModelWithProjection" in (config.architectures or [])
            cls = CLIPTextModelWithProjection if projected else CLIPTextModel
            if path or not self.config.encoder_config:
                encoder = cls.from_pretrained(
                    encoder_dir, local_files_only=True, use_safetensors=True
                )
            else:
                encoder = cls(config)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"conditioner clip: cannot load {path}: {first}") from None
        finally:
            if bar:
                hf_logging.enable_progress_bar()
        if self.config.pooled and not projected:
            raise UserError(
                "conditioner clip: --pooled needs a CLIPTextModelWithProjection encoder"
            )
        if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
            raise UserError(f"conditioner clip: the tokenizer in {tokenizer_dir} has no BOS/EOS")
        positions = int(encoder.config.max_position_embeddings)
        if positions < WINDOW:
            raise UserError(
                f"conditioner clip: the encoder in {encoder_dir} reads {positions} positions; "
                f"Stable Diffusion's CLIP reads {WINDOW}"
            )
        device = next(self.encoder.parameters()).device if hasattr(self, "encoder") else None
        self.tokenizer = tokenizer
        self.encoder = encoder.float().requires_grad_(False).eval()
        if device is not None:
            self.encoder.to(device)
        pad = tokenizer.pad_token_id
        self._bos, self._eos = int(tokenizer.bos_token_id), int(tokenizer.eos_token_id)
        self._pad = int(pad) if pad is not None else self._eos
        self._empty = self._window([])
        self._loaded = path
        self._counts = {}

    @property
    def dim(self) -> int:
        """The width D of the hidden states (768 for SD 1.x, 1024 for SD 2.x)."""
        return int(self.encoder.config.hidden_size)

    def train(self, mode: bool = True) -> CLIPConditioner:
        super().train(mode)
        self.encoder.eval()  # frozen: dropout stays off even while a denoiser trains
        return self

    # -- tokens ------------------------------------------------------------------------
    def tokens(self, prompt: str) -> list[int]:
        """The prompt's token ids, without BOS and EOS."""
        ids = self.tokenizer(prompt, add_special_tokens=False, verbose=False)["input_ids"]
        return [int(i) for i in ids]

    def windows(self, prompt: str, index: int = 0) -> list[tuple[int, ...]]:
        """The prompt's 77-token windows (BOS, up to 75 tokens, EOS, padding); one for a
        prompt of up to 75 tokens. Over 75 with ``--long-prompt refuse``: refused."""
        ids = self.tokens(prompt)
        if len(ids) > PER_WINDOW and self.config.long_prompt == "refuse":
            shown = prompt if len(prompt) <= 40 else prompt[:37] + "..."
            raise UserError(
                f"clip conditioner: prompt {index} ({shown!r}) is {len(ids)} tokens, more than "
                f"the {PER_WINDOW} of CLIP's {WINDOW}-token window: shorten it, or pass "
                "--long-prompt split to encode it in 75-token windows"
            )
        chunks = [ids[k : k + PER_WINDOW] for k in range(0, len(ids), PER_WINDOW)] or [[]]
        return [self._window(chunk) for chunk in chunks]

    def _window(self, chunk: list[int]) -> tuple[int, ...]:
        return (self._bos, *chunk, self._eos, *([self._pad] * (PER_WINDOW - len(chunk))))

    def count(self, prompt: str) -> int:
        """How many windows the prompt takes (cached per prompt)."""
        n = self._counts.get(prompt)
        if n is None:
            n = max(1, -(-len(self.tokens(prompt)) // PER_WINDOW))
            if len(self._counts) < 65536:
                self._counts[prompt] = n
        return n

    # -- encoding ----------------------------------------------------------------------
    def _check(self) -> None:
        if self.config.clip_path != self._loaded:  # ``configure`` changed the folder
            self._load(self.config.clip_path)
        layers = int(self.encoder.config.num_hidden_layers)
        if self.config.clip_skip > layers:
            raise UserError(
                f"conditioner clip: --clip-skip {self.config.clip_skip}, but the encoder has "
                f"{layers} layers (1 is the last)"
            )

    def encode(self, window: tuple[int, ...]) -> torch.Tensor:
        """(77, D) hidden states of one window, encoded alone: the last layer's
        (``last_hidden_state``) or, with clip skip N, ``hidden_states[-N]`` through the final
        layer norm (diffusers' ``encode_prompt`` with ``clip_skip=N-1``; without the norm
        when ``final_norm`` is off, as SDXL's ``hidden_states[-2]``)."""
        return self._run(window)[0]

    def _run(self, window: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden states (77, D), the pooled projection (P,) or None) of one window."""
        encoder = self.encoder
        device = next(encoder.parameters()).device
        ids = torch.tensor([window], dtype=torch.long, device=device)
        mask = None
        if getattr(encoder.config, "use_attention_mask", False):  # as diffusers: rarely set
            real = window.index(self._eos, 1) + 1
            mask = (torch.arange(WINDOW, device=device) < real).long()[None]
        skip = self.config.clip_skip
        out = encoder(input_ids=ids, attention_mask=mask, output_hidden_states=skip > 1)
        pooled = out.text_embeds[0] if self.config.pooled else None
        if skip == 1:
            return out.last_hidden_state[0], pooled
        hidden = out.hidden_states[-skip]
        if self.config.final_norm:
            hidden = getattr(encoder, "text_model", encoder).final_layer_norm(hidden)  # 4.x nests
        return hidden[0], pooled

    @torch.no_grad()
    def forward(self, inputs: Sequence[Any]) -> Cond:
        self._check()
        prompts = []
        for k, prompt in enumerate(inputs):
            if prompt is not None and not isinstance(prompt, str):
                raise UserError(
                    f"clip conditioner: prompt {k} must be a string or None; got "
                    f"{type(prompt).__name__}"
                )
            prompts.append("" if prompt is None else prompt)
        if not prompts:
            raise UserError("clip conditioner: no prompts given")
        each: dict[str, list[tuple[int, ...]]] = {}
        for k, p in enumerate(prompts):  # a prompt given many times is tokenized once
            if p not in each:
                each[p] = self.windows(p, k)
        runs = {w: self._run(w) for w in dict.fromkeys(w for ws in each.values() for w in ws)}
        encoded = {w: hidden for w, (hidden, _) in runs.items()}
        width = max(len(ws) for ws in each.values())
        empty = self._empty
        if any(len(ws) < width for ws in each.values()) and empty not in encoded:
            encoded[empty] = self.encode(empty)
        rows = []
        for p in prompts:
            ws = each[p]
            rows.append(torch.cat([encoded[w] for w in [*ws, *[empty] * (width - len(ws))]]))
        out = {"text": torch.stack(rows)}
        if self.config.pooled:  # the first window's, as compel pools a long prompt
            out["pooled"] = torch.stack([runs[each[p][0]][1] for p in prompts])  # type: ignore[misc]
        return out

    @classmethod
    def from_folders(
        cls, encoder_dir: str | Path, tokenizer_dir: str | Path, **options: Any
    ) -> CLIPConditioner:
        """A self-contained conditioner (``portable_config``) with the weights of a text
        encoder folder and a tokenizer folder kept apart (SDXL's ``text_encoder_2/`` and
        ``tokenizer_2/``): what a whole-pipeline import saves."""
        from transformers import CLIPTextConfig

        encoder_dir = Path(encoder_dir)
        _folders(str(encoder_dir))  # refuses a folder without safetensors weights
        try:
            config = CLIPTextConfig.from_pretrained(encoder_dir, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise UserError(f"conditioner clip: cannot read {encoder_dir}: {exc}") from None
        portable = CLIPConfig(
            **options,
            encoder_config=config.to_dict(),
            tokenizer_files=read_tokenizer_files(tokenizer_dir),
        )
        cond = cls(portable)
        loaded = type(cond.encoder).from_pretrained(
            encoder_dir, local_files_only=True, use_safetensors=True
        )
        cond.encoder.load_state_dict(loaded.state_dict(), strict=True)
        return cond.eval()

    def portable_config(self) -> CLIPConfig:
        """This conditioner's config with the encoder's config and the tokenizer's files in it
        and no folder: with the encoder's weights (``state_dict``) in a model's checkpoint, it
        rebuilds this conditioner with nothing else on disk."""
        import dataclasses

        if not self._loaded:
            return self.config
        _, tokenizer_dir = _folders(self._loaded)
        return dataclasses.replace(
            self.config,
            clip_path="",
            encoder_config=self.encoder.config.to_dict(),
            tokenizer_files=read_tokenizer_files(tokenizer_dir),
        )

    def from_data(
        self,
        x0: torch.Tensor,
        generator: torch.Generator,
        labels: torch.Tensor | None = None,
        captions: Sequence[str] | None = None,
    ) -> Cond:
        """Training's condition: the batch's captions, encoded by the frozen encoder."""
        return self.forward(need_captions(captions, "clip"))

    def align(self, conds: Sequence[Cond], inputs: Sequence[Any] = ()) -> list[Cond]:
        """Pad every condition to as many windows as the longest of ``conds`` and of every
        prompt in ``inputs`` (the draw's prompts and negative prompts) needs, with the empty
        prompt's window: sample k is then drawn with the same condition whatever its batch."""
        conds = list(conds)
        present = [c for c in conds if c is not None]
        if not present:
            return conds
        width = max(max(c["text"].shape[1] for c in present), WINDOW * self._most(inputs))
        if all(c["text"].shape[1] == width for c in present):
            return conds
        with torch.no_grad():
            self._check()
            empty = self.encode(self._empty)
        out: list[Cond] = []
        for c in conds:
            if c is None or c["text"].shape[1] == width:
                out.append(c)
                continue
            text = c["text"]
            missing, rest = divmod(width - text.shape[1], WINDOW)
            if rest:
                raise UserError(
                    f"clip conditioner: a condition of {text.shape[1]} tokens is not a whole "
                    f"number of {WINDOW}-token windows"
                )
            pad = empty.to(text).repeat(missing, 1).expand(text.shape[0], -1, -1)
            out.append({**c, "text": torch.cat([text, pad], dim=1)})
        return out

    def _most(self, inputs: Sequence[Any]) -> int:
        """The most windows a prompt of ``inputs`` needs, worked out once per draw (the loop
        passes the same list for every batch)."""
        if not inputs:
            return 1
        if self._draw is not None and self._draw[0] is inputs:
            return self._draw[1]
        prompts = {p for p in inputs if isinstance(p, str)}
        most = max((self.count(p) for p in prompts), default=1)
        self._draw = (inputs, most)
        return most


#: the files a ``CLIPTokenizer`` is made of: vocab.json and merges.txt (older folders) or
#: tokenizer.json (what transformers 5 writes), with their settings
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json")  # fmt: skip


def read_tokenizer_files(folder: str | Path) -> dict[str, str]:
    """The text of a tokenizer folder's files, by name (those that exist)."""
    root = Path(folder)
    return {n: (root / n).read_text(encoding="utf-8") for n in TOKENIZER_FILES
            if (root / n).is_file()}  # fmt: skip


def tokenizer_from_files(files: dict[str, str]) -> Any:
    """A ``CLIPTokenizer`` from the files ``read_tokenizer_files`` read, through a temporary
    folder (transformers reads tokenizers from files only)."""
    import tempfile

    from transformers import CLIPTokenizer

    if "tokenizer.json" not in files and not {"vocab.json", "merges.txt"} <= set(files):
        raise UserError(
            "conditioner clip: the tokenizer files have neither tokenizer.json nor vocab.json "
            "and merges.txt"
        )
    with tempfile.TemporaryDirectory(prefix="diffplug-clip-") as tmp:
        for name, text in files.items():
            if name not in TOKENIZER_FILES:
                raise UserError(f"conditioner clip: unexpected tokenizer file {name!r}")
            (Path(tmp) / name).write_text(text, encoding="utf-8")
        return CLIPTokenizer.from_pretrained(tmp, local_files_only=True)


def need_captions(captions: Sequence[str] | None, owner: str) -> list[str]:
    """A training batch's captions, or a one-line refusal: a frozen text encoder has nothing
    else to train on."""
    if captions is None:
        raise UserError(
            f"{owner} conditioner: training needs captioned data (a data set with captions, "
            "or a folder with a .txt beside each image)"
        )
    return list(captions)


def _folders(path: str) -> tuple[Path, Path]:
    """The encoder's and the tokenizer's folders: ``path`` itself, or a Stable Diffusion
    (diffusers) folder's ``text_encoder/`` and ``tokenizer/``."""
    root = Path(path).expanduser()
    if not path or not root.is_dir():
        raise UserError(
            "conditioner clip: --clip-path must name a local folder holding a CLIP text "
            f"encoder and its tokenizer (got {path!r}); nothing is downloaded"
        )
    if (root / "config.json").is_file():
        encoder, tokenizer = root, root
    elif (root / "text_encoder" / "config.json").is_file():
        encoder = root / "text_encoder"
        tokenizer = root / "tokenizer" if (root / "tokenizer").is_dir() else encoder
    else:
        raise UserError(
            f"conditioner clip: {root} holds no CLIP text encoder (a config.json, or a Stable "
            "Diffusion folder's text_encoder/config.json)"
        )
    if not any(encoder.glob("*.safetensors")):
        raise UserError(
            f"conditioner clip: {encoder} has no .safetensors weights (pickle checkpoints are "
            "refused); re-save it with save_pretrained(safe_serialization=True)"
        )
    return encoder, tokenizer
