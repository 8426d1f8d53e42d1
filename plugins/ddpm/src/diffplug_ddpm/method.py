"""DDPM's training method: uniform integer timesteps and the simple (unweighted) MSE."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from diffplug import VP, Denoiser, Method, option


@dataclass
class DDPMMethodConfig:
    num_train_timesteps: int = option(1000, "training timesteps T", min=2)
    beta_schedule: str = option(
        "linear", "beta schedule", choices=("linear", "scaled_linear", "squaredcos_cap_v2")
    )
    beta_start: float = option(1e-4, "first beta", min=0.0)
    beta_end: float = option(0.02, "last beta", max=1.0)


class DDPMMethod(Method):
    """Ho et al. 2020: t ~ U{0..T-1}, loss |target - output|^2 (eps, x0 or v targets)."""

    Config = DDPMMethodConfig
    default_denoiser: ClassVar[str | None] = "unet"

    def process_spec(self) -> dict[str, Any]:
        c = self.config
        return {
            "name": "vp",
            "num_train_timesteps": c.num_train_timesteps,
            "beta_schedule": c.beta_schedule,
            "beta_start": c.beta_start,
            "beta_end": c.beta_end,
            "rescale_zero_terminal_snr": False,
        }

    def sample_times(self, denoiser: Denoiser, n: int, generator: torch.Generator) -> torch.Tensor:
        process = denoiser.process
        if not isinstance(process, VP):
            raise TypeError(f"DDPM trains VP denoisers, not {process.name!r}")
        return torch.randint(0, process.num_timesteps, (n,), generator=generator).float()
