"""The decoupled process: x_t = x0 + c*t + sqrt(t)*eps with c = -x0, for t in (0, 1].

The image is attenuated analytically (h_t = c constant, so H_t = c*t) while the noise grows
as a Wiener process; x_1 = eps. In diffplug's canonical form alpha(t) = 1 - t and
sigma(t) = sqrt(t), so every core tool (conversions, guidance, thresholding) applies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffplug import Process, option


@dataclass
class DecoupledConfig:
    t_min: float = option(1e-4, "smallest training time (the authors' eps)", min=0.0, max=0.5,
                          min_exclusive=True)  # fmt: skip


class Decoupled(Process):
    """Continuous time in (0, 1]: alpha = 1 - t, sigma = sqrt(t)."""

    name = "decoupled"
    Config = DecoupledConfig

    @property
    def t_range(self) -> tuple[float, float]:
        return self.config.t_min, 1.0

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.as_tensor(t, dtype=torch.float64)
        return 1 - t, t.sqrt()
