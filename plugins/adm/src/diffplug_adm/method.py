"""ADM's training objective: regress (c, eps) at t ~ U(t_min, 1).

Loss = w_c(t)*|c_hat - c|^2 + w_eps(t)*|eps_hat - eps|^2 with c = -x0. ``weighting="none"``
is the plain sum; ``"authors"`` is DDM-Public's default, w_c = 1/t and w_eps = 1/(1 - t + 1e-4)
(with the dual UNet's preconditioning these undo the t and (1 - t) scalings of the two
network outputs, so every t trains at a comparable scale).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from diffplug import Denoiser, Method, option
from diffplug_adm.process import Decoupled


@dataclass
class ADMMethodConfig:
    t_min: float = option(1e-4, "smallest training time", min=0.0, max=0.5, min_exclusive=True)
    weighting: str = option("none", "loss weights over t", choices=("none", "authors"))


class ADMMethod(Method):
    """Decoupled diffusion (Huang et al. 2023): the (c, eps) regression."""

    Config = ADMMethodConfig
    default_denoiser: ClassVar[str | None] = "dual-unet"

    def process_spec(self) -> dict[str, Any]:
        return {"name": "decoupled", "t_min": self.config.t_min}

    def denoiser_defaults(self) -> dict[str, Any]:
        return {"process": self.process_spec(), "prediction": "c_eps"}

    def sample_times(self, denoiser: Denoiser, n: int, generator: torch.Generator) -> torch.Tensor:
        if not isinstance(denoiser.process, Decoupled):
            raise TypeError(f"ADM trains decoupled denoisers, not {denoiser.process.name!r}")
        t_min = denoiser.process.config.t_min
        return t_min + (1 - t_min) * torch.rand(n, generator=generator)

    def weights(self, t: torch.Tensor, denoiser: Denoiser) -> tuple[torch.Tensor, ...] | None:
        if self.config.weighting == "none":
            return None
        t = t.float()
        if denoiser.prediction != "c_eps":  # one head, the c branch's target (x0 = -c)
            return (1 / t,)
        return 1 / t, 1 / (1 - t + 1e-4)
