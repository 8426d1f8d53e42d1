"""The solvers ComfyUI adds to k-diffusion's set, as diffplug level samplers.

All work on ``x = x0 + s*eps`` over the schedule's levels ``s_0 > ... > s_N = 0`` and call
the denoiser once per level (``s_0 .. s_{N-1}``); the stepper turns call ``j``'s x0_hat into
the x of call ``j + 1`` and keeps the history a multistep method needs, for one batch only.
The last step, to level 0, lands on the last x0_hat (every one of them does this, as
ComfyUI's do). Coefficients depend only on the levels: they are host floats, computed in
float64; an update is a few tensor ops. Noise, where a sampler adds any, is the loop's
per-sample ``z``: sample k of seed s is the same in any batch.

Formulas, from the papers and ComfyUI's ``comfy/k_diffusion/sampling.py`` and
``comfy/extra_samplers/uni_pc.py`` (which these match up to the differences each docstring
names): UniPC (Zhao et al. 2023), DEIS (Zhang & Chen 2023), iPNDM (Zhang & Chen 2023, from
PNDM, Liu et al. 2022), RES (Zhang et al. 2023), ER-SDE (Cui et al. 2023), LCM (Luo et al.
2023).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from diffplug import LevelSampler, ancestral_step, option

# -- shared -----------------------------------------------------------------------------------


def _lam(s: float) -> float:
    """lambda = -log s, the half log-SNR of ``x0 + s*eps`` (the exponential solvers' time)."""
    return -math.log(s)


def _gauss_legendre(f, a: float, b: float, n: int = 16) -> float:  # noqa: ANN001
    """The integral of a smooth ``f`` over [a, b] by n-point Gauss-Legendre quadrature."""
    nodes, weights = _GL.setdefault(n, _legendre(n))
    half, mid = (b - a) / 2, (a + b) / 2
    return half * sum(w * f(mid + half * x) for x, w in zip(nodes, weights, strict=True))


_GL: dict[int, tuple[list[float], list[float]]] = {}


def _legendre(n: int) -> tuple[list[float], list[float]]:
    """Gauss-Legendre nodes and weights (Newton on the Legendre polynomial, float64)."""
    nodes, weights = [], []
    for i in range(1, n + 1):
        x = math.cos(math.pi * (i - 0.25) / (n + 0.5))
        for _ in range(100):
            p0, p1 = 1.0, x
            for k in range(2, n + 1):
                p0, p1 = p1, ((2 * k - 1) * x * p1 - (k - 1) * p0) / k
            dp = n * (x * p1 - p0) / (x * x - 1)
            dx = p1 / dp
            x -= dx
            if abs(dx) < 1e-16:
                break
        nodes.append(x)
        weights.append(2 / ((1 - x * x) * dp * dp))
    return nodes, weights


def _lagrange(nodes: list[float], j: int, tau: float) -> float:
    """The j-th Lagrange basis polynomial on ``nodes``, at tau."""
    out = 1.0
    for k, node in enumerate(nodes):
        if k != j:
            out *= (tau - node) / (nodes[j] - node)
    return out


def _basis_integrals(levels: list[float], i: int, order: int, time=lambda s: s,  # noqa: ANN001
                     n: int = 16) -> list[float]:  # fmt: skip
    """The integral over the step levels[i] -> levels[i+1] (in the level) of each Lagrange
    basis polynomial on ``time`` of the last ``order`` levels, evaluated at ``time(s)``:
    the weights of an Adams-Bashforth step whose polynomial lives in that time."""
    nodes = [time(levels[i - k]) for k in range(order)]
    a, b = levels[i], levels[i + 1]
    return [_gauss_legendre(lambda s, j=j: _lagrange(nodes, j, time(s)), a, b, n)
            for j in range(order)]  # fmt: skip


def _solve(matrix: list[list[float]], rhs: list[float]) -> list[float]:
    """Solve a small dense system (at most 3x3) in float64."""
    a = torch.tensor(matrix, dtype=torch.float64)
    return torch.linalg.solve(a, torch.tensor(rhs, dtype=torch.float64)).tolist()


class _OneCallPerLevel(LevelSampler):
    """A sampler that calls the denoiser once at every level but the last (0)."""

    evaluations_per_step = 1
    default_steps = 20

    def evaluations(self, levels: list[float]) -> list[float]:
        return list(levels[:-1])


# -- UniPC ------------------------------------------------------------------------------------
@dataclass
class UniPCConfig:
    variant: str = option("bh1", "B(h) of the update: bh1 (h) or bh2 (e^h - 1)",
                          choices=("bh1", "bh2"))  # fmt: skip
    order: int = option(3, "order of the predictor (the corrector adds one)", choices=(1, 2, 3))


@dataclass(frozen=True)
class UniPCStep:
    """One step's coefficients: predictor weights, corrector weights and B(h)."""

    order: int
    ratio: float  # s_next / s
    phi1: float  # expm1(-h): the first-order (DPM-Solver++ 1) weight of x0_hat
    B: float
    rks: list[float]  # (lambda_{j-k} - lambda_j)/h for the k earlier x0_hats
    rhos_p: list[float]
    rhos_c: list[float]

    @classmethod
    def of(cls, lams: list[float], levels: list[float], j: int, order: int, variant: str
           ) -> UniPCStep:  # fmt: skip
        """The step from level j to j + 1 using ``order`` x0_hats (the current and order - 1
        earlier): UniPC's data-prediction update (Zhao et al. 2023, Alg. 1/2, B(h) bh1/bh2)."""
        h = lams[j + 1] - lams[j]
        hh = -h  # data prediction
        rks = [(lams[j - k] - lams[j]) / h for k in range(1, order)]
        phi1 = math.expm1(hh)
        B = hh if variant == "bh1" else phi1
        rows, b = [], []
        h_phi_k, factorial = phi1 / hh - 1, 1
        for i in range(1, order + 1):
            rows.append([r ** (i - 1) for r in [*rks, 1.0]])
            b.append(h_phi_k * factorial / B)
            factorial *= i + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        if order == 1:
            rhos_p, rhos_c = [], [0.5]
        else:
            rhos_p = [0.5] if order == 2 else _solve([r[:-1] for r in rows[:-1]], b[:-1])
            rhos_c = _solve(rows, b)
        return cls(order, levels[j + 1] / levels[j], phi1, B, rks, rhos_p, rhos_c)


@dataclass
class _UniPCStepper:
    levels: list[float]
    order: int
    variant: str
    x0s: list[torch.Tensor] = field(default_factory=list)  # the x0_hat of every call so far
    pending: tuple | None = None  # (step, x_first_order, differences) awaiting the corrector

    def update(self, j: int, x: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor,
               z: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
        levels, n = self.levels, len(self.levels) - 1
        if self.pending is not None:  # UniC: correct the step into level j with this call's x0_hat
            step, x_first, diffs = self.pending
            correction = (x0 - self.x0s[-1]) * step.rhos_c[-1]
            for rho, d in zip(step.rhos_c[:-1], diffs, strict=True):
                correction = correction + d * rho
            x = x_first - correction * step.B
        self.x0s.append(x0)  # kept at the predicted point, as UniPC does
        if levels[j + 1] == 0:
            return x0
        # UniP: the step to level j + 1, lower order at the start and on the last two steps
        order = min(j + 1, self.order, n - j)
        lams = [_lam(s) for s in levels[: j + 2]]
        step = UniPCStep.of(lams, levels, j, order, self.variant)
        diffs = [(self.x0s[-1 - k] - x0) / r for k, r in enumerate(step.rks, start=1)]
        x_first = x * step.ratio - x0 * step.phi1
        prediction = x_first
        for rho, d in zip(step.rhos_p, diffs, strict=True):
            prediction = prediction - d * (rho * step.B)
        self.pending = (step, x_first, diffs)
        if len(self.x0s) > self.order:
            self.x0s.pop(0)
        return prediction


class UniPC(_OneCallPerLevel):
    """UniPC (Zhao et al. 2023): a multistep predictor (UniP) and a corrector (UniC) that
    reuses the next call's x0_hat, so one call per step; data prediction, ComfyUI's
    settings (order 3, lower order on the first and final steps, no corrector on the last).

    ComfyUI ends at level 0.001 instead of 0 and steps there; here the last step lands on
    the last x0_hat, which is the limit of that step as the level goes to 0."""

    Config = UniPCConfig
    order = 4.0  # the corrector raises the predictor's order (3 by default) by one

    def stepper(self, levels: list[float]) -> _UniPCStepper:
        return _UniPCStepper(list(levels), self.config.order, self.config.variant)


# -- DEIS -------------------------------------------------------------------------------------
#: the VP time of ComfyUI's DEIS (zju-pi's ``edm2t``): a VP-SDE fitted to sigma in [0.002, 80]
_EPS_S, _S_MIN, _S_MAX = 1e-3, 0.002, 80.0
_BETA_D = 2 * (math.log(_S_MIN**2 + 1) / _EPS_S - math.log(_S_MAX**2 + 1)) / (_EPS_S - 1)
_BETA_MIN = math.log(_S_MAX**2 + 1) - 0.5 * _BETA_D


def vp_time(s: float) -> float:
    """The VP-SDE time t of level s: log(1 + s^2) = beta_d t^2 / 2 + beta_min t."""
    return (math.sqrt(_BETA_MIN**2 + 2 * _BETA_D * math.log1p(s * s)) - _BETA_MIN) / _BETA_D


def deis_coefficients(levels: list[float], i: int, order: int) -> list[float]:
    """The weights of eps_i, eps_{i-1}, ... in the step from levels[i] to levels[i+1]: the
    integral over that step of ds times each one's Lagrange basis polynomial in the VP time
    (DEIS's tAB). Integrated over s, where the integrand is smooth (in t, ds/dt is
    singular at t = 0), by 16-point Gauss-Legendre; ComfyUI sums 10 000 points in t."""
    return _basis_integrals(levels, i, order, time=vp_time)


@dataclass
class DEISConfig:
    order: int = option(3, "number of past slopes the step uses", choices=(1, 2, 3, 4))


@dataclass
class _DEISStepper:
    levels: list[float]
    order: int
    slopes: list[torch.Tensor] = field(default_factory=list)  # eps_hat, newest last

    def update(self, j: int, x: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor,
               z: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
        s, s_next = self.levels[j], self.levels[j + 1]
        self.slopes = [*self.slopes, (x - x0) / s][-self.order :]
        if s_next == 0:
            return x0
        coefs = deis_coefficients(self.levels, j, len(self.slopes))
        for coef, d in zip(coefs, reversed(self.slopes), strict=True):
            x = x + d * coef
        return x


class DEIS(_OneCallPerLevel):
    """DEIS (Zhang & Chen 2023), tAB: Adams-Bashforth on eps_hat in the VP time, integrated
    exactly over the level. ComfyUI's ``deis`` (mode tab, order 3)."""

    Config = DEISConfig
    order = 3.0

    def stepper(self, levels: list[float]) -> _DEISStepper:
        return _DEISStepper(list(levels), self.config.order)


# -- iPNDM ------------------------------------------------------------------------------------
#: Adams-Bashforth's weights for equal steps, newest slope first (PNDM's pseudo-linear steps)
ADAMS_BASHFORTH = [[1.0], [3 / 2, -1 / 2], [23 / 12, -16 / 12, 5 / 12],
                   [55 / 24, -59 / 24, 37 / 24, -9 / 24]]  # fmt: skip


def variable_ab_weights(levels: list[float], i: int, order: int) -> list[float]:
    """iPNDM-v's weights of d_i, d_{i-1}, ...: Adams-Bashforth for the actual step sizes, the
    integral over [levels[i], levels[i+1]] of each Lagrange basis polynomial on the earlier
    levels, per unit step (exact: 4-point Gauss-Legendre, degree <= 3). On equal steps these
    are ADAMS_BASHFORTH. ComfyUI's ``ipndm_v`` closed forms agree at order 2 only: at order 3
    they are exact on equal steps alone, and at order 4 they give (57, -65, 43, -11)/24 even
    there (a third-difference weight of 11/24 instead of 3/8)."""
    step = levels[i + 1] - levels[i]
    return [w / step for w in _basis_integrals(levels, i, order, n=4)]


@dataclass
class IPNDMConfig:
    max_order: int = option(4, "number of past slopes the step uses", choices=(1, 2, 3, 4))


@dataclass
class _IPNDMStepper:
    levels: list[float]
    max_order: int
    variable: bool
    slopes: list[torch.Tensor] = field(default_factory=list)  # newest last

    def update(self, j: int, x: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor,
               z: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
        s, s_next = self.levels[j], self.levels[j + 1]
        self.slopes = [*self.slopes, (x - x0) / s][-self.max_order :]
        if s_next == 0:
            return x0
        order = len(self.slopes)
        if self.variable:
            weights = variable_ab_weights(self.levels, j, order)
        else:
            weights = ADAMS_BASHFORTH[order - 1]
        slope = self.slopes[-1] * weights[0]
        for w, d in zip(weights[1:], reversed(self.slopes[:-1]), strict=True):
            slope = slope + d * w
        return x + slope * (s_next - s)


class IPNDM(_OneCallPerLevel):
    """Improved PNDM (Zhang & Chen 2023): Adams-Bashforth on the slope (x - x0_hat)/s with
    the weights of equal steps, lower order at the start (ComfyUI's ``ipndm``). On a schedule
    whose steps change size (karras) those weights are second order only."""

    Config = IPNDMConfig
    order = 2.0

    def stepper(self, levels: list[float]) -> _IPNDMStepper:
        return _IPNDMStepper(list(levels), self.config.max_order, variable=False)


class IPNDMv(IPNDM):
    """iPNDM with the Adams-Bashforth weights of the actual, unequal steps (ComfyUI's
    ``ipndm_v``): fourth order on any schedule."""

    order = 4.0

    def stepper(self, levels: list[float]) -> _IPNDMStepper:
        return _IPNDMStepper(list(levels), self.config.max_order, variable=True)


# -- RES multistep ----------------------------------------------------------------------------
@dataclass
class ResConfig:
    eta: float = option(0.0, "noise per step (0: the ODE solver; 1: ancestral)", min=0.0)
    s_noise: float = option(1.0, "scale of the added noise", min=0.0)


@dataclass
class _ResStepper:
    levels: list[float]
    eta: float
    s_noise: float
    prev: torch.Tensor | None = None  # the previous call's x0_hat
    prev_down: float = 0.0  # where the previous step's deterministic part landed

    def update(self, j: int, x: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor,
               z: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
        s, s_next = self.levels[j], self.levels[j + 1]
        down, up = ancestral_step(s, s_next, self.eta)
        prev, self.prev = self.prev, x0
        prev_down, self.prev_down = self.prev_down, down
        if down == 0:
            return x0
        h = _lam(down) - _lam(s)
        phi1 = -math.expm1(-h) / h  # phi_1(-h)
        if prev is None:  # first order: DPM-Solver++(1)
            x = x * (down / s) + x0 * (h * phi1)
        else:  # the exponential integral of x0_hat's line, its slope over the last step
            phi2 = (1 - phi1) / h  # phi_2(-h)
            c2 = (_lam(self.levels[j - 1]) - _lam(prev_down)) / h
            x = x * (down / s) + x0 * (h * (phi1 - phi2 / c2)) + prev * (h * phi2 / c2)
        return x if z is None else x + z * (self.s_noise * up)


class ResMultistep(_OneCallPerLevel):
    """RES (Zhang et al. 2023) second-order multistep exponential integrator in data
    prediction (ComfyUI's ``res_multistep``); eta > 0 adds ancestral noise.

    The line's slope is taken over the previous step's deterministic part (from its level
    to its sigma_down), as ComfyUI does: with eta > 0 that is longer than the distance
    between the two calls, which damps the extrapolation (the plugin's README has the
    measurement)."""

    Config = ResConfig
    order = 2.0

    def noise(self, levels: list[float]) -> list[bool]:
        return [self.config.eta > 0 and n > 0 for n in levels[1:]]

    def stepper(self, levels: list[float]) -> _ResStepper:
        return _ResStepper(list(levels), self.config.eta, self.config.s_noise)


@dataclass
class ResAncestralConfig(ResConfig):
    eta: float = option(1.0, "noise per step (0: the ODE solver; 1: ancestral)", min=0.0)


class ResMultistepAncestral(ResMultistep):
    """``res-multistep`` with ancestral noise (eta = 1; ComfyUI's ``res_multistep_ancestral``)."""

    Config = ResAncestralConfig
    stochastic = True


# -- ER-SDE -----------------------------------------------------------------------------------
def er_noise_scaler(s: float) -> float:
    """ER-SDE's default noise function phi(s) = s (e^{s^0.3} + 10) (Cui et al. 2023)."""
    return s * (math.exp(s**0.3) + 10.0)


@dataclass(frozen=True)
class ERStep:
    """One ER-SDE step's weights from level s to t (all three stages, and the noise)."""

    r: float  # phi(t)/phi(s)
    first: float  # weight of d x0_hat/ds (stage 2)
    second: float  # weight of d^2 x0_hat/ds^2 (stage 3)
    noise: float

    @classmethod
    def of(cls, s: float, t: float) -> ERStep:
        """The integrals over [t, s] of 1/phi and (u - s)/phi, taken in log u, where their
        integrands are smooth (ComfyUI sums 200 points in u)."""
        r = er_noise_scaler(t) / er_noise_scaler(s)
        ratio = lambda u: u / er_noise_scaler(u)  # noqa: E731  (du/phi(u) = ratio dlog u)
        lo, hi = math.log(t), math.log(s)
        inv = _gauss_legendre(lambda v: ratio(math.exp(v)), lo, hi)
        moment = _gauss_legendre(lambda v: (math.exp(v) - s) * ratio(math.exp(v)), lo, hi)
        phi_t, dt = er_noise_scaler(t), t - s
        noise = math.sqrt(max(t * t - s * s * r * r, 0.0))
        return cls(r, dt + inv * phi_t, dt * dt / 2 + moment * phi_t, noise)


@dataclass
class ERConfig:
    s_noise: float = option(1.0, "scale of the added noise", min=0.0)
    max_stage: int = option(3, "stages (order of the x0_hat expansion)", choices=(1, 2, 3))


@dataclass
class _ERStepper:
    levels: list[float]
    s_noise: float
    max_stage: int
    prev: torch.Tensor | None = None  # the previous x0_hat
    prev_slope: torch.Tensor | None = None  # the previous first difference of x0_hat

    def update(self, j: int, x: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor,
               z: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
        levels, s, t = self.levels, self.levels[j], self.levels[j + 1]
        stages = min(self.max_stage, j + 1)
        prev, self.prev = self.prev, x0
        if t == 0:
            return x0
        step = ERStep.of(s, t)
        x = x * step.r + x0 * (1 - step.r)  # stage 1
        if stages >= 2:
            assert prev is not None
            slope = (x0 - prev) / (s - levels[j - 1])
            x = x + slope * step.first
            if stages >= 3:
                assert self.prev_slope is not None
                curvature = (slope - self.prev_slope) / ((s - levels[j - 2]) / 2)
                x = x + curvature * step.second
            self.prev_slope = slope
        return x if z is None else x + z * (self.s_noise * step.noise)


class ERSDE(_OneCallPerLevel):
    """The extended reverse-time SDE solver (Cui et al. 2023; ComfyUI's ``er_sde``): an
    exact solution of the SDE's linear part with its default noise function and a Taylor
    expansion of x0_hat in the level, up to three stages."""

    Config = ERConfig
    order = 1.0  # a stochastic sampler; its accuracy shows in the sample's moments
    stochastic = True

    def noise(self, levels: list[float]) -> list[bool]:
        return [self.config.s_noise > 0 and n > 0 for n in levels[1:]]

    def stepper(self, levels: list[float]) -> _ERStepper:
        return _ERStepper(list(levels), self.config.s_noise, self.config.max_stage)


# -- LCM --------------------------------------------------------------------------------------
@dataclass
class _LCMStepper:
    levels: list[float]

    def update(self, j: int, x: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor,
               z: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
        s_next = self.levels[j + 1]
        return x0 if z is None or s_next == 0 else x0 + z * s_next


class LCM(_OneCallPerLevel):
    """Latent-consistency sampling (Luo et al. 2023; ComfyUI's ``lcm``): take the model's
    x0_hat, then noise it afresh to the next level. Made for consistency-distilled models,
    which predict a sample rather than a mean in one call (4-8 steps); on an ordinary model
    its samples are blurred toward the mean at every step but the last."""

    order = 1.0
    stochastic = True
    default_steps = 8

    def noise(self, levels: list[float]) -> list[bool]:
        return [n > 0 for n in levels[1:]]

    def stepper(self, levels: list[float]) -> _LCMStepper:
        return _LCMStepper(list(levels))
