"""DDIM (Song, Meng & Ermon 2021) on any discrete VP process.

x_prev = sqrt(abar_prev)*x0_hat + sqrt(1 - abar_prev - s^2)*eps_hat + s*z, with
s = eta*sqrt((1 - abar_prev)/(1 - abar_t))*sqrt(1 - abar_t/abar_prev); abar_prev = 1 after the
last step. eta = 0 is deterministic; eta = 1 has DDPM's posterior variance. Unlike diffusers
(which uses t - T//N), the previous timestep is the next one in the chosen sub-sequence, so
every spacing is correct.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from diffplug.components import Scheduler
from diffplug.errors import UserError
from diffplug.options import option
from diffplug.plan import Plan
from diffplug.process import Process
from diffplug.transforms import StaticConfig, StaticThreshold
from diffplug.vp import SPACINGS, VP, spaced_timesteps


@dataclass
class DDIMConfig:
    eta: float = option(0.0, "noise scale: 0 deterministic, 1 = DDPM's posterior variance", min=0.0)
    spacing: str = option("leading", "timestep sub-sequence", choices=SPACINGS)
    steps_offset: int = option(0, "added to leading timesteps (Stable Diffusion uses 1)", min=0)
    clip_sample: bool = option(False, "clip x0_hat to [-1, 1] at every step")


class DDIM(Scheduler):
    """Denoising diffusion implicit models."""

    Config = DDIMConfig

    def supports(self, process: Process) -> str | None:
        if not isinstance(process, VP):
            return f"needs a discrete VP (DDPM) process, the model was trained on {process.name!r}"
        return None

    def plan(self, process: Process, steps: int) -> Plan:
        reason = self.supports(process)
        if reason:
            raise UserError(reason)
        assert isinstance(process, VP)
        cfg = self.config
        ts = spaced_timesteps(process.num_timesteps, steps, cfg.spacing, cfg.steps_offset)
        abar = process.alphas_cumprod.to(torch.float64).tolist()
        alpha, sigma, a, b, c, d = [], [], [], [], [], []
        for i, t in enumerate(ts):
            at = abar[t]
            ap = abar[ts[i + 1]] if i + 1 < len(ts) else 1.0
            s = cfg.eta * math.sqrt((1 - ap) / (1 - at) * (1 - at / ap))
            alpha.append(math.sqrt(at))
            sigma.append(math.sqrt(1 - at))
            a.append(0.0)
            b.append(math.sqrt(ap))
            c.append(math.sqrt(max(1 - ap - s * s, 0.0)))
            d.append(s)
        return Plan(
            t=torch.tensor(ts, dtype=torch.float64),
            alpha=alpha,
            sigma=sigma,
            a=a,
            b=b,
            c=c,
            d=d,
            transforms=[StaticThreshold(StaticConfig())] if cfg.clip_sample else [],
            info={"timesteps": ts},
        )
