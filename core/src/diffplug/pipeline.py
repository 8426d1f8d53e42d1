"""Whole generation recipes (cascades) for ``diffplug run --pipeline``.

A pipeline chains stages; a stage is any installed model sampled by any installed sampler,
with its own steps, guidance, thresholding and conditioner options, so one cascade can mix
plugins. ``run_stage`` is the one way a stage is sampled; pipelines only decide what feeds
each stage.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
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
    #: None: the model's recorded thresholding (``extra["threshold"]``), else none
    threshold: str | None = None
    percentile: float | None = None
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


#: a cascade's img2img / inpainting inputs, waiting for its base stage (``starting_base``)
_BASE: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "diffplug_base_start", default=None
)


@contextlib.contextmanager
def starting_base(given: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Give ``Run.sample``'s ``init``, ``mask``, ``strength`` and ``repaint`` (``given``) to
    the first stage ``run_stage`` samples inside the block: a cascade's base stage. Pipelines
    keep their ``run`` signature; the later stages see the base's output as always. Yields
    what the recipe keeps of the init, filled once the base stage has used it."""
    used: dict[str, Any] = {}
    if all(v is None for v in given.values()):
        yield used
        return
    pending = {"given": given, "used": used, "done": False}
    token = _BASE.set(pending)
    try:
        yield used
    finally:
        _BASE.reset(token)
    if not pending["done"]:
        raise IncompatibleError(
            "this pipeline does not sample its stages through run_stage, so it cannot start "
            "from an init image"
        )


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
    """Sample one stage: a ``Run`` of the stage's model and sampler (its recorded conditioner,
    given the stage's conditioner options where it has them), fed ``conditions``."""
    from diffplug.registry import default_registry
    from diffplug.run import Run

    run = Run(
        registry or default_registry(),
        sampler=spec.sampler,
        model=spec.model,
        steps=spec.steps,
        conditioner=None,
        autoencoder=None,
        guidance=spec.guidance,
        threshold=spec.threshold,
        percentile=spec.percentile,
        device=device,
        options={**spec.sampler_options, **spec.conditioner_options},
        strict_options=False,  # a cascade-wide option may not apply to every stage
    )
    if (
        run.conditioner is None
        and conditions is not None
        and any(c is not None for c in conditions)
    ):
        raise IncompatibleError(
            f"stage model {run.model_name} is unconditional but was given conditions"
        )
    start, pending = None, _BASE.get()
    if pending is not None and not pending["done"]:  # the base stage of an img2img cascade
        pending["done"] = True
        given = pending["given"]
        start = run.init(len(seeds), given["init"], given["mask"], given["strength"],
                         given["repaint"])  # fmt: skip
        pending["used"].update(start.record() if start else {})
    images = run.draw(seeds, conditions if run.conditioner is not None else None,
                      batch_size=batch_size, progress=progress, init=start)  # fmt: skip
    recipe = {k: v for k, v in run.recipe.items() if k not in ("format", "versions", "device")}
    return StageResult(run.model_name, images, recipe)


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
