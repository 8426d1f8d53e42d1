"""ADM's samplers on the decoupled process (alpha = 1 - t, sigma = sqrt(t)).

Stochastic (the authors' default): from t to t - s, the Gaussian posterior of the process
given x0_hat (c_hat = -x0_hat) and eps_hat,

    mean = x_t - c_hat*s - (s/sqrt(t))*eps_hat,   variance = s*(t - s)/t,

on a uniform grid (s = 1/N; the last step lands on 0). Deterministic: t runs linearly from
1 to t_min over N points, then to 0, with x_next = x0_hat + c_hat*t_next + sqrt(t_next)*eps_hat.
Both are linear in (x_t, x0_hat, eps_hat, z), so they are plain ``Plan`` tables and every
core transform (clipping, dynamic thresholding) and guidance applies unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from diffplug import Plan, Process, Scheduler, StaticThreshold, UserError, option
from diffplug_adm.process import Decoupled


@dataclass
class ADMConfig:
    deterministic: bool = option(False, "the deterministic update instead of the posterior step")
    split_last: bool = option(False, "split the last stochastic step at t_min (authors' denoise)")
    clip_sample: bool = option(False, "clip x0_hat to [-1, 1] at every step (the authors do)")
    consistent: bool = option(
        False,
        "deterministic only: re-derive eps from x_t and x0_hat (DDIM on this process) instead "
        "of keeping the network's eps_hat; not the authors' update, but it does not accumulate "
        "the mismatch between the two decoders",
    )


class ADM(Scheduler):
    """Decoupled diffusion's posterior sampler (Huang et al. 2023)."""

    Config = ADMConfig
    default_steps = 10  # the authors' default

    def supports(self, process: Process) -> str | None:
        if not isinstance(process, Decoupled):
            return f"needs the decoupled (ADM) process, the model was trained on {process.name!r}"
        return None

    def native_process(self) -> Process | None:
        return Decoupled()

    def grid(self, process: Decoupled, steps: int) -> list[float]:
        """Evaluation times, then 0: steps + 1 entries (one more with ``split_last``)."""
        if steps < 1:
            raise UserError(f"steps must be a positive integer; got {steps}")
        t_min = process.config.t_min
        if self.config.deterministic:
            if steps == 1:
                return [1.0, 0.0]
            return [1 - i * (1 - t_min) / (steps - 1) for i in range(steps)] + [0.0]
        if steps * t_min > 1:
            raise UserError(
                f"at most {int(1 / t_min)} stochastic steps: the uniform grid's last time 1/steps "
                f"would fall below t_min = {t_min:g}, where the model was never trained"
            )
        times = [1 - i / steps for i in range(steps)]
        if self.config.split_last and times[-1] > t_min:
            times.append(t_min)
        return times + [0.0]

    def plan(self, process: Process, steps: int) -> Plan:
        reason = self.supports(process)
        if reason:
            raise UserError(reason)
        assert isinstance(process, Decoupled)
        if self.config.consistent and not self.config.deterministic:
            raise UserError("--consistent changes the deterministic update: add --deterministic")
        times = self.grid(process, steps)
        a, b, c, d = [], [], [], []
        for t, t_next in zip(times[:-1], times[1:], strict=True):
            if self.config.deterministic and self.config.consistent:
                # eps := (x_t - (1 - t)*x0_hat)/sqrt(t), then the same update
                r = math.sqrt(t_next / t)
                coefs = (r, (1 - t_next) - r * (1 - t), 0.0, 0.0)
            elif self.config.deterministic:
                coefs = (0.0, 1 - t_next, math.sqrt(t_next), 0.0)
            else:
                s = t - t_next  # x0_hat*s == -c_hat*s
                coefs = (1.0, s, -s / math.sqrt(t), math.sqrt(s * t_next / t))
            for table, value in zip((a, b, c, d), coefs, strict=True):
                table.append(value)
        t = torch.tensor(times[:-1], dtype=torch.float64)
        return Plan(
            t=t,
            alpha=[1 - v for v in times[:-1]],
            sigma=[math.sqrt(v) for v in times[:-1]],
            a=a,
            b=b,
            c=c,
            d=d,
            transforms=[StaticThreshold()] if self.config.clip_sample else [],
            info={"times": times},
        )
