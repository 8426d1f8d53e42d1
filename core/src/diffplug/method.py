"""Training methods: which process a denoiser learns and the loss it learns it with.

A method may train another component kind instead (``trains``): the ``vae`` method trains an
autoencoder, with no process, through the same loop.

The loss of every Gaussian process is the same regression: draw t and eps, form
x_t = alpha(t)*x0 + sigma(t)*eps, and regress the denoiser's output onto the target its
prediction kind names (``diffplug.prediction.targets``). A method plugin chooses the process,
how t is drawn and how the terms are weighted.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from diffplug.components import Cond, Denoiser
from diffplug.options import NoOptions, build_config
from diffplug.prediction import as_tuple, targets


class Method(ABC):
    """A training objective for ``diffplug train --method``."""

    Config: ClassVar[type] = NoOptions
    #: the component kind this method trains ("denoiser", or "autoencoder"): ``diffplug
    #: train`` builds the model from that registry kind and the checkpoint records it.
    trains: ClassVar[str] = "denoiser"
    #: the registered model (of kind ``trains``) a fresh run uses unless ``--denoiser`` says
    #: otherwise; None (core knows no plugin's models): ``--denoiser`` is then required.
    default_denoiser: ClassVar[str | None] = None

    def __init__(self, config: Any = None) -> None:
        self.config = config if config is not None else self.Config()

    @classmethod
    def from_options(cls, **options: Any) -> Method:
        return cls(build_config(cls.Config, options, owner=f"method {cls.__name__}"))

    @abstractmethod
    def process_spec(self) -> dict[str, Any]:
        """The process a new denoiser is trained on (stored in its config)."""

    def denoiser_defaults(self) -> dict[str, Any]:
        """Denoiser options this method implies (process, prediction...)."""
        return {"process": self.process_spec()}

    @abstractmethod
    def sample_times(self, denoiser: Denoiser, n: int, generator: torch.Generator) -> torch.Tensor:
        """Training times (n,), float, on the CPU."""

    def weights(self, t: torch.Tensor, denoiser: Denoiser) -> tuple[torch.Tensor, ...] | None:
        """Per-sample weight of each output term (None: unweighted MSE)."""
        return None

    def loss(
        self, denoiser: Denoiser, x0: torch.Tensor, cond: Cond, generator: torch.Generator
    ) -> torch.Tensor:
        t = self.sample_times(denoiser, x0.shape[0], generator)
        eps = torch.randn(x0.shape, generator=generator).to(x0.device)
        return gaussian_loss(denoiser, x0, t.to(x0.device), eps, cond, self.weights(t, denoiser))


def gaussian_loss(
    denoiser: Denoiser,
    x0: torch.Tensor,
    t: torch.Tensor,
    eps: torch.Tensor,
    cond: Cond = None,
    weights: tuple[torch.Tensor, ...] | None = None,
) -> torch.Tensor:
    """Mean over the batch of sum_j w_j * mean((out_j - target_j)^2)."""
    alpha, sigma = denoiser.process.alpha_sigma(t.detach().cpu())
    shape = (-1,) + (1,) * (x0.dim() - 1)
    alpha = alpha.to(x0.device, x0.dtype).view(shape)
    sigma = sigma.to(x0.device, x0.dtype).view(shape)
    x_t = alpha * x0 + sigma * eps
    outs = as_tuple(denoiser(x_t, t, cond))
    wanted = targets(denoiser.prediction, x0, eps, alpha, sigma)
    total = x0.new_zeros(())
    for j, (out, target) in enumerate(zip(outs, wanted, strict=True)):
        per_sample = (out.float() - target.float()).pow(2).flatten(1).mean(1)
        if weights is not None:
            per_sample = per_sample * weights[j].to(per_sample.device)
        total = total + per_sample.mean()
    return total
