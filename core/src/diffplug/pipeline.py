"""Whole generation recipes (cascades) for ``diffplug run --pipeline``.

A pipeline chains stages; a stage is any installed model sampled by any installed sampler,
with its own steps, guidance, thresholding and conditioner options, so one cascade can mix
plugins. ``run_stage`` is the one way a stage is sampled; pipelines only decide what feeds
each stage.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from diffplug.errors import IncompatibleError, OptionError
from diffplug.options import NoOptions, build_config


@dataclass
class StageResult:
    """One stage's images (N, C, H, W) in [-1, 1] and how they were made."""

    name: str
    images: torch.Tensor
    recipe: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageSpec:
    """What to sample for one stage: a model and a sampler with their settings."""

    model: str
    sampler: str
    steps: int | None = None
    guidance: float = 1.0
    threshold: str = "none"
    percentile: float = 0.995
    sampler_options: dict[str, Any] = field(default_factory=dict)
    #: set on the model's conditioner where it has them (an augmentation level); others
    #: are ignored, so one cascade setting can cover stages of different plugins
    conditioner_options: dict[str, Any] = field(default_factory=dict)


class Pipeline(ABC):
    """Generates final images from prompts (or nothing), stage by stage."""

    Config: ClassVar[type] = NoOptions
    name: ClassVar[str] = ""

    def __init__(self, config: Any = None) -> None:
        self.config = config if config is not None else self.Config()

    @classmethod
    def from_options(cls, **options: Any) -> Pipeline:
        return cls(build_config(cls.Config, options, owner=f"pipeline {cls.name or cls.__name__}"))

    @abstractmethod
    def run(
        self,
        *,
        prompts: Sequence[str | None] | None,
        seeds: Sequence[int],
        batch_size: int,
        device: torch.device,
        progress: bool = False,
    ) -> list[StageResult]:
        """Every stage's output, the final images last."""


def run_stage(
    spec: StageSpec,
    *,
    seeds: Sequence[int],
    conditions: Sequence[Any] | None,
    batch_size: int,
    device: torch.device,
    progress: bool = False,
    registry: Any = None,
) -> StageResult:
    """Load the stage's model, sampler and recorded conditioner, check they fit, sample."""
    from diffplug.conditioners import recorded_conditioner
    from diffplug.registry import default_registry
    from diffplug.resolve import build_scheduler, load_model
    from diffplug.sampling import sample
    from diffplug.transforms import thresholds

    registry = registry or default_registry()
    scheduler = build_scheduler(registry, spec.sampler, spec.sampler_options)
    denoiser, label = load_model(registry, spec.model, device=str(device))
    conditioner = recorded_conditioner(denoiser, registry)
    from diffplug.latent import recorded_autoencoder

    autoencoder = recorded_autoencoder(denoiser, registry)
    if conditioner is not None and spec.conditioner_options:
        conditioner = configure(conditioner, spec.conditioner_options, strict=False)
    if conditioner is None and conditions is not None and any(c is not None for c in conditions):
        raise IncompatibleError(f"stage model {label} is unconditional but was given conditions")
    transforms = thresholds(spec.threshold, spec.percentile)
    steps = spec.steps or scheduler.default_steps
    images = sample(
        denoiser,
        scheduler,
        steps=steps,
        seeds=seeds,
        batch_size=batch_size,
        conditioner=conditioner,
        conditions=conditions,
        guidance=spec.guidance,
        transforms=transforms,
        progress=progress,
        device=device,
        autoencoder=autoencoder,
    )
    recipe = {
        "model": label,
        "sampler": {"name": scheduler.name, "options": dataclasses.asdict(scheduler.config)},
        "steps": steps,
        "guidance": spec.guidance,
        "threshold": spec.threshold,
        **(
            {"conditioner": {"name": conditioner.name, **dataclasses.asdict(conditioner.config)}}
            if conditioner is not None
            else {}
        ),
    }
    return StageResult(label, images, recipe)


def configure(conditioner: Any, options: dict[str, Any], strict: bool = True) -> Any:
    """The conditioner with sampling options changed (an augmentation level), weights kept.
    Unknown options are an error, or skipped when not ``strict``."""
    from diffplug.options import describe

    known = {o.name for o in describe(type(conditioner.config))}
    unknown = sorted(set(options) - known)
    if not strict:
        options = {k: v for k, v in options.items() if k in known}
    elif unknown:
        raise OptionError(
            f"conditioner {conditioner.name}: no option "
            f"{', '.join('--' + k.replace('_', '-') for k in unknown)}; it has "
            f"{', '.join('--' + k.replace('_', '-') for k in sorted(known)) or 'none'}"
        )
    merged = {**dataclasses.asdict(conditioner.config), **options}
    conditioner.config = build_config(
        type(conditioner.config), merged, owner=f"conditioner {conditioner.name}"
    )
    return conditioner
