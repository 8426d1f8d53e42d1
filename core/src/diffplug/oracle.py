"""An exact denoiser: the closed-form E[x0 | x_t] of an isotropic Gaussian mixture.

For data p0 = sum_k pi_k N(mu_k, v_k I) and x_t = alpha*x0 + sigma*eps:
C_k = alpha^2 v_k + sigma^2, r_k(x_t) ~ pi_k N(x_t; alpha mu_k, C_k I) and
E[x0 | x_t, k] = (sigma^2 mu_k + alpha v_k x_t) / C_k, so E[x0 | x_t] = sum_k r_k E[x0 | x_t, k].
It works on any registered process, which makes it the reference every sampler is tested
against, and with class-mean digits as its means it is a tiny "model" core ships.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from diffplug.components import Cond, Denoiser, DenoiserConfig
from diffplug.options import option


@dataclass
class GaussianMixtureConfig(DenoiserConfig):
    prediction: str = option("x0", "the oracle predicts x0", choices=("x0",))
    components: int = option(8, "number of mixture components", min=1)


class GaussianMixtureDenoiser(Denoiser):
    """Bayes-optimal denoiser of a Gaussian mixture (means, variances, weights as buffers)."""

    Config = GaussianMixtureConfig
    batch_invariant = True  # per-sample float64 formulas: no batch-dependent kernels

    def __init__(self, config: GaussianMixtureConfig | None = None) -> None:
        super().__init__(config)
        k, dim = self.config.components, self.config.channels * self.config.size**2
        self.register_buffer("means", torch.zeros(k, dim, dtype=torch.float64))
        self.register_buffer("variances", torch.full((k,), 0.02, dtype=torch.float64))
        self.register_buffer("weights", torch.full((k,), 1.0 / k, dtype=torch.float64))

    @classmethod
    def from_mixture(
        cls,
        means: torch.Tensor,
        variances: torch.Tensor,
        weights: torch.Tensor | None = None,
        *,
        process: dict | None = None,
        channels: int = 1,
    ) -> GaussianMixtureDenoiser:
        k, dim = means.shape
        size = math.isqrt(dim // channels)
        if channels * size * size != dim:
            raise ValueError(f"means of dimension {dim} are not {channels} square channels")
        model = cls(
            GaussianMixtureConfig(
                channels=channels, size=size, components=k, process=process or {"name": "vp"}
            )
        )
        model.means.copy_(means)
        model.variances.copy_(torch.as_tensor(variances, dtype=torch.float64).expand(k))
        model.weights.copy_(weights if weights is not None else torch.full((k,), 1.0 / k))
        return model

    def posterior_mean(
        self, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor
    ) -> torch.Tensor:
        """E[x0 | x_t] in float64 for flattened x (B, D) and per-sample alpha, sigma (B,)."""
        a, s2 = alpha[:, None], (sigma**2)[:, None]
        var = self.variances[None, :]
        c = a * a * var + s2  # (B, K)
        dist2 = ((x[:, None, :] - a[:, :, None] * self.means[None]) ** 2).sum(-1)
        dim = x.shape[1]
        logits = self.weights.log()[None] - 0.5 * dim * c.log() - 0.5 * dist2 / c
        r = torch.softmax(logits, dim=1)  # (B, K)
        m = s2[:, :, None] * self.means[None] + (a * var)[:, :, None] * x[:, None, :]
        m = m / c[:, :, None]
        return (r[:, :, None] * m).sum(1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Cond = None) -> torch.Tensor:
        alpha, sigma = self.process.alpha_sigma(t.to(torch.float64).cpu())
        flat = x.reshape(x.shape[0], -1).to(torch.float64)
        x0 = self.posterior_mean(flat, alpha.to(x.device), sigma.to(x.device))
        return x0.reshape(x.shape).to(x.dtype)

    def sample_data(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Exact draws from the mixture, (n, C, H, W) float64."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.means.shape[1], generator=generator, dtype=torch.float64)
        x = self.means[k] + self.variances[k, None].sqrt() * noise
        return x.reshape(n, *self.sample_shape)

    def data_mean(self) -> torch.Tensor:
        return (self.weights[:, None] * self.means).sum(0)

    def data_covariance(self) -> torch.Tensor:
        mu = self.data_mean()
        dim = self.means.shape[1]
        cov = torch.zeros(dim, dim, dtype=torch.float64)
        for w, m, v in zip(self.weights, self.means, self.variances, strict=True):
            cov += w * (v * torch.eye(dim, dtype=torch.float64) + torch.outer(m - mu, m - mu))
        return cov


def circle_mixture(
    k: int = 8, radius: float = 1.0, variance: float = 0.02, process: dict | None = None
) -> GaussianMixtureDenoiser:
    """k Gaussians on a circle in 4-D (a 1x2x2 'image'), the classic sampler test bed."""
    angles = torch.arange(k, dtype=torch.float64) * (2 * math.pi / k)
    means = torch.stack(
        [radius * angles.cos(), radius * angles.sin(), 0.5 * angles.cos(), -0.5 * angles.sin()],
        dim=1,
    )
    return GaussianMixtureDenoiser.from_mixture(means, torch.tensor(variance), process=process)
