"""Heun's method on the probability-flow ODE: the plugin guide's worked example.

The sampler works on ``x = x0 + s*eps``, where ``s`` is the noise level (``sigma/alpha`` of
the model's process), and the ODE there is ``dx/ds = (x - x0_hat(x, s)) / s``. One Heun step
from level ``s`` to the next level ``s'`` calls the denoiser twice:

    predictor:  d  = (x - x0_hat(x, s)) / s        x'   = x + d * (s' - s)        (Euler)
    corrector:  d' = (x' - x0_hat(x', s')) / s'    x''  = x + (d + d')/2 * (s' - s)

The last step ends at ``s' = 0``, where ``d'`` cannot be evaluated: it is the predictor alone,
which lands on x0_hat exactly. So ``steps=N`` is N Heun steps over N + 1 levels, and
2N - 1 denoiser calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffplug import LevelSampler


@dataclass
class HeunStepper:
    """One batch's stepping state. The loop calls ``update`` after every denoiser call ``j``
    with that call's x0_hat, and calls the denoiser next on what it returns."""

    levels: list[float]
    start: torch.Tensor | None = None  # x where the current step began
    slope: torch.Tensor | None = None  # the predictor's slope d, for the corrector

    def update(self, j: int, x: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor,
               z: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
        step, is_corrector = divmod(j, 2)  # call 2i predicts step i, call 2i + 1 corrects it
        s, s_next = self.levels[step], self.levels[step + 1]
        if is_corrector:
            return self.correct(x, x0, s, s_next)
        return self.predict(x, x0, s, s_next)

    def predict(self, x: torch.Tensor, x0: torch.Tensor, s: float, s_next: float) -> torch.Tensor:
        """Euler from s to s_next; on the last step (s_next = 0) the whole step."""
        self.start, self.slope = x, (x - x0) / s
        return x + self.slope * (s_next - s)

    def correct(self, x: torch.Tensor, x0: torch.Tensor, s: float, s_next: float) -> torch.Tensor:
        """From the step's start again, along the mean of the two slopes."""
        assert self.start is not None and self.slope is not None
        slope = (x - x0) / s_next  # d' at the predicted point
        return self.start + (self.slope + slope) / 2 * (s_next - s)


class Heun(LevelSampler):
    """Heun's second-order method (Karras et al. 2022, Algorithm 1), Euler on the last step."""

    order = 2.0  # what check_sampler holds it to
    evaluations_per_step = 2  # what `diffplug info` shows
    default_steps = 25

    def evaluations(self, levels: list[float]) -> list[float]:
        """The level of every denoiser call: s and s' for each step, s alone into 0."""
        calls = []
        for s, s_next in zip(levels[:-1], levels[1:], strict=True):
            calls += [s] if s_next == 0 else [s, s_next]
        return calls

    def steps_of(self, levels: list[float]) -> list[int]:
        """The step of every call (two per step, one into 0): progress counts steps, and
        img2img starts at a step's first call."""
        return [k for k, s_next in enumerate(levels[1:]) for _ in range(1 if s_next == 0 else 2)]

    def stepper(self, levels: list[float]) -> HeunStepper:
        return HeunStepper(levels)  # a fresh one for every batch
