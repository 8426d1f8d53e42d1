"""DPM-Solver++(2M): a second-order multistep solver of the probability-flow ODE.

With lambda = log(alpha/sigma) and h = lambda_next - lambda_t, one step is
x_next = (sigma_next/sigma_t)*x - alpha_next*(exp(-h) - 1)*D, where D = x0_hat on the first
and last step and D = (1 + 1/(2r))*x0_hat - 1/(2r)*x0_prev otherwise (r = h_prev/h).
The update remembers the previous x0_hat, so it is not the loop's linear form: the plan's
``begin`` returns a per-batch stepper whose ``update`` keeps that history.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from diffplug import VP, Plan, Process, Scheduler, UserError, option, transitions


@dataclass
class DPMSolverConfig:
    spacing: str = option(
        "trailing", "timestep sub-sequence", choices=("leading", "trailing", "linspace")
    )


@dataclass
class MultistepPlan(Plan):
    """The DPM-Solver++ tables plus each step's lambda = log(alpha/sigma)."""

    lam: list[float] | None = None
    linear = False

    def begin(self, x: torch.Tensor) -> _History:
        return _History(self)  # no history crosses batches


@dataclass
class _History:
    """One batch's stepping: the second-order correction uses the previous x0_hat."""

    plan: MultistepPlan
    prev: torch.Tensor | None = None

    def update(
        self, i: int, x: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, z: torch.Tensor | None
    ) -> torch.Tensor:
        plan, d = self.plan, x0
        if self.prev is not None and i < len(plan) - 1 and plan.lam is not None:
            r = (plan.lam[i] - plan.lam[i - 1]) / (plan.lam[i + 1] - plan.lam[i])
            d = x0 * (1 + 1 / (2 * r)) - self.prev * (1 / (2 * r))
        self.prev = x0
        return x * plan.a[i] + d * plan.b[i]


class DPMSolver2M(Scheduler):
    """DPM-Solver++(2M) on a discrete VP process (data prediction, lower order at the end)."""

    Config = DPMSolverConfig

    def supports(self, process: Process) -> str | None:
        return None if isinstance(process, VP) else "needs a discrete VP process"

    def native_process(self) -> Process | None:
        """The process the plan is written for: core bridges a model of any other process
        (ADM's) to it by matching signal-to-noise ratios, with no code here."""
        return VP()

    def plan(self, process: Process, steps: int) -> Plan:
        if not isinstance(process, VP):
            raise UserError("example-dpmpp-2m needs a discrete VP process")
        ts, here, nxt = transitions(process, steps, self.config.spacing)
        alpha = [math.sqrt(x) for x in here]
        sigma = [math.sqrt(1 - x) for x in here]
        lam = [math.log(a / s) for a, s in zip(alpha, sigma, strict=True)]
        a, b = [], []
        for i, abar_next in enumerate(nxt):
            if abar_next < 1.0:
                a_next, s_next = math.sqrt(abar_next), math.sqrt(1 - abar_next)
                h = math.log(a_next / s_next) - lam[i]
                a.append(s_next / sigma[i])
                b.append(-a_next * math.expm1(-h))
            else:  # to t = -1 (abar = 1): the clean sample is x0_hat itself
                a.append(0.0)
                b.append(1.0)
        zeros = [0.0] * len(ts)
        return MultistepPlan(
            t=torch.tensor(ts, dtype=torch.float64), alpha=alpha, sigma=sigma,
            a=a, b=b, c=zeros, d=list(zeros), lam=lam, info={"timesteps": ts},
        )  # fmt: skip
