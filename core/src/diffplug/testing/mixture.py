"""Statistical checks of samples against a Gaussian-mixture oracle, for sampler tests.

``assert_matches_mixture(x, model)`` passes when the samples' mean, covariance, mode weights
and within-mode spread are each within ``Z`` standard errors of the mixture's; a sampler
plugin's tests can call it with ``diffplug.oracle.circle_mixture(process=...)`` as the model.
``mean_distance`` compares trajectories (e.g. N steps against a 1000-step reference).
"""

from __future__ import annotations

from typing import Any

import torch

from diffplug.oracle import GaussianMixtureDenoiser

F64 = torch.float64


def mean_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over samples of the per-sample L2 distance."""
    return (a - b).flatten(1).norm(dim=1).mean().item()


#: every statistic must be within Z standard errors; with the 23 statistics below (4 means,
#: 10 covariances, 8 mode weights, 1 spread) a correct sampler exceeds 4.5 somewhere with
#: probability ~2e-4 (and the runs are seeded).
Z = 4.5


def statistics(x: torch.Tensor, model: GaussianMixtureDenoiser) -> dict[str, torch.Tensor]:
    """Per-sample statistics (n, k) whose means are the moments tested."""
    y = x.flatten(1).to(F64) - model.data_mean()
    i, j = torch.triu_indices(y.shape[1], y.shape[1])
    d2 = ((x.flatten(1).to(F64)[:, None, :] - model.means[None]) ** 2).sum(-1)
    nearest = d2.argmin(1)
    return {
        "mean": y,  # E = 0 (y is centred at data_mean())
        "covariance": y[:, i] * y[:, j],  # E = data_covariance()[i, j]
        # mode weights: nearest component mean, one-hot
        "modes": torch.nn.functional.one_hot(nearest, model.means.shape[0]).to(F64),
        # within-mode spread: squared distance to the nearest mean (~ dim * variance)
        "spread": d2.gather(1, nearest[:, None]),
    }


_EXACT: dict[int, tuple[GaussianMixtureDenoiser, torch.Tensor]] = {}


def exact_draws(model: GaussianMixtureDenoiser) -> torch.Tensor:
    """2^18 exact draws of the mixture (seeded, cached per model, which the cache keeps alive)."""
    if id(model) not in _EXACT:
        draws = model.sample_data(1 << 18, torch.Generator().manual_seed(12345))
        _EXACT[id(model)] = (model, draws)
    return _EXACT[id(model)][1]


def z_scores(x: torch.Tensor, model: GaussianMixtureDenoiser) -> dict[str, torch.Tensor]:
    """(sample mean - exact mean) / standard error, per statistic.

    Expectations: mean and covariance from data_mean() / data_covariance() exactly, modes
    and spread from 2^18 exact draws of the mixture. Standard errors: sqrt(var/n) with the
    per-sample variance of each statistic under the true distribution, estimated from the
    exact draws (plus the exact draws' own error for the two estimated expectations).
    """
    n = x.shape[0]
    ref = statistics(exact_draws(model), model)
    got = statistics(x, model)
    dim = model.means.shape[1]
    i, j = torch.triu_indices(dim, dim)
    expected = {
        "mean": torch.zeros(dim, dtype=F64),
        "covariance": model.data_covariance()[i, j],
        "modes": ref["modes"].mean(0),
        "spread": ref["spread"].mean(0),
    }
    out = {}
    for key, values in got.items():
        var = ref[key].var(0)
        se2 = var / n + (var / ref[key].shape[0] if key in ("modes", "spread") else 0.0)
        out[key] = (values.mean(0) - expected[key]) / se2.sqrt()
    return out


def assert_matches_mixture(
    x: torch.Tensor,
    model: GaussianMixtureDenoiser,
    keys: tuple[str, ...] = ("mean", "covariance", "modes", "spread"),
) -> None:
    """Each statistic in ``keys`` within Z standard errors of the mixture's exact value."""
    z = z_scores(x, model)
    for key in keys:
        worst = z[key].abs().max().item()
        assert worst <= Z, f"the samples' {key} is {worst:.1f} standard errors off (bound {Z})"


def mixture_for(scheduler: Any) -> GaussianMixtureDenoiser:
    """The circle mixture on the first installed process ``scheduler`` supports (VP first,
    then every other registered process at its defaults), so one test runs every sampler."""
    from diffplug.oracle import circle_mixture
    from diffplug.registry import default_registry

    names = default_registry().names("process")
    for name in sorted(names, key=lambda n: n != "vp"):
        oracle = circle_mixture(process={"name": name})
        if scheduler.supports(oracle.process) is None:
            return oracle
    raise LookupError(f"{type(scheduler).__name__} supports none of the processes {names}")
