"""The discrete variance-preserving process of DDPM, shared by every VP sampler.

abar_t = prod_{i<=t} (1 - beta_i), alpha(t) = sqrt(abar_t), sigma(t) = sqrt(1 - abar_t) for
t = 0..T-1. The betas are computed in float32 exactly as diffusers does, so timesteps and
coefficients match it; everything derived from them is float64. Fractional times (used when
another process's sampler drives a VP denoiser) interpolate log-SNR linearly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from diffplug.options import option
from diffplug.process import Process

BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2"]


@dataclass
class VPConfig:
    num_train_timesteps: int = option(1000, "training timesteps T", min=2)
    beta_schedule: str = option(
        "linear",
        "linear, scaled_linear, or squaredcos_cap_v2 (cosine)",
        choices=("linear", "scaled_linear", "squaredcos_cap_v2", "cosine"),
    )
    beta_start: float = option(1e-4, "first beta (linear schedules)", min=0.0)
    beta_end: float = option(0.02, "last beta (linear schedules)", max=1.0)
    rescale_zero_terminal_snr: bool = option(False, "rescale so that abar_T = 0")


def betas_for(config: VPConfig) -> torch.Tensor:
    """Betas in float32, as diffusers computes them."""
    T = config.num_train_timesteps
    if config.beta_schedule == "linear":
        betas = torch.linspace(config.beta_start, config.beta_end, T, dtype=torch.float32)
    elif config.beta_schedule == "scaled_linear":
        betas = (
            torch.linspace(config.beta_start**0.5, config.beta_end**0.5, T, dtype=torch.float32)
            ** 2
        )
    else:  # cosine (Nichol & Dhariwal), capped at 0.999

        def abar(s: float) -> float:
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = torch.tensor(
            [min(1 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)],
            dtype=torch.float32,
        )
    if config.rescale_zero_terminal_snr:
        betas = _rescale_zero_terminal_snr(betas)
    return betas


def _rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    sqrt_abar = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * (first / (first - last))  # diffusers' rounding order
    abar = sqrt_abar**2
    alphas = torch.cat([abar[0:1], abar[1:] / abar[:-1]])
    return 1 - alphas


class VP(Process):
    """DDPM's discrete variance-preserving process."""

    name = "vp"
    Config = VPConfig
    discrete = True

    def __init__(self, config: VPConfig | None = None) -> None:
        super().__init__(config)
        self.betas = betas_for(self.config)
        #: float32, bit-for-bit what diffusers' schedulers hold.
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)

    @property
    def num_timesteps(self) -> int:
        return self.config.num_train_timesteps

    @property
    def t_range(self) -> tuple[float, float]:
        return 0.0, float(self.num_timesteps - 1)

    def abar(self, t: torch.Tensor) -> torch.Tensor:
        """abar at (possibly fractional) times, float64; fractional t interpolates log-SNR."""
        t = torch.as_tensor(t, dtype=torch.float64).clamp(0, self.num_timesteps - 1)
        abar = self.alphas_cumprod.to(torch.float64)
        lo = t.floor().long()
        hi = (lo + 1).clamp(max=self.num_timesteps - 1)
        frac = t - lo
        logsnr = torch.log(abar) - torch.log1p(-abar)
        ls = logsnr[lo] * (1 - frac) + logsnr[hi] * frac
        return torch.where(frac == 0, abar[lo], torch.sigmoid(ls))

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        abar = self.abar(t)
        return abar.sqrt(), (1 - abar).sqrt()


SPACINGS = ("leading", "trailing", "linspace", "quadratic")


def spaced_timesteps(
    num_train_timesteps: int, steps: int, spacing: str = "leading", offset: int = 0
) -> list[int]:
    """A decreasing sub-sequence of 0..T-1 with ``steps`` entries.

    leading/trailing/linspace are diffusers' ``timestep_spacing``; quadratic is the DDIM
    paper's CIFAR-10 setting, int(linspace(0, sqrt(0.8 T), N)^2), de-duplicated (for large N
    its first values repeat, so it may yield fewer than N distinct steps).
    """
    from diffplug.errors import UserError

    T = num_train_timesteps
    if not 0 < steps <= T:
        raise UserError(
            f"steps must be between 1 and {T} (the model's training timesteps); got {steps}"
        )
    if spacing == "leading":
        ratio = T // steps
        ts = [i * ratio + offset for i in range(steps)]
    elif spacing == "trailing":
        # numpy's arange(T, 0, -T/N) arithmetic (T + i*delta), as diffusers computes it, so
        # that ties round alike; diffusers' occasional extra entry (-1) is not taken.
        delta = (T - T / steps) - T
        ts = [int(round(T + i * delta)) - 1 for i in range(steps)]
    elif spacing == "linspace":
        # numpy's linspace(0, T-1, N) arithmetic (i*step, last exactly T-1), as diffusers'.
        step = (T - 1) / (steps - 1) if steps > 1 else 0.0
        ts = [int(round(i * step)) for i in range(steps - 1)] + [T - 1 if steps > 1 else 0]
    elif spacing == "quadratic":
        top = math.sqrt(0.8 * T)
        ts = [int((i * top / (steps - 1)) ** 2) if steps > 1 else 0 for i in range(steps)]
    else:
        raise UserError(f"unknown spacing {spacing!r}; choose from {', '.join(SPACINGS)}")
    ts = sorted(set(ts), reverse=True)
    if ts[0] >= T or ts[-1] < 0:
        raise UserError(f"spacing {spacing!r} with offset {offset} leaves the range 0..{T - 1}")
    return ts
