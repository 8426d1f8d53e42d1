"""Prediction transforms: applied to x0_hat at every step, whatever the sampler.

Like diffusers and the ADM authors, a transform changes x0_hat only; eps_hat is kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from diffplug.options import NoOptions, build_config, option


class Transform:
    """``transform(x0_hat) -> x0_hat`` on a batch (B, C, H, W)."""

    Config: ClassVar[type] = NoOptions

    def __init__(self, config: Any = None) -> None:
        self.config = config if config is not None else self.Config()

    @classmethod
    def from_options(cls, **options: Any) -> Transform:
        return cls(build_config(cls.Config, options, owner=f"transform {cls.__name__}"))

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@dataclass
class StaticConfig:
    limit: float = option(1.0, "clip x0_hat to [-limit, limit]", min=0.0, min_exclusive=True)


class StaticThreshold(Transform):
    """Clip x0_hat to the data range (DDPM's ``clip_sample``)."""

    Config = StaticConfig

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        return x0.clamp(-self.config.limit, self.config.limit)


@dataclass
class DynamicConfig:
    percentile: float = option(
        0.995, "quantile p of |x0_hat| per sample", min=0.0, max=1.0, min_exclusive=True
    )
    max_value: float | None = option(None, "upper bound on the threshold s (None: no cap)")


class DynamicThreshold(Transform):
    """Imagen's dynamic thresholding: s = max(1, quantile_p |x0_hat|); x0 = clamp(x0, -s, s)/s.

    Saturated pixels are pushed inwards instead of clipped, which keeps samples from
    saturating at high guidance weights.
    """

    Config = DynamicConfig

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        flat = x0.reshape(x0.shape[0], -1)
        work = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
        s = torch.quantile(work.abs(), self.config.percentile, dim=1)
        s = s.clamp(min=1.0, max=self.config.max_value).unsqueeze(1)
        return (torch.maximum(torch.minimum(work, s), -s) / s).to(x0.dtype).reshape(x0.shape)


THRESHOLDS = ("none", "static", "dynamic")


def thresholds(kind: str, percentile: float = 0.995) -> list[Transform]:
    """The transforms ``--threshold KIND`` names (none: no transform)."""
    from diffplug.errors import OptionError

    if kind == "static":
        return [StaticThreshold()]
    if kind == "dynamic":
        return [DynamicThreshold(DynamicConfig(percentile=percentile))]
    if kind != "none":
        raise OptionError(f"threshold must be one of {', '.join(THRESHOLDS)}; got {kind!r}")
    return []
