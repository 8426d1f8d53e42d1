"""``metrics.jsonl``: what training is doing, one JSON line every ``--log-every`` steps.

Each line has ``step``, ``loss`` (the mean over the steps since the previous line),
``grad_norm`` (the mean total gradient norm before clipping), ``lr`` and ``ema_decay`` (those
of the line's last step), ``images_per_s`` (since the previous line, checkpoints and previews
not counted) and ``elapsed_s`` (training seconds since this process started). Under torchrun
rank 0 writes it: the loss is its own batches', the gradient norm the averaged one.

Losses and norms are summed on the device and read once per line, so logging adds no host
synchronisation per step. A run that starts at step s (``--resume``, or a fresh run in an old
folder) first drops every line beyond s, so the file tells what the checkpointed run did.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from diffplug.atomic import atomic_write

FILE = "metrics.jsonl"


class MetricsLog:
    """Accumulates per-step values and writes a line when one is due."""

    def __init__(self, path: str | Path, every: int, images_per_step: int) -> None:
        self.path, self.every, self.images_per_step = Path(path), every, images_per_step
        self._loss: torch.Tensor | None = None
        self._norm: torch.Tensor | None = None
        self._steps = 0
        self._clock = self._begun = time.perf_counter()
        self._paused = 0.0

    def start(self, step: int) -> None:
        """Keep only the lines up to ``step`` (the run continues from there)."""
        truncate(self.path, step)
        self._clock = self._begun = time.perf_counter()

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> None:
        """One step's loss and gradient norm (device tensors; nothing is read here)."""
        loss = loss.detach().float()
        self._loss = loss if self._loss is None else self._loss + loss
        if grad_norm is not None:
            norm = grad_norm.detach().float()
            self._norm = norm if self._norm is None else self._norm + norm
        self._steps += 1

    def pause(self, seconds: float) -> None:
        """Time that was not training (a checkpoint, a preview)."""
        self._paused += seconds

    def due(self, step: int) -> bool:
        return self._steps > 0 and step % self.every == 0

    def write(self, step: int, lr: float, ema_decay: float) -> dict[str, Any]:
        """Append the line of ``step`` and start the next interval; returns the line."""
        now = time.perf_counter()
        seconds = max(now - self._clock - self._paused, 1e-9)
        n = max(self._steps, 1)
        loss = _number(self._loss, n)
        line = {
            "step": step,
            "loss": loss,
            "grad_norm": _number(self._norm, n),
            "lr": lr,
            "ema_decay": ema_decay,
            "images_per_s": round(self._steps * self.images_per_step / seconds, 2),
            "elapsed_s": round(now - self._begun, 3),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(line) + "\n")
        self._loss = self._norm = None
        self._steps, self._clock, self._paused = 0, now, 0.0
        return line


def truncate(path: Path, step: int) -> None:
    """Drop the lines of ``path`` beyond ``step`` (and any torn last line), atomically."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            if int(json.loads(line)["step"]) <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line a killed run left half-written
    text = "".join(line + "\n" for line in kept)
    if text != path.read_text(encoding="utf-8", errors="replace"):
        atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def read(path: str | Path) -> list[dict[str, Any]]:
    """The lines of a metrics file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _number(total: torch.Tensor | None, n: int) -> float | None:
    """The mean as a JSON number (None when there is none or it is not finite)."""
    if total is None:
        return None
    value = float(total) / n
    return value if math.isfinite(value) else None
