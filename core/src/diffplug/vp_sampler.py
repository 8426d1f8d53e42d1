"""The shared shape of every single-step sampler on the discrete VP process.

A VP sampler walks a timestep sub-sequence; each step goes from abar_t to abar' (abar at the
next timestep, 1 after the last) and only the update coefficients differ between samplers.
Subclasses implement ``step(t, abar_t, abar_next) -> (a, b, c, d)``, a few lines each, and
inherit spacing, ``steps_offset``, ``clip_sample``, the process check and schedules: with
``--schedule NAME`` (other than ``normal``, which is the sampler's own spacing) the steps go
between that schedule's noise levels s, abar = 1/(1 + s^2), and the model is called at the
fractional times with those levels.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from dataclasses import dataclass

import torch

from diffplug.components import Scheduler
from diffplug.errors import UserError
from diffplug.options import option
from diffplug.plan import Plan
from diffplug.process import Process
from diffplug.schedules import NoiseTable, Normal
from diffplug.transforms import StaticThreshold
from diffplug.vp import SPACINGS, VP, spaced_timesteps


@dataclass
class VPSamplerConfig:
    """Options every VP sampler has; a sampler's own Config subclasses this."""

    spacing: str = option("leading", "timestep sub-sequence", choices=SPACINGS)
    steps_offset: int = option(0, "added to leading timesteps (Stable Diffusion uses 1)", min=0)
    clip_sample: bool = option(False, "clip x0_hat to [-1, 1] at every step")


def transitions(
    process: VP, steps: int, spacing: str, offset: int = 0, final: float = 1.0
) -> tuple[list[int], list[float], list[float]]:
    """The timesteps, abar at each, and abar at the next one (``final`` after the last),
    float64."""
    ts = spaced_timesteps(process.num_timesteps, steps, spacing, offset)
    abar = process.alphas_cumprod.to(torch.float64).tolist()
    here = [abar[t] for t in ts]
    return ts, here, here[1:] + [final]


def scheduled_transitions(
    process: VP, levels: torch.Tensor
) -> tuple[torch.Tensor, list[float], list[float]]:
    """The (fractional) times, abar at each and abar at the next (1.0 after the last) of a
    schedule's descending noise levels, the last of which is 0."""
    live = levels[:-1]
    times = NoiseTable.of(process).time_of(live)
    abar = (1 / (1 + live * live)).tolist()
    return times, abar, abar[1:] + [1.0]


class VPSampler(Scheduler):
    """A sampler on the discrete VP process whose step is linear (see ``diffplug.plan``)."""

    Config = VPSamplerConfig

    def supports(self, process: Process) -> str | None:
        if not isinstance(process, VP):
            return f"needs a discrete VP (DDPM) process, the model was trained on {process.name!r}"
        return None

    def native_process(self) -> Process | None:
        return VP()  # DDPM's linear betas, T = 1000

    @abstractmethod
    def step(self, t: int, abar: float, abar_next: float) -> tuple[float, float, float, float]:
        """(a, b, c, d) of x_next = a*x + b*x0_hat + c*eps_hat + d*z for one transition."""

    walks_noise_levels = True

    def final_abar(self, process: VP) -> float:
        """abar after the last step: 1, the clean sample (a sampler may choose otherwise)."""
        return 1.0

    def plan(self, process: Process, steps: int) -> Plan:
        reason = self.supports(process)
        if reason:
            raise UserError(reason)
        assert isinstance(process, VP)
        cfg = self.config
        if self.schedule is None or isinstance(self.schedule, Normal):
            ts, here, nxt = transitions(process, steps, cfg.spacing, cfg.steps_offset,
                                        self.final_abar(process))  # fmt: skip
            times, labels, info = torch.tensor(ts, dtype=torch.float64), ts, {"timesteps": ts}
        else:
            levels = self.schedule.levels(process, steps, *self.sigma_range)
            times, here, nxt = scheduled_transitions(process, levels)
            # the step sees an integer label: 0 on the last step into the clean sample
            labels = [max(1, round(float(t))) for t in times[:-1]] + [0]
            info = {"timesteps": [round(float(t), 4) for t in times], "levels": levels.tolist()}
        a, b, c, d = zip(*(self.step(t, x, y) for t, x, y in zip(labels, here, nxt, strict=True)),
                         strict=True)  # fmt: skip
        return Plan(
            t=times,
            alpha=[math.sqrt(x) for x in here],
            sigma=[math.sqrt(1 - x) for x in here],
            a=list(a),
            b=list(b),
            c=list(c),
            d=list(d),
            transforms=[StaticThreshold()] if cfg.clip_sample else [],
            info=info,
        )
