"""Schedules: the noise levels a sampler visits, chosen apart from the sampler.

A noise level is k-diffusion's sigma, ``s = sigma(t)/alpha(t)``: ``x_t/alpha(t) = x0 + s*eps``,
so it names a point of any Gaussian process. A schedule turns a process's table of levels and
a step count into ``steps + 1`` descending levels ending at 0 (the clean sample); a sampler
that walks noise levels plans on them (``--schedule karras --rho 7``). The formulas are those
of k-diffusion (karras, exponential, polyexponential) and ComfyUI (normal, simple,
ddim-uniform, sgm-uniform, beta, linear-quadratic, kl-optimal), on the process's own table:
a discrete VP model's T training timesteps, or 1000 times spread over a continuous process's
range.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from dataclasses import dataclass

import torch

from diffplug.components import Schedule
from diffplug.errors import UserError
from diffplug.options import option
from diffplug.plan import MAX_STEPS
from diffplug.process import Process
from diffplug.vp import SPACINGS, VP, spaced_timesteps

F64 = torch.float64
#: grid size for a continuous process's table (ComfyUI's discrete models have 1000)
CONTINUOUS_GRID = 1000
#: the noise levels --sigma-min/--sigma-max may name: far beyond any model's (DDPM's run
#: 0.01 to 157), near enough that logs, squares and ratios of them stay finite
LEVEL_RANGE = (1e-8, 1e8)


@dataclass(frozen=True)
class NoiseTable:
    """A process's noise levels, ascending with time, as ComfyUI's ``model_sampling`` sees a
    model: the level at each grid time, and the range a schedule spans (overridable)."""

    process: Process
    times: torch.Tensor
    sigmas: torch.Tensor
    sigma_min: float
    sigma_max: float

    @classmethod
    def of(
        cls, process: Process, sigma_min: float | None = None, sigma_max: float | None = None
    ) -> NoiseTable:
        if isinstance(process, VP):
            times = torch.arange(process.num_timesteps, dtype=F64)
        else:  # a continuous process: its range, without a pure-noise end (alpha = 0)
            low, high = process.t_range
            times = low + (high - low) * torch.arange(CONTINUOUS_GRID, dtype=F64) / CONTINUOUS_GRID
        alpha, sigma = process.alpha_sigma(times)
        levels = sigma / alpha
        lo = float(levels[0]) if sigma_min is None else float(sigma_min)
        hi = float(levels[-1]) if sigma_max is None else float(sigma_max)
        if not (LEVEL_RANGE[0] <= lo < hi <= LEVEL_RANGE[1]):
            raise UserError(
                f"noise range {lo:g} .. {hi:g}: need {LEVEL_RANGE[0]:g} <= --sigma-min < "
                f"--sigma-max <= {LEVEL_RANGE[1]:g}"
            )
        return cls(process, times, levels, lo, hi)

    def sigma(self, index: torch.Tensor) -> torch.Tensor:
        """The level at fractional grid indices: log-linear between table entries."""
        index = torch.as_tensor(index, dtype=F64).clamp(0, len(self.sigmas) - 1)
        low = index.floor().long()
        high = index.ceil().long()
        w = index - low
        logs = self.sigmas.log()
        return ((1 - w) * logs[low] + w * logs[high]).exp()

    def index(self, level: float) -> float:
        """The grid index whose level is nearest ``level`` in log space (ComfyUI's
        ``timestep``)."""
        return float((self.sigmas.log() - math.log(level)).abs().argmin())

    def time_of(self, levels: torch.Tensor) -> torch.Tensor:
        """The process's (possibly fractional) times at these levels (> 0)."""
        logsnr = -2 * torch.as_tensor(levels, dtype=F64).log()
        return self.process.t_for_logsnr(logsnr)


class TableSchedule(Schedule):
    """A schedule written in terms of a ``NoiseTable``."""

    def levels(self, process: Process, steps: int, sigma_min: float | None = None,
               sigma_max: float | None = None) -> torch.Tensor:  # fmt: skip
        if isinstance(steps, bool) or not isinstance(steps, int) or not 0 < steps <= MAX_STEPS:
            raise UserError(f"steps must be a whole number from 1 to {MAX_STEPS}; got {steps!r}")
        table = NoiseTable.of(process, sigma_min, sigma_max)
        out = torch.as_tensor(self.compute(table, steps), dtype=F64)
        return check_levels(out, self.name or type(self).__name__)

    @abstractmethod
    def compute(self, table: NoiseTable, steps: int) -> torch.Tensor | list[float]:
        """Descending levels, the last 0."""


def check_levels(levels: torch.Tensor, name: str) -> torch.Tensor:
    """Refuse what no sampler can walk: not finite, negative, rising, or not ending at 0."""
    if levels.ndim != 1 or len(levels) < 2:
        raise UserError(f"schedule {name}: needs at least two levels, got {levels.tolist()}")
    if not bool(torch.isfinite(levels).all()) or float(levels.min()) < 0:
        raise UserError(f"schedule {name}: levels must be finite and >= 0")
    if bool((levels[1:] > levels[:-1]).any()):
        raise UserError(f"schedule {name}: levels must not increase")
    if float(levels[-1]) != 0.0:
        raise UserError(f"schedule {name}: the last level must be 0 (the clean sample)")
    return levels


def _zero(levels: torch.Tensor) -> torch.Tensor:
    return torch.cat([levels.to(F64), levels.new_zeros(1, dtype=F64)])


# -- the model's own timesteps --------------------------------------------------------------
@dataclass
class NormalConfig:
    spacing: str = option(
        "leading",
        "timestep sub-sequence; uniform: ComfyUI's normal (evenly spaced fractional times)",
        choices=(*SPACINGS, "uniform"),
    )
    steps_offset: int = option(0, "added to leading timesteps", min=0)


class Normal(TableSchedule):
    """The model's own timesteps at a spacing (diffusers' leading/trailing/linspace, DDIM's
    quadratic), or ComfyUI's ``normal`` (``uniform``: evenly spaced fractional times from
    the noisiest level to the cleanest). Samplers with a ``--spacing`` of their own (ddim,
    ddpm) walk it with theirs."""

    Config = NormalConfig

    def compute(self, table: NoiseTable, steps: int) -> torch.Tensor:
        cfg = self.config
        if cfg.spacing == "uniform":
            start, end = table.index(table.sigma_max), table.index(table.sigma_min)
            return _zero(table.sigma(torch.linspace(start, end, steps, dtype=F64)))
        picked = spaced_timesteps(len(table.sigmas), steps, cfg.spacing, cfg.steps_offset)
        return _zero(table.sigmas[picked])


class SGMUniform(TableSchedule):
    """ComfyUI's ``sgm_uniform``: evenly spaced fractional times, the cleanest end left out."""

    def compute(self, table: NoiseTable, steps: int) -> torch.Tensor:
        start, end = table.index(table.sigma_max), table.index(table.sigma_min)
        return _zero(table.sigma(torch.linspace(start, end, steps + 1, dtype=F64)[:-1]))


class Simple(TableSchedule):
    """ComfyUI's ``simple``: every (T/steps)-th table entry from the noisiest."""

    def compute(self, table: NoiseTable, steps: int) -> list[float]:
        n = len(table.sigmas)
        stride = n / steps
        return [float(table.sigmas[-(1 + int(x * stride))]) for x in range(steps)] + [0.0]


class DDIMUniform(TableSchedule):
    """ComfyUI's ``ddim_uniform``: table entries 1, 1 + k, 1 + 2k, ... (k = T // steps), from
    the noisiest; it can give a step more or less than asked, as ComfyUI's does."""

    def compute(self, table: NoiseTable, steps: int) -> list[float]:
        n = len(table.sigmas)
        stride = max(n // steps, 1)
        picked = [float(table.sigmas[x]) for x in range(1, n, stride)]
        return picked[::-1] + [0.0]


@dataclass
class BetaConfig:
    alpha: float = option(0.6, "the Beta distribution's alpha", min=0.0, min_exclusive=True)
    beta: float = option(0.6, "the Beta distribution's beta", min=0.0, min_exclusive=True)


class Beta(TableSchedule):
    """Timesteps at the quantiles of a Beta(alpha, beta) distribution (Lee et al. 2024,
    "Beta sampling is all you need"; ComfyUI's ``beta``): more steps at both ends for
    alpha, beta < 1. Rounded to table entries, repeats dropped."""

    Config = BetaConfig

    def compute(self, table: NoiseTable, steps: int) -> list[float]:
        from scipy.stats import beta as beta_distribution

        top = len(table.sigmas) - 1
        quantiles = 1 - torch.arange(steps, dtype=F64).numpy() / steps
        picked = beta_distribution.ppf(quantiles, self.config.alpha, self.config.beta) * top
        out, last = [], None
        for t in picked.round():
            if t != last:
                out.append(float(table.sigmas[int(t)]))
            last = t
        return out + [0.0]


@dataclass
class LinearQuadraticConfig:
    threshold_noise: float = option(0.025, "where the linear part ends", min=0.0, max=1.0)
    linear_steps: int = option(0, "steps in the linear part (0: half the steps)", min=0)


class LinearQuadratic(TableSchedule):
    """Mochi's schedule (ComfyUI's ``linear_quadratic``): 1 - (linear, then quadratic)
    fractions, times the largest level."""

    Config = LinearQuadraticConfig

    def compute(self, table: NoiseTable, steps: int) -> list[float]:
        if steps == 1:
            fractions = [1.0, 0.0]
        else:
            lin = self.config.linear_steps or steps // 2
            if lin >= steps:
                raise UserError(f"linear-quadratic: --linear-steps must be < steps ({steps})")
            noise = self.config.threshold_noise
            linear = [i * noise / lin for i in range(lin)]
            diff = lin - noise * steps
            quad = steps - lin
            quad_coef = diff / (lin * quad**2)
            lin_coef = noise / lin - 2 * diff / quad**2
            const = quad_coef * lin**2
            quadratic = [quad_coef * i * i + lin_coef * i + const for i in range(lin, steps)]
            fractions = [1.0 - x for x in linear + quadratic + [1.0]]
        return [f * table.sigma_max for f in fractions]


# -- closed forms on the range (k-diffusion) -------------------------------------------------
@dataclass
class KarrasConfig:
    rho: float = option(7.0, "the ramp's exponent (Karras et al. 2022 use 7)", min=0.0,
                        min_exclusive=True)  # fmt: skip


class Karras(TableSchedule):
    """Karras et al. (2022), eq. 5: levels evenly spaced in level^(1/rho)."""

    Config = KarrasConfig

    def compute(self, table: NoiseTable, steps: int) -> torch.Tensor:
        inv = 1 / self.config.rho
        ramp = torch.linspace(0, 1, steps, dtype=F64)
        top, bottom = table.sigma_max**inv, table.sigma_min**inv
        return _zero((top + ramp * (bottom - top)) ** self.config.rho)


class Exponential(TableSchedule):
    """Levels evenly spaced in log level."""

    def compute(self, table: NoiseTable, steps: int) -> torch.Tensor:
        logs = torch.linspace(math.log(table.sigma_max), math.log(table.sigma_min), steps,
                              dtype=F64)  # fmt: skip
        return _zero(logs.exp())


@dataclass
class PolyexponentialConfig:
    rho: float = option(1.0, "the ramp's exponent (1: exponential)", min=0.0,
                        min_exclusive=True)  # fmt: skip


class Polyexponential(TableSchedule):
    """Log levels along a polynomial ramp of exponent rho (k-diffusion)."""

    Config = PolyexponentialConfig

    def compute(self, table: NoiseTable, steps: int) -> torch.Tensor:
        ramp = torch.linspace(1, 0, steps, dtype=F64) ** self.config.rho
        low, high = math.log(table.sigma_min), math.log(table.sigma_max)
        return _zero((ramp * (high - low) + low).exp())


class KLOptimal(TableSchedule):
    """Sabour et al. (2024), "Align your steps": levels evenly spaced in arctan(level),
    the schedule that minimises a KL bound for the probability-flow ODE."""

    def compute(self, table: NoiseTable, steps: int) -> torch.Tensor:
        if steps == 1:
            return torch.tensor([table.sigma_max, 0.0], dtype=F64)
        w = torch.arange(steps, dtype=F64) / (steps - 1)
        angles = w * math.atan(table.sigma_min) + (1 - w) * math.atan(table.sigma_max)
        return _zero(angles.tan())


__all__ = [
    "NoiseTable",
    "TableSchedule",
    "check_levels",
    "Normal",
    "Karras",
    "Exponential",
    "Polyexponential",
    "SGMUniform",
    "Simple",
    "DDIMUniform",
    "Beta",
    "LinearQuadratic",
    "KLOptimal",
]
