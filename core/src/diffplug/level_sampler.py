"""The shape of every sampler that walks noise levels (k-diffusion's family).

Such a sampler works on ``x = x0 + s*eps`` (k-diffusion's sigma, ``s = sigma/alpha`` of the
model's process): it plans on the schedule's levels and the model is called through the
bridge's model view (at the time with that level, on ``alpha*x``), so one sampler runs on
every Gaussian process unchanged, as k-diffusion's samplers run on any model its
``external.py`` wraps. A subclass says where it evaluates the denoiser and how it steps:

- ``evaluations(levels)``: the level of every denoiser call, in order (a two-evaluation
  step such as Heun's visits the next level twice: once to correct, once to go on);
- ``noise(levels)``: which of those calls is followed by fresh noise ``z`` for ``update``;
- ``stepper(levels)``: the per-batch object whose ``update(j, x, x0, eps, z)`` turns call
  ``j``'s x0_hat into the x of call ``j + 1`` (the sample itself after the last), holding
  any history (previous x0_hat, the predictor's slope) for one batch only.
"""

from __future__ import annotations

import functools
import math
from abc import abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from diffplug.bridge import ModelView, bridge
from diffplug.components import Schedule, Scheduler
from diffplug.errors import IncompatibleError
from diffplug.plan import Plan, Stepper
from diffplug.process import Process
from diffplug.schedules import Karras, NoiseTable

F64 = torch.float64


def ancestral_step(s_from: float, s_to: float, eta: float) -> tuple[float, float]:
    """(sigma_down, sigma_up) of an ancestral step from level s_from to s_to: the
    deterministic step to sigma_down, then fresh noise of std sigma_up, whose variances add
    up to s_to^2 (eta = 1: the DDPM posterior's; k-diffusion's ``get_ancestral_step``)."""
    if not eta:
        return s_to, 0.0
    up = min(s_to, eta * math.sqrt(s_to**2 * (s_from**2 - s_to**2) / s_from**2))
    return math.sqrt(s_to**2 - up**2), up


@dataclass
class LevelPlan(Plan):
    """A plan over noise levels: alpha = 1 and sigma = the level at every call."""

    #: the schedule's levels, descending, the last 0
    levels: list[float] = field(default_factory=list)
    #: builds one batch's stepper
    make_stepper: Any = None
    #: plans the same sampler on other levels (``LevelSampler.plan_levels``), for ``tail``
    replan: Any = None
    linear = False

    def begin(self, x: torch.Tensor) -> Stepper:
        return self.make_stepper(self.levels)

    def tail(self, step: int) -> tuple[Plan, int | None]:
        """The sampler planned anew on the levels from step ``step`` on, as A1111 and
        ComfyUI start k-diffusion's samplers part-way: a multistep solver's history then
        starts at the first of them (its first step is of low order)."""
        if step == 0 or self.replan is None:
            return super().tail(step)
        if self.step_of is None and len(self) != len(self.levels) - 1:
            raise IncompatibleError(
                "this sampler makes more than one denoiser call per step but does not say "
                "which calls form a step (LevelSampler.steps_of), so it cannot start part-way"
            )
        return self.replan(self.levels[step:]), None


class LevelSampler(Scheduler):
    """A sampler of k-diffusion's family: runs on any process through the model view."""

    walks_noise_levels = True
    #: the schedule used when none is chosen (k-diffusion's usual one)
    default_schedule: ClassVar[type[Schedule]] = Karras
    order = 1.0
    stochastic = False

    def supports(self, process: Process) -> str | None:
        return None  # every process has noise levels

    def model_view(self, plan: Plan, model_process: Process) -> ModelView | None:
        return bridge(plan, model_process)  # x = x0 + s*eps is another parametrisation

    @abstractmethod
    def evaluations(self, levels: list[float]) -> list[float]:
        """The level of every denoiser call, in order (all > 0)."""

    def noise(self, levels: list[float]) -> list[bool]:
        """Whether call j's update receives fresh per-sample noise z."""
        return [False] * len(self.evaluations(levels))

    @abstractmethod
    def stepper(self, levels: list[float]) -> Stepper:
        """A fresh per-batch stepper for these levels."""

    def steps_of(self, levels: list[float]) -> list[int] | None:
        """The step each call belongs to (None: one call per step); a sampler with two
        calls per step says which, so progress counts steps."""
        return None

    def plan(self, process: Process, steps: int) -> Plan:
        schedule = self.schedule if self.schedule is not None else self.default_schedule()
        levels = schedule.levels(process, steps, *self.sigma_range).tolist()
        return self.plan_levels(process, levels)

    def plan_levels(self, process: Process, levels: list[float]) -> LevelPlan:
        """The plan on these descending levels (the last 0)."""
        calls = self.evaluations(levels)
        noisy = self.noise(levels)
        times = NoiseTable.of(process).time_of(torch.tensor(calls, dtype=F64))
        # the level -> time map's round-off (~1e-15) must not make the times rise where two
        # calls sit a rounding apart (DPM2 ancestral's midpoint at its next level)
        times = torch.cummin(times, 0).values
        zeros = [0.0] * len(calls)
        return LevelPlan(
            t=times,
            alpha=[1.0] * len(calls),
            sigma=list(calls),
            a=zeros,
            b=list(zeros),
            c=list(zeros),
            d=[1.0 if n else 0.0 for n in noisy],
            # x_T ~ N(0, 1 + s0^2): the marginal of x0 + s0*eps for unit-variance data
            # (ComfyUI's full-denoise noise scaling; k-diffusion starts at s0*z, which at
            # s0 = 157 differs by 2e-5 relative)
            init_scale=math.sqrt(1 + levels[0] ** 2),
            step_of=self.steps_of(levels),
            levels=levels,
            make_stepper=self.stepper,
            replan=functools.partial(self.plan_levels, process),
            info={"levels": levels, "evaluation_levels": calls},
        )


__all__ = ["LevelPlan", "LevelSampler", "ancestral_step"]
