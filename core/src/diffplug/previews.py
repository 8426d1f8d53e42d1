"""Preview grids while training: ``previews/step-N.png`` every ``--preview-every`` steps,
sampled from the EMA weights with fixed seeds, so that successive grids show the same
samples getting better.

What is drawn follows the model: a text model draws the first caption of the data's first
images (or, for labelled data without captions, each class's name as its prompt); a
class-conditional model one sample per class; an image-conditioned one the data's first
images as conditions; an unconditional one plain samples. The sampler is ``--preview-sampler``
or the first installed one that runs the model's own process natively (DDIM first), with a
few steps (``--preview-steps``).

A preview leaves training as it was: the EMA weights are copied into the model and the
trained weights copied back bit for bit, every module's train/eval mode is restored, and the
global RNG is forked (sampling draws from per-sample seeds anyway), so a run with previews
takes the same steps as one without, and resumes exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffplug.components import Autoencoder, Conditioner, Denoiser, Scheduler
from diffplug.errors import UserError
from diffplug.output import write_samples
from diffplug.sampling import sample

#: samplers tried first for previews (deterministic, good in few steps), then any installed
PREFERRED = ("ddim", "adm", "dpmpp-2m", "euler", "fixture-ddim")
FOLDER = "previews"


@dataclass
class PreviewConfig:
    """``--preview-every``, ``--preview-steps``, ``--preview-count``, ``--preview-sampler``."""

    every: int
    steps: int = 20
    count: int = 16
    sampler: str | None = None
    seed: int = 0


class Previewer:
    """Chooses the sampler and the inputs once (before the first step), then draws a grid
    from the trainer's EMA weights whenever asked."""

    def __init__(
        self,
        config: PreviewConfig,
        trainer: Any,
        data: Any,
        *,
        autoencoder: Autoencoder | None = None,
        registry: Any = None,
    ) -> None:
        if trainer.kind != "denoiser":
            raise UserError(f"--preview-every samples a denoiser; this run trains a {trainer.kind}")
        if config.every < 1 or config.steps < 1 or config.count < 1:
            raise UserError("--preview-every, --preview-steps and --preview-count must be >= 1")
        self.config, self.autoencoder = config, autoencoder
        self.scheduler = choose_sampler(trainer.model, config.sampler, registry)
        self.conditioner, self.inputs = _conditions(trainer, data, config.count)
        n = len(self.inputs) if self.inputs is not None else config.count
        self.seeds = [config.seed + k for k in range(n)]
        self.guidance = trainer.config.guidance if self.conditioner is not None else 1.0

    def due(self, step: int) -> bool:
        return step % self.config.every == 0

    def write(self, trainer: Any, out: Path) -> Path:
        """Sample the EMA weights at ``trainer.step`` into ``out/previews/step-N.png``."""
        path = out / FOLDER / f"step-{trainer.step}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        devices = [trainer.device] if trainer.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), _ema_weights(trainer):
            images = sample(
                trainer.model,
                self.scheduler,
                steps=self.config.steps,
                seeds=self.seeds,
                conditioner=self.conditioner,
                conditions=self.inputs,
                guidance=self.guidance,
                autoencoder=self.autoencoder,
                device=trainer.device,
            )
        recipe = {"preview": {"step": trainer.step, "sampler": self.scheduler.name,
                              "steps": self.config.steps, "seeds": self.seeds,
                              "guidance": self.guidance,
                              "inputs": _describe(self.inputs)}}  # fmt: skip
        write_samples(images, path, recipe)  # atomic
        return path


def choose_sampler(denoiser: Denoiser, name: str | None, registry: Any = None) -> Scheduler:
    """The named sampler, or the first installed one that runs the model's process natively
    (``PREFERRED`` first), else the first that bridges to it."""
    from diffplug.bridge import planning_process
    from diffplug.registry import default_registry
    from diffplug.resolve import build_scheduler

    registry = registry or default_registry()
    if name is not None:
        scheduler = build_scheduler(registry, name, {})
        planning_process(scheduler, denoiser.process)  # refused with the sampler's reason
        return scheduler
    names = registry.names("scheduler")
    ordered = [n for n in PREFERRED if n in names] + [n for n in names if n not in PREFERRED]
    bridged = None
    for candidate in ordered:
        try:
            scheduler = build_scheduler(registry, candidate, {})
            if scheduler.supports(denoiser.process) is None:
                return scheduler
            if bridged is None:
                planning_process(scheduler, denoiser.process)
                bridged = scheduler
        except Exception:  # a sampler that needs options, or fails to load: the next one
            continue
    if bridged is None:
        raise UserError(
            "--preview-every: no installed sampler runs this model's process; install one "
            "or name it with --preview-sampler"
        )
    return bridged


class LabelConditioner(Conditioner):
    """Class labels as conditions (``{"labels": ...}``; None is the null label), for
    previews of a class-conditional denoiser trained without a conditioner."""

    kind = "class"
    _anchor: torch.Tensor

    def __init__(self, null_label: int) -> None:
        super().__init__(config={})
        self.null_label = null_label
        self.register_buffer("_anchor", torch.zeros(0, dtype=torch.long), persistent=False)

    def forward(self, inputs: Sequence[Any]) -> dict[str, torch.Tensor]:
        labels = [self.null_label if v is None else int(v) for v in inputs]
        return {"labels": torch.tensor(labels, dtype=torch.long, device=self._anchor.device)}


def _conditions(trainer: Any, data: Any, count: int) -> tuple[Conditioner | None, list | None]:
    """The conditioner to sample with and one input per preview sample."""
    labels = data.labels
    classes = _class_names(data)
    if trainer.conditioner is not None:
        conditioner = trainer.conditioner
        if conditioner.kind == "image":
            return conditioner, [_image(data, i) for i in range(min(count, len(data)))]
        if data.captions is not None:
            return conditioner, [data.captions[i][0] for i in range(min(count, len(data)))]
        if labels is not None:
            return conditioner, [classes[k % len(classes)] for k in range(count)]
        return conditioner, None
    if trainer.class_conditional:
        conditioner = LabelConditioner(trainer.null_label).to(trainer.device)
        return conditioner, list(range(min(len(classes), 64)))
    return None, None


def _class_names(data: Any) -> list[str]:
    """A folder's class names, else the labels' numbers as text ("0".."9" for the digits)."""
    if getattr(data, "classes", ()):
        return list(data.classes)
    if data.labels is None:
        return []
    return [str(k) for k in range(int(data.labels.max()) + 1)]


def _image(data: Any, i: int) -> torch.Tensor:
    if hasattr(data, "image"):  # a streamed folder: read it, centre-cropped, in [-1, 1]
        return data.image(i).float() / 127.5 - 1
    return data.images[i]


def _describe(inputs: list | None) -> Any:
    if inputs is None:
        return None
    return [v if isinstance(v, str | int) else "image" for v in inputs]


class _ema_weights:  # noqa: N801 - used as a context manager, like torch.no_grad
    """The EMA weights in the trainer's model (and trained conditioner) in eval mode for the
    block; the trained weights and every module's mode exactly as they were after it."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.modules = [m for m in (trainer.model, trainer.conditioner) if m is not None]

    def __enter__(self) -> None:
        params = self.trainer.params
        with torch.no_grad():
            self.saved = [p.detach().clone() for p in params]
            torch._foreach_copy_([p.data for p in params], self.trainer.ema)
        self.modes = [(m, m.training) for root in self.modules for m in root.modules()]
        for root in self.modules:
            root.eval()

    def __exit__(self, *exc: object) -> None:
        with torch.no_grad():
            torch._foreach_copy_([p.data for p in self.trainer.params], self.saved)
        for module, mode in self.modes:
            module.training = mode
        self.saved = []
