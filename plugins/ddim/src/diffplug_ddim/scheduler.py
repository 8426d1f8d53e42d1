"""DDIM (Song, Meng & Ermon 2021) on any discrete VP process.

x_prev = sqrt(abar')*x0_hat + sqrt(1 - abar' - s^2)*eps_hat + s*z, with
s = eta*sqrt((1 - abar')/(1 - abar_t))*sqrt(1 - abar_t/abar'); abar' = 1 after the last step
(or abar at timestep 0, ``--final-alpha first``, as Stable Diffusion's scheduler config).
eta = 0 is deterministic; eta = 1 has DDPM's posterior variance. Unlike diffusers (which uses
t - T//N), the previous timestep is the next one in the chosen sub-sequence, so every spacing
is correct.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from diffplug import VP, VPSampler, VPSamplerConfig, option


@dataclass
class DDIMConfig(VPSamplerConfig):
    eta: float = option(
        0.0, "noise scale: 0 deterministic, 1 = DDPM's posterior variance", min=0.0, max=1.0
    )
    final_alpha: str = option(
        "one",
        "abar after the last step: one (the clean sample) or first (abar at timestep 0, as "
        "diffusers' set_alpha_to_one=False in Stable Diffusion's scheduler config)",
        choices=("one", "first"),
    )


class DDIM(VPSampler):
    """Denoising diffusion implicit models."""

    Config = DDIMConfig
    order = 1.0  # a first-order solver of the probability-flow ODE at eta = 0

    def final_abar(self, process: VP) -> float:
        if self.config.final_alpha == "first":
            return float(process.alphas_cumprod[0].double())
        return 1.0

    def step(self, t: int, abar: float, abar_next: float) -> tuple[float, float, float, float]:
        s = self.config.eta * math.sqrt((1 - abar_next) / (1 - abar) * (1 - abar / abar_next))
        return 0.0, math.sqrt(abar_next), math.sqrt(max(1 - abar_next - s * s, 0.0)), s
