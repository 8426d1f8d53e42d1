"""ADM's samplers on the decoupled process (alpha = 1 - t, sigma = sqrt(t)).

Stochastic (the authors' default): from t to t - s, the Gaussian posterior of the process
given x0_hat (c_hat = -x0_hat) and eps_hat,

    mean = x_t - c_hat*s - (s/sqrt(t))*eps_hat,   variance = s*(t - s)/t,

on a uniform grid (s = 1/N; the last step lands on 0). Deterministic: t runs linearly from
1 to t_min over N points, then to 0, with x_next = x0_hat + c_hat*t_next + sqrt(t_next)*eps_hat.
Both are linear in (x_t, x0_hat, eps_hat, z), so they are plain ``Plan`` tables and every
core transform (clipping, dynamic thresholding) and guidance applies unchanged.

Both updates hold between any two times t > t', so ``--schedule NAME`` replaces the grid:
the schedule's noise levels s = sqrt(t)/(1 - t) on the decoupled process's table (its times
t_min .. 1), each at the time with that level, then 0; the start is x ~ N(0, (1 - t0)^2 + t0),
the marginal at the first time for unit-variance data (1 at t0 = 1, the unscheduled start).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from diffplug import NoiseTable, Plan, Process, Scheduler, StaticThreshold, UserError, option
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
    #: ``--schedule``: the posterior (or deterministic) step goes between any two times, so
    #: the grid may be a schedule's levels; without one, the authors' uniform grid
    walks_noise_levels = True

    def supports(self, process: Process) -> str | None:
        if not isinstance(process, Decoupled):
            return f"needs the decoupled (ADM) process, the model was trained on {process.name!r}"
        return None

    def native_process(self) -> Process | None:
        return Decoupled()

    def grid(self, process: Decoupled, steps: int) -> list[float]:
        """Evaluation times, then 0: steps + 1 entries (one more with ``split_last``); with
        a schedule, the times of its levels (as many as it gives)."""
        if steps < 1:
            raise UserError(f"steps must be a positive integer; got {steps}")
        t_min = process.config.t_min
        if self.schedule is not None:
            levels = self.schedule_levels(process, steps)
            times = NoiseTable.of(process).time_of(levels[:-1]).tolist()
            if self.config.split_last and times[-1] > t_min * (1 + 1e-9):
                times.append(t_min)
            return times + [0.0]
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

    def schedule_levels(self, process: Decoupled, steps: int) -> torch.Tensor:
        """The chosen schedule's noise levels on this process (descending, the last 0)."""
        assert self.schedule is not None
        return self.schedule.levels(process, steps, *self.sigma_range)

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
        info: dict = {"times": times}
        if self.schedule is not None:  # what the schedule chose, as the level samplers record
            info["levels"] = self.schedule_levels(process, steps).tolist()
        return Plan(
            t=t,
            alpha=[1 - v for v in times[:-1]],
            sigma=[math.sqrt(v) for v in times[:-1]],
            a=a,
            b=b,
            c=c,
            d=d,
            # x at the first time: N(0, (1 - t0)^2 + t0) for unit-variance data (1 at t0 = 1)
            init_scale=math.sqrt((1 - times[0]) ** 2 + times[0]),
            transforms=[StaticThreshold()] if self.config.clip_sample else [],
            info=info,
        )
