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

import torch

from diffplug.components import Scheduler
from diffplug.errors import UserError
from diffplug.options import option
from diffplug.plan import Plan
from diffplug.process import Process
from diffplug.transforms import StaticConfig, StaticThreshold
from diffplug.vp import VP, spaced_timesteps


@dataclass
class DDPMConfig:
    variance: str = option(
        "fixed_small", "posterior variance", choices=("fixed_small", "fixed_large")
    )
    spacing: str = option(
        "leading",
        "timestep sub-sequence when steps < T",
        choices=("leading", "trailing", "linspace"),
    )
    steps_offset: int = option(0, "added to leading timesteps", min=0)
    clip_sample: bool = option(False, "clip x0_hat to [-1, 1] at every step")


class DDPM(Scheduler):
    """The Markov ancestral sampler of denoising diffusion probabilistic models."""

    Config = DDPMConfig

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
            beta = 1 - at / ap
            alpha.append(math.sqrt(at))
            sigma.append(math.sqrt(1 - at))
            a.append(math.sqrt(at / ap) * (1 - ap) / (1 - at))
            b.append(math.sqrt(ap) * beta / (1 - at))
            c.append(0.0)
            var = max((1 - ap) / (1 - at) * beta, 1e-20) if cfg.variance == "fixed_small" else beta
            d.append(math.sqrt(var) if t > 0 else 0.0)
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
