"""Imagen's cascade: a text-conditional base model, then super-resolution stages.

Each stage is any installed model under any installed sampler (``diffplug.pipeline``), so a
stage may come from another plugin; a super-resolution stage is conditioned on the previous
stage's images through its own recorded conditioner (noise augmentation, when it has it, at
``--sr-aug-level`` or the best of ``--sr-aug-sweep``). Per-stage options take one value for
every stage or one per stage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from diffplug import (
    THRESHOLDS,
    OptionError,
    Pipeline,
    StageResult,
    StageSpec,
    UserError,
    option,
    run_stage,
)

#: the base stage's guidance weight when none is given (see docs/imagen.md for the sweep)
DEFAULT_GUIDANCE = 3.0
#: ``--threshold`` for "the base model's own"
RECORDED = "recorded"


@dataclass
class CascadeConfig:
    base_model: str = option("imagen-digits-base", "the text-conditional base model")
    base_sampler: str = option("ddim", "the base stage's sampler")
    base_steps: int = option(50, "the base stage's steps", min=1)
    guidance: float = option(DEFAULT_GUIDANCE, "the base stage's classifier-free guidance weight")
    threshold: str = option(
        RECORDED,
        "the base stage's thresholding; recorded: the one the base model records (chosen by "
        "measurement, docs/claims.md)",
        choices=(RECORDED, *THRESHOLDS),
    )
    percentile: float | None = option(None, "p of dynamic thresholding (default: the base "
                                      "model's recorded, else 0.995)", min=0.0, max=1.0,
                                      min_exclusive=True)  # fmt: skip
    sr_models: list[str] = option(["imagen-digits-sr"], "super-resolution stages, in order")
    sr_samplers: list[str] = option(
        ["ddpm"], "sampler per stage (one for all); ancestral, as Imagen (see docs/imagen.md)"
    )
    sr_steps: list[int] = option([25], "steps per stage (one for all)")
    sr_guidance: list[float] = option([1.0], "guidance per stage (one for all)")
    sr_threshold: list[str] = option(
        [RECORDED], "thresholding per stage (one for all); recorded: each stage model's own"
    )
    sr_aug_level: list[float] = option(
        [0.1], "noise-augmentation level per stage, for stages whose conditioner has one"
    )
    sr_aug_sweep: list[float] = option(
        [], "levels to try at every stage with augmentation; each sample keeps its best"
    )

    def __post_init__(self) -> None:
        n = len(self.sr_models)
        for name in ("sr_samplers", "sr_steps", "sr_guidance", "sr_threshold", "sr_aug_level"):
            values = getattr(self, name)
            if len(values) not in (1, n) or (n and not values):
                raise OptionError(
                    f"pipeline imagen: --{name.replace('_', '-')} needs one value or one per "
                    f"stage ({n}); got {len(values)}"
                )
        for value in self.sr_threshold:
            if value not in (RECORDED, *THRESHOLDS):
                raise OptionError(
                    f"pipeline imagen: --sr-threshold {value!r}; use {(RECORDED, *THRESHOLDS)}"
                )
        for value in self.sr_steps:
            if value < 1:
                raise OptionError("pipeline imagen: --sr-steps must be positive")


@dataclass
class EmojiCascadeConfig(CascadeConfig):
    """The text-to-emoji cascade's defaults (docs/models.md has the recipe and scores)."""

    base_model: str = option("imagen-emoji-base", "the text-conditional base model (16x16)")
    sr_models: list[str] = option(["imagen-emoji-sr"], "super-resolution stages (16 -> 32)")


def _recorded_or(threshold: str) -> str | None:
    """A stage's thresholding as ``StageSpec`` takes it: None for the model's recorded one."""
    return None if threshold == RECORDED else threshold


def _at(values: Sequence[Any], k: int) -> Any:
    return values[k] if len(values) > 1 else values[0]


class Cascade(Pipeline):
    """Base stage from prompts, then each super-resolution stage from the one before."""

    Config = CascadeConfig

    def stages(self) -> list[StageSpec]:
        cfg = self.config
        specs = [
            StageSpec(
                cfg.base_model,
                cfg.base_sampler,
                cfg.base_steps,
                cfg.guidance,
                _recorded_or(cfg.threshold),
                cfg.percentile,
            )  # fmt: skip
        ]
        for k, model in enumerate(cfg.sr_models):
            aug = {"level": _at(cfg.sr_aug_level, k)}
            if cfg.sr_aug_sweep:
                aug["sweep"] = list(cfg.sr_aug_sweep)
            specs.append(
                StageSpec(
                    model,
                    _at(cfg.sr_samplers, k),
                    _at(cfg.sr_steps, k),
                    _at(cfg.sr_guidance, k),
                    _recorded_or(_at(cfg.sr_threshold, k)),
                    cfg.percentile,
                    conditioner_options=aug,
                )  # fmt: skip
            )
        return specs

    def run(
        self,
        *,
        prompts: Sequence[str | None] | None,
        seeds: Sequence[int],
        batch_size: int,
        device: torch.device,
        progress: bool = False,
    ) -> list[StageResult]:
        if not prompts:
            raise UserError(
                'pipeline imagen: pass --prompt TEXT (e.g. --prompt "a handwritten seven"; '
                "repeat it for one per sample)"
            )
        results: list[StageResult] = []
        conditions: list[Any] | None = list(prompts)
        for k, spec in enumerate(self.stages()):
            result = run_stage(spec, seeds=seeds, conditions=conditions, batch_size=batch_size,
                               device=device, progress=progress)  # fmt: skip
            result.recipe["stage"] = "base" if k == 0 else f"sr{k}"
            results.append(result)
            conditions = list(result.images)
        return results


class EmojiCascade(Cascade):
    """The same cascade with the shipped text-to-emoji models as its stages."""

    Config = EmojiCascadeConfig
