"""k-diffusion's samplers (Crowson's ``k_diffusion/sampling.py``) as diffplug level samplers.

Every sampler works on ``x = x0 + s*eps`` over the schedule's levels ``s_0 > ... > s_N = 0``
(k-diffusion's sigmas). The loop calls the denoiser at each level ``evaluations`` lists and
hands ``update(j, x, x0, eps, z)`` that call's x0_hat (k-diffusion's ``denoised``); the
stepper returns the x of the next call. A step that needs two calls (Heun, DPM2, DPM-Solver++
2S and SDE) keeps its start point between them; a multistep one (LMS, DPM-Solver++ 2M/3M)
keeps its previous x0_hat (or slopes). Everything about the levels is computed once per
batch, on the host, in float64.

Noise comes only from the loop's per-sample ``z``: sample k draws the same numbers in any
batch. Where k-diffusion draws noise before a denoiser call (Karras' churn; the first
half-step of DPM-Solver++ SDE), it is drawn after the previous call, which is the same
thing. The one exception is churn at the very first step, which has no previous call:
there the starting noise is simply drawn at the churned level (same distribution).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

import diffplug
from diffplug import LevelSampler, ancestral_step, option


def _slope(x: torch.Tensor, x0: torch.Tensor, s: float) -> torch.Tensor:
    """dx/ds of the probability-flow ODE: (x - x0_hat)/s (k-diffusion's ``to_d``)."""
    return (x - x0) / s


def _log_ratio_expm1(s_to: float, s_from: float) -> float:
    """expm1(log(s_to/s_from)) = s_to/s_from - 1, accurate for close levels; -1 at s_to = 0."""
    return math.expm1(math.log(s_to / s_from)) if s_to > 0 else -1.0


# -- options --------------------------------------------------------------------------------
@dataclass
class ChurnConfig:
    s_churn: float = option(0.0, "Karras' churn: total extra noise over the run (0: ODE)", min=0.0)
    s_tmin: float = option(0.0, "churn only at levels >= this", min=0.0)
    s_tmax: float = option(math.inf, "churn only at levels <= this", min=0.0)
    s_noise: float = option(1.0, "scale of the churn noise", min=0.0)


@dataclass
class AncestralConfig:
    eta: float = option(1.0, "noise per step (0: the ODE sampler; 1: ancestral)", min=0.0)
    s_noise: float = option(1.0, "scale of the added noise", min=0.0)


@dataclass
class LMSConfig:
    order: int = option(4, "number of previous slopes the step uses", choices=(1, 2, 3, 4))


@dataclass
class SDEConfig:
    eta: float = option(1.0, "noise per step (0: the ODE solver)", min=0.0)
    s_noise: float = option(1.0, "scale of the added noise", min=0.0)


@dataclass
class DPMppSDEConfig(SDEConfig):
    r: float = option(0.5, "where the intermediate level sits in log-level (0..1)", min=0.0,
                      max=1.0, min_exclusive=True)  # fmt: skip


@dataclass
class DPMpp2MSDEConfig(SDEConfig):
    solver_type: str = option(
        "midpoint", "the second-order correction's form", choices=("midpoint", "heun")
    )


# -- Karras et al. (2022), Algorithm 2: Euler, Heun, DPM2 with churn ------------------------
@dataclass(frozen=True)
class Churn:
    """Each step's churned level sigma_hat and the std of the noise that reaches it."""

    levels: list[float]
    hat: list[float]
    std: list[float]

    @classmethod
    def of(cls, levels: list[float], cfg: ChurnConfig) -> Churn:
        n = len(levels) - 1
        hat, std = [], []
        for s in levels[:-1]:
            gamma = min(cfg.s_churn / n, math.sqrt(2) - 1) if cfg.s_tmin <= s <= cfg.s_tmax else 0
            s_hat = s * (gamma + 1)
            hat.append(s_hat)
            std.append(cfg.s_noise * math.sqrt(s_hat**2 - s**2) if gamma > 0 else 0.0)
        return cls(levels, hat, std)

    def noisy_after(self, i: int) -> bool:
        """Whether step i + 1 churns (its noise is drawn after step i's last call)."""
        return i + 1 < len(self.hat) and self.std[i + 1] > 0

    def add(self, x: torch.Tensor, i: int, z: torch.Tensor | None) -> torch.Tensor:
        """x at level s_{i+1}, moved up to step i + 1's churned level."""
        return x if z is None else x + z * self.std[i + 1]


class _ChurnSampler(LevelSampler):
    """Shared by Euler, Heun and DPM2: the churned levels, and x_T drawn at sigma_hat_0."""

    Config = ChurnConfig

    def churn(self, levels: list[float]) -> Churn:
        return Churn.of(levels, self.config)

    def plan(self, process: diffplug.Process, steps: int) -> diffplug.Plan:
        plan = super().plan(process, steps)
        first = self.churn(plan.levels).hat[0]
        plan.init_scale = math.sqrt(1 + first**2)  # x_T ~ N(0, 1 + sigma_hat_0^2)
        return plan


@dataclass
class _EulerStepper:
    churn: Churn

    def update(self, j: int, x: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor,
               z: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
        c = self.churn
        d = _slope(x, x0, c.hat[j])
        x = x + d * (c.levels[j + 1] - c.hat[j])
        return c.add(x, j, z)


class Euler(_ChurnSampler):
    """Euler steps on the probability-flow ODE (Karras et al. 2022, Alg. 2 without the
    correction), with optional churn."""

    order = 1.0
    evaluations_per_step = 1
    default_steps = 50

    def evaluations(self, levels: list[float]) -> list[float]:
        return self.churn(levels).hat

    def noise(self, levels: list[float]) -> list[bool]:
        c = self.churn(levels)
        return [c.noisy_after(i) for i in range(len(c.hat))]

    def stepper(self, levels: list[float]) -> _EulerStepper:
        return _EulerStepper(self.churn(levels))


def _two_call_steps(levels: list[float], second: list[float | None]) -> list[tuple[int, int]]:
    """(step, stage) of every call: stage 0 at the step's start, stage 1 where ``second``
    gives the step a second level (not None)."""
    calls = []
    for i in range(len(levels) - 1):
        calls.append((i, 0))
        if second[i] is not None:
            calls.append((i, 1))
    return calls


@dataclass
class _TwoStageStepper:
    """Bookkeeping shared by the two-call samplers: which (step, stage) call j is, and the
    step's start point and first slope kept between its two calls."""

    calls: list[tuple[int, int]]
    x_start: torch.Tensor | None = None
    first: torch.Tensor | None = None


@dataclass
class _HeunStepper(_TwoStageStepper):
    churn: Churn | None = None

    def update(self, j: int, x: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor,
               z: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
        c = self.churn
        assert c is not None
        i, stage = self.calls[j]
        s_next = c.levels[i + 1]
        dt = s_next - c.hat[i]
        if stage == 0:  # Euler: the predictor, or on the last step (to 0) the whole step
            self.x_start, self.first = x, _slope(x, x0, c.hat[i])
            return x + self.first * dt
        assert self.x_start is not None and self.first is not None
        d2 = _slope(x, x0, s_next)
        x = self.x_start + (self.first + d2) / 2 * dt  # the trapezoidal corrector
        return c.add(x, i, z)


class Heun(_ChurnSampler):
    """Heun's second-order method (Karras et al. 2022, Alg. 1/2), Euler on the last step."""

    order = 2.0
    evaluations_per_step = 2
    default_steps = 25

    def _second(self, levels: list[float]) -> list[float | None]:
        return [s if s > 0 else None for s in levels[1:]]

    def evaluations(self, levels: list[float]) -> list[float]:
        c, second = self.churn(levels), self._second(levels)
        calls = _two_call_steps(levels, second)
        return _call_levels(calls, c.hat, second)

    def noise(self, levels: list[float]) -> list[bool]:
        c, second = self.churn(levels), self._second(levels)
        calls = _two_call_steps(levels, second)
        return [_last_of_step(calls, k) and c.noisy_after(i) for k, (i, _) in enumerate(calls)]

    def steps_of(self, levels: list[float]) -> list[int]:
        return [i for i, _ in _two_call_steps(levels, self._second(levels))]

    def stepper(self, levels: list[float]) -> _HeunStepper:
        c = self.churn(levels)
        return _HeunStepper(_two_call_steps(levels, self._second(levels)), churn=c)


def _call_levels(calls: list[tuple[int, int]], first: list[float], second: list[float | None]
                 ) -> list[float]:  # fmt: skip
    """The level of every (step, stage) call."""
    out = []
    for i, stage in calls:
        level = first[i] if stage == 0 else second[i]
        assert level is not None
        out.append(level)
    return out


def _last_of_step(calls: list[tuple[int, int]], k: int) -> bool:
    return k + 1 == len(calls) or calls[k + 1][0] != calls[k][0]


def _geometric_mid(a: float, b: float) -> float:
    """exp(lerp(log a, log b, 1/2)): the midpoint in log-level."""
    return math.exp(math.log(a) + 0.5 * (math.log(b) - math.log(a)))


@dataclass
class _DPM2Stepper(_TwoStageStepper):
    churn: Churn | None = None
    mid: list[float | None] = field(default_factory=list)

    def update(self, j: int, x: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor,
               z: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
        c = self.churn
        assert c is not None
        i, stage = self.calls[j]
        s_next = c.levels[i + 1]
        if stage == 0:
            d = _slope(x, x0, c.hat[i])
            mid = self.mid[i]
            if mid is None:  # the last step: Euler to the clean sample
                return x + d * (s_next - c.hat[i])
            self.x_start = x
            return x + d * (mid - c.hat[i])  # half a step in log-level
        mid = self.mid[i]
        assert self.x_start is not None and mid is not None
        d2 = _slope(x, x0, mid)
        x = self.x_start + d2 * (s_next - c.hat[i])  # the whole step with the midpoint slope
        return c.add(x, i, z)


class DPM2(_ChurnSampler):
    """DPM-Solver-2 in Karras' form (k-diffusion's ``sample_dpm_2``): the slope at the
    log-midpoint level takes the whole step; Euler on the last step."""

    order = 2.0
    evaluations_per_step = 2
    default_steps = 25

    def _mid(self, levels: list[float]) -> list[float | None]:
        hat = self.churn(levels).hat
        return [
            _geometric_mid(h, s) if s > 0 else None for h, s in zip(hat, levels[1:], strict=True)
        ]

    def evaluations(self, levels: list[float]) -> list[float]:
        c, mid = self.churn(levels), self._mid(levels)
        calls = _two_call_steps(levels, mid)
        return _call_levels(calls, c.hat, mid)

    def noise(self, levels: list[float]) -> list[bool]:
        c = self.churn(levels)
        calls = _two_call_steps(levels, self._mid(levels))
        return [_last_of_step(calls, k) and c.noisy_after(i) for k, (i, _) in enumerate(calls)]

    def steps_of(self, levels: list[float]) -> list[int]:
        return [i for i, _ in _two_call_steps(levels, self._mid(levels))]

    def stepper(self, levels: list[float]) -> _DPM2Stepper:
        c, mid = self.churn(levels), self._mid(levels)
        return _DPM2Stepper(_two_call_steps(levels, mid), churn=c, mid=mid)


# -- ancestral samplers ---------------------------------------------------------------------
@dataclass(frozen=True)
class Ancestral:
    """Each step's (sigma_down, sigma_up) and the noise scale."""

    levels: list[float]
    down: list[float]
    up: list[float]
    s_noise: float

    @classmethod
    def of(cls, levels: list[float], eta: float, s_noise: float) -> Ancestral:
        steps = [ancestral_step(a, b, eta) for a, b in zip(levels, levels[1:], strict=False)]
        return cls(levels, [d for d, _ in steps], [u for _, u in steps], s_noise)

    def noisy(self, i: int) -> bool:
        """Whether step i ends with fresh noise (k-diffusion adds none on the last step)."""
        return self.levels[i + 1] > 0 and self.up[i] > 0

    def add(self, x: torch.Tensor, i: int, z: torch.Tensor | None) -> torch.Tensor:
        return x if z is None else x + z * (self.s_noise * self.up[i])


class _AncestralSampler(LevelSampler):
    Config = AncestralConfig
    stochastic = True

    def ancestral(self, levels: list[float]) -> Ancestral:
        return Ancestral.of(levels, self.config.eta, self.config.s_noise)


@dataclass
class _EulerAncestralStepper:
    anc: Ancestral

    def update(self, j: int, x: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor,
               z: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
        a = self.anc
        s = a.levels[j]
        x = x + _slope(x, x0, s) * (a.down[j] - s)
        return a.add(x, j, z)


class EulerAncestral(_AncestralSampler):
    """Euler steps down to sigma_down, then noise up to the next level (k-diffusion's
    ``sample_euler_ancestral``; eta = 1 is DDPM's ancestral step in level form)."""

    order = 1.0
    evaluations_per_step = 1
    default_steps = 50

    def evaluations(self, levels: list[float]) -> list[float]:
        return list(levels[:-1])

    def noise(self, levels: list[float]) -> list[bool]:
        a = self.ancestral(levels)
        return [a.noisy(i) for i in range(len(levels) - 1)]

    def stepper(self, levels: list[float]) -> _EulerAncestralStepper:
        return _EulerAncestralStepper(self.ancestral(levels))


def _ancestral_mid(levels: list[float], anc: Ancestral) -> list[float | None]:
    """The log-midpoint of each step's level and sigma_down (None where sigma_down = 0). At
    eta = 1 it is the next level itself (sigma_down = s_next^2/s): kept between the two
    levels so that round-off cannot make the evaluation levels rise."""
    out: list[float | None] = []
    for s, nxt, down in zip(levels, levels[1:], anc.down, strict=False):
        out.append(min(s, max(_geometric_mid(s, down), nxt)) if down != 0 else None)
    return out


@dataclass
class _DPM2AncestralStepper(_TwoStageStepper):
    anc: Ancestral | None = None
    mid: list[float | None] = field(default_factory=list)

    def update(self, j: int, x: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor,
               z: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
        a = self.anc
        assert a is not None
        i, stage = self.calls[j]
        s, down, mid = a.levels[i], a.down[i], self.mid[i]
        if stage == 0:
            d = _slope(x, x0, s)
            if mid is None:  # sigma_down = 0: one Euler step, no noise
                return x + d * (down - s)
            self.x_start = x
            return x + d * (mid - s)
        assert self.x_start is not None and mid is not None
        x = self.x_start + _slope(x, x0, mid) * (down - s)
        return a.add(x, i, z)


class _MidpointAncestral(_AncestralSampler):
    """An ancestral sampler with a second call at each step's midpoint toward sigma_down;
    subclasses name their stepper and say which calls are followed by noise."""

    steps_with: Any = None  # the stepper class

    def _mid(self, levels: list[float]) -> list[float | None]:
        return _ancestral_mid(levels, self.ancestral(levels))

    def evaluations(self, levels: list[float]) -> list[float]:
        mid = self._mid(levels)
        calls = _two_call_steps(levels, mid)
        return _call_levels(calls, levels, mid)

    def steps_of(self, levels: list[float]) -> list[int]:
        return [i for i, _ in _two_call_steps(levels, self._mid(levels))]

    def stepper(self, levels: list[float]) -> Any:
        mid = self._mid(levels)
        return self.steps_with(_two_call_steps(levels, mid), anc=self.ancestral(levels), mid=mid)


class DPM2Ancestral(_MidpointAncestral):
    """DPM2 steps down to sigma_down, then noise (k-diffusion's ``sample_dpm_2_ancestral``)."""

    steps_with = _DPM2AncestralStepper
    order = 2.0
    evaluations_per_step = 2
    default_steps = 25

    def noise(self, levels: list[float]) -> list[bool]:
        # the noise follows the midpoint call; a step without one adds none
        a, mid = self.ancestral(levels), self._mid(levels)
        calls = _two_call_steps(levels, mid)
        return [stage == 1 and a.up[i] > 0 for i, stage in calls]


@dataclass
class _DPMpp2SAncestralStepper(_TwoStageStepper):
    anc: Ancestral | None = None
    mid: list[float | None] = field(default_factory=list)

    def update(self, j: int, x: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor,
               z: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
        a = self.anc
        assert a is not None
        i, stage = self.calls[j]
        s, down, mid = a.levels[i], a.down[i], self.mid[i]
        if stage == 0 and mid is None:  # sigma_down = 0: Euler to x0_hat, then any noise
            return a.add(x + _slope(x, x0, s) * (down - s), i, z)
        h = math.log(s) - math.log(down) if mid is not None else 0.0
        if stage == 0:  # the data-prediction exponential step to the log-midpoint
            assert mid is not None
            self.x_start = x
            return x * (mid / s) - x0 * math.expm1(-0.5 * h)
        assert self.x_start is not None
        x = self.x_start * (down / s) - x0 * math.expm1(-h)  # the whole step, midpoint x0_hat
        return a.add(x, i, z)


class DPMpp2SAncestral(_MidpointAncestral):
    """DPM-Solver++(2S) single-step steps down to sigma_down, then noise (Lu et al. 2022;
    k-diffusion's ``sample_dpmpp_2s_ancestral``)."""

    steps_with = _DPMpp2SAncestralStepper
    order = 2.0
    evaluations_per_step = 2
    default_steps = 25

    def noise(self, levels: list[float]) -> list[bool]:
        a, mid = self.ancestral(levels), self._mid(levels)
        calls = _two_call_steps(levels, mid)
        return [_last_of_step(calls, k) and a.noisy(i) for k, (i, _) in enumerate(calls)]


# -- linear multistep -----------------------------------------------------------------------
def lms_coefficients(levels: list[float], i: int, order: int) -> list[float]:
    """The weights of slopes d_i, d_{i-1}, ... in the step from levels[i] to levels[i+1]:
    the integral over that interval of each one's Lagrange basis polynomial on the levels
    where they were taken. The polynomials have degree < order <= 4, so two-point
    Gauss-Legendre quadrature integrates them exactly."""
    nodes = [levels[i - k] for k in range(order)]
    a, b = levels[i], levels[i + 1]
    half, centre = (b - a) / 2, (a + b) / 2
    points = [centre - half / math.sqrt(3), centre + half / math.sqrt(3)]

    def basis(j: int, tau: float) -> float:
        out = 1.0
        for k in range(order):
            if k != j:
                out *= (tau - nodes[k]) / (nodes[j] - nodes[k])
        return out

    return [half * sum(basis(j, p) for p in points) for j in range(order)]


@dataclass
class _LMSStepper:
    levels: list[float]
    order: int
    slopes: list[torch.Tensor] = field(default_factory=list)  # newest last

    def update(self, j: int, x: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor,
               z: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
        self.slopes.append(_slope(x, x0, self.levels[j]))
        if len(self.slopes) > self.order:
            self.slopes.pop(0)
        coefs = lms_coefficients(self.levels, j, len(self.slopes))
        for coef, d in zip(coefs, reversed(self.slopes), strict=True):
            x = x + d * coef
        return x


class LMS(LevelSampler):
    """Linear multistep (Adams-Bashforth on the level axis, k-diffusion's ``sample_lms``):
    each step integrates the polynomial through the last ``order`` slopes."""

    Config = LMSConfig
    order = 4.0
    evaluations_per_step = 1
    default_steps = 50

    def evaluations(self, levels: list[float]) -> list[float]:
        return list(levels[:-1])

    def stepper(self, levels: list[float]) -> _LMSStepper:
        return _LMSStepper(list(levels), self.config.order)


# -- DPM-Solver++ (Lu et al. 2022): 2M, SDE, 2M SDE, 3M SDE ----------------------------------
@dataclass
class _DPMpp2MStepper:
    levels: list[float]
    prev: torch.Tensor | None = None

    def update(self, j: int, x: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor,
               z: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
        s, s_next = self.levels[j], self.levels[j + 1]
        d = x0
        if s_next == 0:
            x = x0  # the last step lands on x0_hat
        else:
            h = math.log(s) - math.log(s_next)
            if self.prev is not None:
                r = (math.log(self.levels[j - 1]) - math.log(s)) / h
                d = x0 * (1 + 1 / (2 * r)) - self.prev * (1 / (2 * r))
            x = x * (s_next / s) - d * math.expm1(-h)
        self.prev = x0
        return x


class DPMpp2M(LevelSampler):
    """DPM-Solver++(2M): second-order multistep in log-level with data prediction, first
    order on the first and last steps (k-diffusion's ``sample_dpmpp_2m``)."""

    order = 2.0
    evaluations_per_step = 1
    default_steps = 25

    def evaluations(self, levels: list[float]) -> list[float]:
        return list(levels[:-1])

    def stepper(self, levels: list[float]) -> _DPMpp2MStepper:
        return _DPMpp2MStepper(list(levels))


@dataclass
class _DPMppSDEStepper(_TwoStageStepper):
    levels: list[float] = field(default_factory=list)
    mid: list[float | None] = field(default_factory=list)
    eta: float = 1.0
    s_noise: float = 1.0
    r: float = 0.5

    def update(self, j: int, x: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor,
               z: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
        i, stage = self.calls[j]
        s, s_next, mid = self.levels[i], self.levels[i + 1], self.mid[i]
        if mid is None:  # the last step: Euler to the clean sample
            return x + _slope(x, x0, s) * (s_next - s)
        if stage == 0:  # an ancestral exponential half-step to the intermediate level
            down, up = ancestral_step(s, mid, self.eta)
            self.x_start, self.first = x, x0
            x = x * (down / s) - x0 * _log_ratio_expm1(down, s)
            return x if z is None else x + z * (self.s_noise * up)
        assert self.x_start is not None and self.first is not None
        fac = 1 / (2 * self.r)
        d = self.first * (1 - fac) + x0 * fac
        down, up = ancestral_step(s, s_next, self.eta)
        x = self.x_start * (down / s) - d * _log_ratio_expm1(down, s)
        return x if z is None else x + z * (self.s_noise * up)


class DPMppSDE(LevelSampler):
    """DPM-Solver++ SDE (k-diffusion's ``sample_dpmpp_sde``): two ancestral exponential
    stages per step, the first to the level at fraction r of the log-level step."""

    Config = DPMppSDEConfig
    order = 2.0
    evaluations_per_step = 2
    stochastic = True
    default_steps = 25

    def _mid(self, levels: list[float]) -> list[float | None]:
        r = self.config.r
        return [
            math.exp(-(-math.log(s) + r * (math.log(s) - math.log(n)))) if n > 0 else None
            for s, n in zip(levels, levels[1:], strict=False)
        ]

    def evaluations(self, levels: list[float]) -> list[float]:
        mid = self._mid(levels)
        calls = _two_call_steps(levels, mid)
        return _call_levels(calls, levels, mid)

    def noise(self, levels: list[float]) -> list[bool]:
        mid = self._mid(levels)
        calls = _two_call_steps(levels, mid)
        return [self.config.eta > 0 and mid[i] is not None for i, _ in calls]

    def steps_of(self, levels: list[float]) -> list[int]:
        return [i for i, _ in _two_call_steps(levels, self._mid(levels))]

    def stepper(self, levels: list[float]) -> _DPMppSDEStepper:
        mid, cfg = self._mid(levels), self.config
        calls = _two_call_steps(levels, mid)
        return _DPMppSDEStepper(calls, levels=list(levels), mid=mid, eta=cfg.eta,
                                s_noise=cfg.s_noise, r=cfg.r)  # fmt: skip


@dataclass
class _DPMpp2MSDEStepper:
    levels: list[float]
    eta: float
    s_noise: float
    heun: bool
    prev: torch.Tensor | None = None
    h_last: float = 0.0

    def update(self, j: int, x: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor,
               z: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
        s, s_next = self.levels[j], self.levels[j + 1]
        if s_next == 0:
            self.prev = x0
            return x0  # the last step lands on x0_hat
        h = math.log(s) - math.log(s_next)
        eh = self.eta * h
        phi = -math.expm1(-h - eh)
        x = x * (s_next / s * math.exp(-eh)) + x0 * phi
        if self.prev is not None:
            r = self.h_last / h
            if self.heun:
                x = x + (x0 - self.prev) * ((phi / (-h - eh) + 1) / r)
            else:
                x = x + (x0 - self.prev) * (0.5 * phi / r)
        if z is not None:
            x = x + z * (s_next * math.sqrt(-math.expm1(-2 * eh)) * self.s_noise)
        self.prev, self.h_last = x0, h
        return x


class DPMpp2MSDE(LevelSampler):
    """DPM-Solver++(2M) SDE (k-diffusion's ``sample_dpmpp_2m_sde``): the multistep solver of
    the SDE whose noise is eta times the ODE's step; eta = 0 with midpoint is DPM++(2M)."""

    Config = DPMpp2MSDEConfig
    order = 2.0
    evaluations_per_step = 1
    stochastic = True
    default_steps = 25

    def evaluations(self, levels: list[float]) -> list[float]:
        return list(levels[:-1])

    def noise(self, levels: list[float]) -> list[bool]:
        return [self.config.eta > 0 and n > 0 for n in levels[1:]]

    def stepper(self, levels: list[float]) -> _DPMpp2MSDEStepper:
        cfg = self.config
        return _DPMpp2MSDEStepper(list(levels), cfg.eta, cfg.s_noise,
                                  cfg.solver_type == "heun")  # fmt: skip


@dataclass
class _DPMpp3MSDEStepper:
    levels: list[float]
    eta: float
    s_noise: float
    x0_1: torch.Tensor | None = None  # x0_hat one step back
    x0_2: torch.Tensor | None = None  # two steps back
    h_1: float | None = None
    h_2: float | None = None

    def update(self, j: int, x: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor,
               z: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
        s, s_next = self.levels[j], self.levels[j + 1]
        h = self.h_1  # k-diffusion keeps the last h on the final step
        if s_next == 0:
            x = x0
        else:
            h = math.log(s) - math.log(s_next)
            he = h * (self.eta + 1)
            x = x * math.exp(-he) + x0 * (-math.expm1(-he))
            phi2 = math.expm1(-he) / he + 1
            if self.h_2 is not None and self.h_1 is not None:
                assert self.x0_1 is not None and self.x0_2 is not None
                r0, r1 = self.h_1 / h, self.h_2 / h
                d1_0 = (x0 - self.x0_1) / r0
                d1_1 = (self.x0_1 - self.x0_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi3 = phi2 / he - 0.5
                x = x + d1 * phi2 - d2 * phi3
            elif self.h_1 is not None:
                assert self.x0_1 is not None
                x = x + (x0 - self.x0_1) * (phi2 / (self.h_1 / h))
            if z is not None:
                x = x + z * (s_next * math.sqrt(-math.expm1(-2 * h * self.eta)) * self.s_noise)
        self.x0_1, self.x0_2 = x0, self.x0_1
        self.h_1, self.h_2 = h, self.h_1
        return x


class DPMpp3MSDE(LevelSampler):
    """DPM-Solver++(3M) SDE (k-diffusion's ``sample_dpmpp_3m_sde``): third-order multistep
    on the last three x0_hat; eta = 0 is the ODE solver DPM-Solver++(3M)."""

    Config = SDEConfig
    order = 3.0
    evaluations_per_step = 1
    stochastic = True
    default_steps = 25

    def evaluations(self, levels: list[float]) -> list[float]:
        return list(levels[:-1])

    def noise(self, levels: list[float]) -> list[bool]:
        return [self.config.eta > 0 and n > 0 for n in levels[1:]]

    def stepper(self, levels: list[float]) -> _DPMpp3MSDEStepper:
        return _DPMpp3MSDEStepper(list(levels), self.config.eta, self.config.s_noise)
