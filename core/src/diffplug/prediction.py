"""What a denoiser predicts, and the linear maps from that prediction to (x0_hat, eps_hat).

Every kind is linear in (x_t, prediction) for fixed alpha, sigma, so the sampling loop folds
these maps into one set of per-step coefficients computed once per run. With
x_t = alpha*x0 + sigma*eps:

- ``eps``:   x0 = (x - sigma*eps)/alpha
- ``x0``:    eps = (x - alpha*x0)/sigma
- ``v``:     v = alpha*eps - sigma*x0, so x0 = (alpha*x - sigma*v)/n, eps = (sigma*x + alpha*v)/n,
             n = alpha^2 + sigma^2 (n = 1 for VP)
- ``c_eps``: the decoupled pair (c, eps) of x_t = x0 + c*(1 - alpha) + sigma*eps with c = -x0
             (ADM, alpha = 1 - t): x0 = x - (1 - alpha)*c - sigma*eps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from diffplug.errors import UserError


@dataclass(frozen=True)
class Linear:
    """x0 = x0_x*x + sum_j x0_p[j]*pred[j];  eps = eps_x*x + sum_j eps_p[j]*pred[j]."""

    x0_x: float
    x0_p: tuple[float, ...]
    eps_x: float
    eps_p: tuple[float, ...]


def _eps(alpha: float, sigma: float) -> Linear:
    return Linear(1 / alpha, (-sigma / alpha,), 0.0, (1.0,))


def _x0(alpha: float, sigma: float) -> Linear:
    return Linear(0.0, (1.0,), 1 / sigma, (-alpha / sigma,))


def _v(alpha: float, sigma: float) -> Linear:
    n = alpha * alpha + sigma * sigma
    return Linear(alpha / n, (-sigma / n,), sigma / n, (alpha / n,))


def _c_eps(alpha: float, sigma: float) -> Linear:
    return Linear(1.0, (-(1 - alpha), -sigma), 0.0, (0.0, 1.0))


KINDS = {"eps": _eps, "x0": _x0, "v": _v, "c_eps": _c_eps}
#: how many tensors each kind returns.
ARITY = {"eps": 1, "x0": 1, "v": 1, "c_eps": 2}


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise UserError(f"unknown prediction kind {kind!r}; known: {', '.join(KINDS)}")
    return kind


def linear(kind: str, alpha: float, sigma: float) -> Linear:
    """The conversion of ``kind`` at one (alpha, sigma), in float64."""
    return KINDS[check_kind(kind)](float(alpha), float(sigma))


def targets(kind: str, x0: Any, eps: Any, alpha: Any, sigma: Any) -> tuple[Any, ...]:
    """What a denoiser of ``kind`` should output for these (x0, eps): the training target."""
    if kind == "eps":
        return (eps,)
    if kind == "x0":
        return (x0,)
    if kind == "v":
        return (alpha * eps - sigma * x0,)
    if kind == "c_eps":
        return (-x0, eps)
    raise UserError(f"unknown prediction kind {kind!r}; known: {', '.join(KINDS)}")


def as_tuple(pred: Any) -> tuple[Any, ...]:
    return tuple(pred) if isinstance(pred, tuple | list) else (pred,)
