"""Any sampler on any denoiser: re-express a denoiser trained on one process for another.

Every process here is Gaussian, x_t = alpha(t)*x0 + sigma(t)*eps, so a point of process Q at
time s is a point of process P at the time t with the same signal-to-noise ratio, scaled:
x_P = k*x_Q with k = alpha_P/alpha_Q = sigma_P/sigma_Q. The bridge finds t (P's log-SNR
inverted, fractional times included: a discrete VP model is evaluated at interpolated,
continuous times), scales x, calls the model, turns its prediction into (x0_hat, eps_hat),
which both processes share, and answers in Q's terms as v = alpha_Q*eps - sigma_Q*x0, a
prediction that stays well-conditioned at both ends (alpha_Q = 0 or sigma_Q = 0). Outside
P's log-SNR range (ADM's t = 1 is pure noise; a VP model's noisiest step is not) the time
is clamped and k is the ratio of the norms sqrt(alpha^2 + sigma^2), exact when SNRs match.
"""

from __future__ import annotations

import torch

from diffplug.components import Cond, Denoiser, DenoiserConfig, Scheduler
from diffplug.prediction import as_tuple
from diffplug.process import Process


def x0_eps(
    kind: str, x: torch.Tensor, preds: tuple, alpha: torch.Tensor, sigma: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0_hat, eps_hat) from a prediction with per-sample alpha, sigma (broadcastable)."""
    if kind == "eps":
        (eps,) = preds
        return (x - sigma * eps) / alpha, eps
    if kind == "x0":
        (x0,) = preds
        return x0, (x - alpha * x0) / sigma
    if kind == "v":
        (v,) = preds
        n = alpha * alpha + sigma * sigma
        return (alpha * x - sigma * v) / n, (sigma * x + alpha * v) / n
    if kind == "c_eps":
        c, eps = preds
        return x - (1 - alpha) * c - sigma * eps, eps
    raise ValueError(f"unknown prediction kind {kind!r}")


class ProcessBridge(Denoiser):
    """``inner`` (trained on its own process) seen as a v-predicting denoiser of ``target``."""

    def __init__(self, inner: Denoiser, target: Process) -> None:
        config = DenoiserConfig(
            channels=inner.config.channels,
            size=inner.config.size,
            prediction="v",
            process=target.spec(),
            conditioning=inner.conditioning,
        )
        super().__init__(config)
        self.inner = inner
        self.target = target
        source = inner.process
        low, high = source.t_range
        ends = source.logsnr(torch.tensor([high, low], dtype=torch.float64))
        self.logsnr_range = (float(ends[0]), float(ends[1]))

    def source_time(self, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(inner time, scale k, alpha_Q, sigma_Q, alpha_P, sigma_P) for target times t."""
        t64 = t.detach().to("cpu", torch.float64)
        aq, sq = self.target.alpha_sigma(t64)
        logsnr = self.target.logsnr(t64).clamp(*self.logsnr_range)
        tp = self.inner.process.t_for_logsnr(logsnr)
        ap, sp = self.inner.process.alpha_sigma(tp)
        k = (ap * ap + sp * sp).sqrt() / (aq * aq + sq * sq).sqrt()
        return tp, k, aq, sq, ap, sp

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Cond = None) -> torch.Tensor:
        tp, k, aq, sq, ap, sp = self.source_time(t)
        shape = (-1,) + (1,) * (x.dim() - 1)

        def dev(v: torch.Tensor) -> torch.Tensor:
            return v.to(device=x.device, dtype=x.dtype).view(shape)

        x_p = x * dev(k)
        preds = as_tuple(self.inner(x_p, tp.to(device=x.device, dtype=t.dtype), cond))
        x0, eps = x0_eps(self.inner.prediction, x_p, preds, dev(ap), dev(sp))
        return dev(aq) * eps - dev(sq) * x0


def bridge(denoiser: Denoiser, scheduler: Scheduler) -> Denoiser:
    """``denoiser`` itself if the sampler runs its process, else a bridge to the sampler's own
    process (when the sampler names one); the caller's compatibility check decides the rest."""
    if scheduler.supports(denoiser.process) is None:
        return denoiser
    native = scheduler.native_process()
    if native is None or scheduler.supports(native) is not None:
        return denoiser
    return ProcessBridge(denoiser, native)


__all__ = ["ProcessBridge", "bridge", "x0_eps"]
