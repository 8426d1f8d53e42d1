"""A sampler's plan: where to evaluate the denoiser and how to update x after each call.

Almost every diffusion sampler's step is linear in (x_t, x0_hat, eps_hat, z):

    x_next = a[i]*x_t + b[i]*x0_hat + c[i]*eps_hat + d[i]*z,   z ~ N(0, I)

so a sampler is a short function that fills these tables once per run (DDPM, DDIM and ADM's
posterior steps all fit). The loop folds them with the prediction conversion into two or
three fused tensor ops per step: no per-step schedule work, no host-device sync. A sampler
whose step is not linear (multistep, Heun) subclasses ``Plan`` and overrides ``begin`` to
return a ``Stepper``: a small per-batch object whose ``update`` does the step and whose
history (a multistep solver's previous x0_hat) lives in it and dies with the batch.

A plan holds the sampler's tables only. How a model of another process is called at each
step (its times, the input scale) is the model view ``diffplug.bridge`` builds beside it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Protocol

import torch

from diffplug.errors import UserError

#: more steps than any sampler needs (DDPM's 1000 at most) but few enough that a plan's
#: host tables stay small: a typo such as 2**31 is refused, not allocated
MAX_STEPS = 100_000


class Stepper(Protocol):
    """One batch's stepping state: ``update`` turns (x_t, x0_hat, eps_hat, z) into x_next."""

    def update(
        self, i: int, x: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, z: torch.Tensor | None
    ) -> torch.Tensor: ...


@dataclass
class Plan:
    """Per-step tables, host-side floats computed once (float64)."""

    #: process times at which the denoiser is called, strictly decreasing, shape (N,).
    t: torch.Tensor
    alpha: list[float]
    sigma: list[float]
    a: list[float]
    b: list[float]
    c: list[float]
    d: list[float]
    #: x at the first step is ``init_scale * z``.
    init_scale: float = 1.0
    #: x0_hat transforms the sampler itself asks for (e.g. DDPM's ``clip_sample``).
    transforms: list = field(default_factory=list)
    #: extra facts for the recipe (resolved timesteps, spacing...).
    info: dict = field(default_factory=dict)

    #: the sampler step each call belongs to, non-decreasing (None: one call per step), so
    #: that progress counts the user's steps (a Heun step is two calls)
    step_of: list[int] | None = None

    #: False when the step is not the linear form (``begin`` returns a stepper of its own),
    #: so the loop must not fold the tables.
    linear = True

    def __post_init__(self) -> None:
        n = len(self.t)
        lengths = {len(v) for v in (self.alpha, self.sigma, self.a, self.b, self.c, self.d)}
        if lengths != {n}:
            raise UserError(f"malformed plan: tables of lengths {sorted(lengths)} for {n} steps")

    def __len__(self) -> int:
        return len(self.t)

    def step_count(self) -> int:
        """The number of sampler steps (of ``len(self)`` denoiser calls)."""
        return len(self) if self.step_of is None else len(set(self.step_of))

    def ends_step(self, i: int) -> bool:
        """Whether call ``i`` is the last of its step."""
        of = self.step_of
        return of is None or i + 1 == len(of) or of[i + 1] != of[i]

    def begin(self, x: torch.Tensor) -> Stepper | None:
        """The stepper of one batch, called with its starting x before its first step: every
        batch, every best-of variant, and the replay that locates a NaN. A sampler with
        history returns a fresh object holding it, so none crosses batches; the default (and
        ``None``, for plans written before steppers) steps with the plan's own ``update``."""
        return self

    def noisy(self, i: int) -> bool:
        """Whether step ``i`` draws fresh noise (known on the host: no sync)."""
        return self.d[i] != 0.0

    def update(
        self, i: int, x: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, z: torch.Tensor | None
    ) -> torch.Tensor:
        """The step, for samplers whose update is not the linear form above."""
        out = x * self.a[i] + x0 * self.b[i] + eps * self.c[i]
        return out if z is None else out + z * self.d[i]

    def tail(self, step: int) -> tuple[Plan, int | None]:
        """The plan from sampler step ``step`` on (img2img starts part-way through it), and
        the call of this plan the tail's first call is; None when the tail is planned anew
        (``LevelPlan``: its calls are then not a suffix of these).

        The default cuts every table at the step's first call. A plan whose stepper indexes
        tables of its own (``begin`` or ``update`` overridden) gets its stepper shifted by
        that many calls, so it still reads its own row; its history starts empty, as a
        diffusers scheduler's does after ``set_begin_index``."""
        if step == 0:
            return self, 0
        steps = sorted(set(self.step_of)) if self.step_of is not None else range(len(self))
        if not 0 < step < len(steps):
            raise UserError(f"cannot start at step {step} of {len(steps)}")
        start = step if self.step_of is None else self.step_of.index(steps[step])
        names = ("t", "alpha", "sigma", "a", "b", "c", "d")
        cut: dict = {name: getattr(self, name)[start:] for name in names}
        if self.step_of is not None:
            cut["step_of"] = [s - steps[step] for s in self.step_of[start:]]
        cut["info"] = {**self.info, "first_call": start}
        own = type(self).begin is not Plan.begin or type(self).update is not Plan.update
        if not own:
            return dataclasses.replace(self, **cut), start
        return ShiftedPlan(**cut, init_scale=self.init_scale, transforms=self.transforms,
                           inner=self, offset=start), start  # fmt: skip


def kept_steps(steps: int, strength: float) -> int:
    """How many of ``steps`` img2img runs at ``strength`` in (0, 1]: the last
    ``int(steps * strength)``, diffusers' rule, so its pipelines and ours start alike."""
    return min(int(steps * strength), steps)


@dataclass
class ShiftedPlan(Plan):
    """The tail of a plan with a stepper of its own: call i here is call ``offset + i``
    there, and the stepper is told so."""

    inner: Plan | None = None
    offset: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        assert self.inner is not None
        self.linear = self.inner.linear

    def begin(self, x: torch.Tensor) -> Stepper:
        assert self.inner is not None
        return _Shifted(self.inner.begin(x) or self.inner, self.offset)


@dataclass
class _Shifted:
    stepper: Stepper
    offset: int

    def update(
        self, i: int, x: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, z: torch.Tensor | None
    ) -> torch.Tensor:
        return self.stepper.update(i + self.offset, x, x0, eps, z)
