"""The interoperability matrix: every installed sampler x every installed pretrained model x
{unconditional, conditional}.

A conditional cell conditions the model the way it was trained (prompts naming each digit for
a text model, real held-out digits shrunk for a super-resolution model) and gives an
unconditional model core's image conditioner; an unconditional cell gives no conditioner.
Latent models are decoded by their recorded autoencoder. Each cell either samples and is
scored by the digits evaluator, or is refused by core's compatibility check before any step,
with the reason. ``tests/test_matrix.py`` asserts each cell; ``benchmarks/matrix.py`` prints
the table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from diffplug.errors import IncompatibleError

MODES = ("unconditional", "conditional")


@dataclass
class Cell:
    sampler: str
    model: str
    mode: str  # one of MODES: sampled with a conditioner or without one
    conditioning: str  # what the model takes: "none", "text" or "image"
    space: str  # "pixel" or "latent"
    refused: str | None = None
    digits_fd: float | None = None
    floor: float | None = None
    accuracy: float | None = None  # share classified as the prompt's digit (text models)
    detail_ratio: float | None = None  # full-resolution detail vs real digits' (S > 8 only)
    memorised: float | None = None  # share nearer a training digit than most held-out ones

    @property
    def fd_ratio(self) -> float | None:
        if self.digits_fd is None or not self.floor:
            return None
        return self.digits_fd / self.floor


def conditions_for(conditioner: Any, n: int) -> tuple[list[Any] | None, torch.Tensor | None]:
    """Inputs for n samples and, for text, the digit each prompt names."""
    from diffplug.data import digits

    kind = getattr(conditioner, "kind", None)
    if kind is None:
        return None, None
    labels = torch.arange(n) % 10
    if kind == "text":
        words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
        return [f"a handwritten {words[int(d)]}" for d in labels], labels
    if kind == "image":
        real = digits("heldout", 8).images
        return [real[k % len(real)] for k in range(n)], None
    raise IncompatibleError(f"the matrix has no inputs for {kind!r} conditioning")


def run_cell(sampler: str, model: str, mode: str = "conditional", n: int = 200,
             steps: int | None = None, guidance: float | None = None,
             registry: Any = None) -> Cell:  # fmt: skip
    """Sample one cell (or record why it is refused) and score it; a conditional model is
    guided by ``guidance``, default the weight its checkpoint recommends."""
    from diffplug.checkpoint import read_metadata
    from diffplug.evaluate import classify, evaluate
    from diffplug.registry import default_registry
    from diffplug.resolve import model_path
    from diffplug.run import Run

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    registry = registry or default_registry()
    meta = read_metadata(model_path(registry, model)[0])
    conditioning = meta["config"].get("conditioning") or "none"
    space = "latent" if meta["extra"].get("autoencoder") else "pixel"
    cell = Cell(sampler, model, mode, conditioning, space)
    # conditional: as trained, an unconditional model gets core's image conditioner;
    # unconditional: no conditioner at all
    chosen = None if conditioning != "none" else "lowres"
    try:
        run = Run(registry, sampler=sampler, model=model, steps=steps,
                  conditioner=chosen if mode == "conditional" else "none", autoencoder=None,
                  guidance=guidance if mode == "conditional" else None, threshold=None,
                  percentile=None, device=torch.device("cpu"), options={})  # fmt: skip
    except IncompatibleError as exc:
        cell.refused = str(exc)
        return cell
    conditions, labels = conditions_for(run.conditioner, n)
    images = run.draw(list(range(n)), conditions, batch_size=250)
    scores = evaluate(images)
    cell.digits_fd, cell.floor = scores["digits_fd"], scores["floor"]
    cell.detail_ratio, cell.memorised = scores["detail_ratio"], scores["memorised_share"]
    if labels is not None:
        cell.accuracy = float((classify(images) == labels).float().mean())
    return cell


def cells(registry: Any = None) -> list[tuple[str, str, str]]:
    """(sampler, model, mode) for every installed sampler, pretrained digits denoiser and mode.

    Autoencoders such as vae-digits are components of latent models, not models to sample;
    models trained on other data (the emoji cascade) cannot be judged by the digits evaluator
    and are scored by their own benchmark (benchmarks/emoji.py)."""
    from diffplug.checkpoint import read_metadata
    from diffplug.registry import default_registry

    registry = registry or default_registry()

    def judged_here(model: str) -> bool:
        meta = read_metadata(registry.get("pretrained", model).load())
        data = meta.get("extra", {}).get("data") or {}
        return meta["kind"] == "denoiser" and data.get("spec", "digits") == "digits"

    models = [m for m in registry.names("pretrained") if judged_here(m)]
    return [(s, m, mode) for m in models for mode in MODES for s in registry.names("scheduler")]
