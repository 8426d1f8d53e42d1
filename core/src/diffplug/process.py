"""The one contract between denoisers and samplers: a Gaussian forward process

    x_t = alpha(t) * x0 + sigma(t) * eps,   eps ~ N(0, I).

A denoiser records the process it was trained on (name and config); a sampler plans its
steps on that process. Processes are registered through ``register_processes``.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from diffplug.options import NoOptions, build_config


class Process(ABC):
    """alpha(t) and sigma(t) over the process's own time variable."""

    name: ClassVar[str] = ""
    Config: ClassVar[type] = NoOptions
    #: True for processes defined only at integer times 0..num_timesteps-1.
    discrete: ClassVar[bool] = False

    def __init__(self, config: Any = None) -> None:
        self.config = config if config is not None else self.Config()

    @classmethod
    def from_options(cls, **options: Any) -> Process:
        return cls(build_config(cls.Config, options, owner=f"process {cls.name!r}"))

    @abstractmethod
    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha(t), sigma(t) in float64 for a tensor of times."""

    @property
    @abstractmethod
    def t_range(self) -> tuple[float, float]:
        """The smallest and largest time a sample is ever noised at (t_min, t_max)."""

    def logsnr(self, t: torch.Tensor) -> torch.Tensor:
        """log(alpha^2/sigma^2) in float64; -inf where alpha = 0, +inf where sigma = 0."""
        alpha, sigma = self.alpha_sigma(t)
        return 2 * (alpha.log() - sigma.log())

    def t_for_logsnr(self, logsnr: torch.Tensor) -> torch.Tensor:
        """The time with this log-SNR, clamped to ``t_range`` (bisection; log-SNR must fall
        as t grows, as it does for every diffusion process). A subclass may override with a
        closed form."""
        target = torch.as_tensor(logsnr, dtype=torch.float64)
        lo_t, hi_t = self.t_range
        lo = torch.full_like(target, lo_t)
        hi = torch.full_like(target, hi_t)
        for _ in range(64):
            mid = (lo + hi) / 2
            above = self.logsnr(mid) > target  # still too clean: go later
            lo = torch.where(above, mid, lo)
            hi = torch.where(above, hi, mid)
        return (lo + hi) / 2

    def spec(self) -> dict[str, Any]:
        """JSON-able description, stored in a denoiser's checkpoint."""
        return {"name": self.name, **dataclasses.asdict(self.config)}

    def same_as(self, other: Process) -> bool:
        return self.spec() == other.spec()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec()})"


def build_process(spec: dict[str, Any] | Process) -> Process:
    """A process from its spec ``{"name": ..., **options}``, looked up in the registry."""
    if isinstance(spec, Process):
        return spec
    from diffplug.registry import default_registry

    options = dict(spec)
    name = options.pop("name")
    cls = default_registry().load("process", name)
    return cls.from_options(**options)
