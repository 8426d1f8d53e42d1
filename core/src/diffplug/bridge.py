"""Any sampler on any denoiser: plan on the sampler's process, call a model of another.

Every process here is Gaussian, x_t = alpha(t)*x0 + sigma(t)*eps, so a point of process Q
(the sampler's) at time s is a point of process P (the model's) at the time t with the same
signal-to-noise ratio, scaled: x_P = k*x_Q with k = alpha_P/alpha_Q = sigma_P/sigma_Q. Both
share x0 and eps. So bridging is a change of the plan, made once per run: each step calls the
model at P's time t (P's log-SNR inverted; a discrete VP model is called at interpolated,
fractional times) on k*x, and the loop converts the prediction with P's alpha and sigma.
Nothing is computed per step. Outside P's log-SNR range (ADM's t = 1 is pure noise; a VP
model's noisiest step is not) the time is clamped and k is the ratio of the norms
sqrt(alpha^2 + sigma^2), which is exact whenever the SNRs match.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffplug.components import Scheduler
from diffplug.errors import IncompatibleError
from diffplug.plan import Plan
from diffplug.process import Process


@dataclass(frozen=True)
class ModelView:
    """How the loop calls a model at each step of a plan made on another process (or in
    another parametrisation): at the model's times ``t``, on ``scale[i] * x``, and reading
    its prediction with the model's own ``alpha[i]``, ``sigma[i]`` there. The sampler never
    sees it; ``diffplug.sampling.fold`` folds it into the conversion coefficients once."""

    t: torch.Tensor
    scale: list[float]
    alpha: list[float]
    sigma: list[float]
    #: what the recipe keeps of it
    info: dict


def planning_process(scheduler: Scheduler, process: Process) -> Process:
    """The process to plan on: the model's own if the sampler runs it, else the sampler's
    native one (the model is then bridged); refused with the sampler's reason otherwise."""
    reason = scheduler.supports(process)
    if reason is None:
        return process
    native = scheduler.native_process()
    if native is None or scheduler.supports(native) is not None:
        raise IncompatibleError(f"sampler {scheduler.name or type(scheduler).__name__}: {reason}")
    return native


def bridge(plan: Plan, model_process: Process) -> ModelView:
    """The view of a model of ``model_process`` from ``plan`` (made on another process): the
    model's times, input scales, alpha and sigma at each step."""
    t_q = plan.t.to(torch.float64)
    aq = torch.tensor(plan.alpha, dtype=torch.float64)
    sq = torch.tensor(plan.sigma, dtype=torch.float64)
    low, high = model_process.t_range
    ends = model_process.logsnr(torch.tensor([high, low], dtype=torch.float64))
    logsnr = (2 * (aq.log() - sq.log())).clamp(float(ends[0]), float(ends[1]))
    t_p = model_process.t_for_logsnr(logsnr)
    ap, sp = model_process.alpha_sigma(t_p)
    k = (ap * ap + sp * sp).sqrt() / (aq * aq + sq * sq).sqrt()
    info = {"bridged_times": t_p.tolist(), "planned_times": t_q.tolist()}
    return ModelView(t_p, k.tolist(), ap.tolist(), sp.tolist(), info)


def model_view(
    scheduler: Scheduler, plan: Plan, model_process: Process, planned: Process
) -> ModelView | None:
    """The scheduler's own view of the model, else core's bridge when the plan was made on
    another process (``planned``), else None (the model is called at the plan's times)."""
    own = scheduler.model_view(plan, model_process)
    if own is not None:
        return own
    return None if planned is model_process else bridge(plan, model_process)


__all__ = ["ModelView", "bridge", "model_view", "planning_process"]
