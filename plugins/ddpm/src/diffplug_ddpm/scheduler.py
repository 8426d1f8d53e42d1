"""DDPM's ancestral sampler on any discrete VP process, over any timestep sub-sequence.

Between consecutive timesteps t > t' of the sequence (abar' = 1 after the last):
beta = 1 - abar_t/abar', mean = sqrt(abar')*beta/(1 - abar_t)*x0_hat
+ sqrt(abar_t/abar')*(1 - abar')/(1 - abar_t)*x_t, variance fixed_small
= (1 - abar')/(1 - abar_t)*beta (floored at 1e-20) or fixed_large = beta; no noise at t = 0.
This is diffusers' DDPMScheduler step, coefficient for coefficient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from diffplug import VPSampler, VPSamplerConfig, option


@dataclass
class DDPMConfig(VPSamplerConfig):
    spacing: str = option(
        "leading",
        "timestep sub-sequence when steps < T",
        choices=("leading", "trailing", "linspace"),
    )
    variance: str = option(
        "fixed_small", "posterior variance", choices=("fixed_small", "fixed_large")
    )


class DDPM(VPSampler):
    """The Markov ancestral sampler of denoising diffusion probabilistic models."""

    Config = DDPMConfig
    stochastic = True

    def step(self, t: int, abar: float, abar_next: float) -> tuple[float, float, float, float]:
        beta = 1 - abar / abar_next
        a = math.sqrt(abar / abar_next) * (1 - abar_next) / (1 - abar)
        b = math.sqrt(abar_next) * beta / (1 - abar)
        small = max((1 - abar_next) / (1 - abar) * beta, 1e-20)
        var = small if self.config.variance == "fixed_small" else beta
        return a, b, 0.0, math.sqrt(var) if t > 0 else 0.0
