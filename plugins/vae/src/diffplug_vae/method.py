"""The ``vae`` training method: reconstruction + kl_weight * KL, optionally + a perceptual term.

Per batch of images x (B, C, H, W) in [-1, 1]::

    mean, logvar = encoder(x);  z = mean + exp(logvar / 2) * noise   (noise from the generator)
    loss = mean_b rec(decoder(z), x) + kl_weight * mean_b KL_b + perceptual_weight * mean_b P_b

``rec`` is the per-pixel mean of the squared (``mse``) or absolute (``l1``) error, and
``KL_b = 1/2 sum(mean^2 + exp(logvar) - 1 - logvar)`` over sample b's latent elements: its
information about x in nats. ``kl_weight`` is therefore the price of one nat in units of
per-pixel MSE: the VAE keeps a nat while it lowers the per-pixel MSE by more than that. Why
1e-4 (an estimate, from Gaussian rate-distortion, dD/dR = -2D/n for n independent values):
the digits hold n = 64 real pixels, so the optimum sits near MSE = 1e-4 * 64 / 2 = 3e-3, an
RMS error of about half a grey level (levels are 0.125 apart in [-1, 1]): sharp digits. Ten
times more blurs them (about 1.4 levels); much less lets the KL stop constraining the
latents, whose scale then drifts (SD's VAE, at ~1e-12 per pixel, needed scaling_factor
0.18215 afterwards). At 1e-4 the KL still pulls the posterior towards N(0, I), which keeps
the latents near unit scale for the diffusion model that follows.

The perceptual term (off by default) is the mean squared distance between the digits
classifier's features (``diffplug.evaluate``; frozen, shipped with core, no download) of the
reconstruction and of the image, both brought to 8x8 grey as ``diffplug.evaluate.to_digits``
does but differentiably (``to_digits`` detaches). It rewards reconstructions that keep what
makes a digit recognisable.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from diffplug import Cond, Method, UserError, option, resize

if TYPE_CHECKING:
    from diffplug import DigitsClassifier

LUMA = (0.299, 0.587, 0.114)  # BT.601, as diffplug.evaluate.to_digits


@dataclass
class VAEMethodConfig:
    reconstruction: str = option("mse", "per-pixel reconstruction error", choices=("mse", "l1"))
    kl_weight: float = option(
        1e-4, "weight of KL(posterior || N(0, I)), nats summed per image (see the README)",
        min=0.0,
    )  # fmt: skip
    perceptual_weight: float = option(
        0.0, "weight of the digits-classifier feature distance (0: off)", min=0.0
    )


def digits_view(x: torch.Tensor) -> torch.Tensor:
    """(N, 1|3, S, S) in [-1, 1] -> (N, 1, 8, 8) grey, like ``to_digits`` but keeping the
    graph (and the device), so a loss on it trains the decoder."""
    if x.shape[1] == 3:
        x = (x * x.new_tensor(LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True)
    elif x.shape[1] != 1:
        raise UserError(f"the perceptual term needs 1- or 3-channel images, not {x.shape[1]}")
    return resize(x.float(), 8)


class VAEMethod(Method):
    """Trains a ``kl-vae`` autoencoder (or any registered one with the same forward)."""

    Config = VAEMethodConfig
    trains: ClassVar[str] = "autoencoder"
    default_denoiser: ClassVar[str | None] = "kl-vae"

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self._classifiers: dict[torch.device, DigitsClassifier] = {}

    def process_spec(self) -> dict[str, Any]:
        """Empty: an autoencoder is not trained on a noise process."""
        return {}

    def denoiser_defaults(self) -> dict[str, Any]:
        """No process, no prediction: the autoencoder's own options are all it takes."""
        return {}

    def sample_times(self, denoiser: Any, n: int, generator: torch.Generator) -> torch.Tensor:
        """Never called: there are no diffusion times in autoencoder training."""
        raise TypeError("the vae method draws no diffusion times")

    def loss(
        self, model: Any, x0: torch.Tensor, cond: Cond, generator: torch.Generator
    ) -> torch.Tensor:
        return self.terms(model, x0, generator)["loss"]

    def terms(
        self, model: Any, x0: torch.Tensor, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """Every term of the loss (reconstruction, kl, perceptual) and their weighted sum."""
        config = model.config
        channels = x0.shape[1]
        if channels != config.in_channels or channels != config.out_channels:
            raise UserError(
                f"the data has {channels} channel(s) but the autoencoder maps "
                f"{config.in_channels} to {config.out_channels}: pass --in-channels {channels} "
                f"--out-channels {channels}"
            )
        latent = model.latent_shape(tuple(x0.shape[1:]))
        noise = torch.randn((x0.shape[0], *latent), generator=generator).to(x0.device)
        recon, mean, logvar = model(x0, noise)  # one call: DDP sees the whole graph
        error = recon.float() - x0.float()
        per_pixel = error.pow(2) if self.config.reconstruction == "mse" else error.abs()
        rec = per_pixel.flatten(1).mean(1).mean()
        mean, logvar = mean.float(), logvar.float()
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1).mean()
        loss = rec + self.config.kl_weight * kl
        perceptual = rec.new_zeros(())
        if self.config.perceptual_weight > 0:
            classifier = self._classifier(x0.device)
            with torch.no_grad():
                target = classifier.features(digits_view(x0))
            perceptual = (classifier.features(digits_view(recon)) - target).pow(2).mean()
            loss = loss + self.config.perceptual_weight * perceptual
        return {"loss": loss, "reconstruction": rec, "kl": kl, "perceptual": perceptual}

    def _classifier(self, device: torch.device) -> DigitsClassifier:
        """The shipped digits classifier, frozen, one copy per device (the shared cached one
        is left as it is)."""
        if device not in self._classifiers:
            from diffplug import load_classifier

            frozen = copy.deepcopy(load_classifier()).requires_grad_(False).eval()
            self._classifiers[device] = frozen.to(device)
        return self._classifiers[device]
