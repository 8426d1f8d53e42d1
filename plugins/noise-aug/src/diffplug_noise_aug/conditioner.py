"""Noise-conditioning augmentation: a super-resolution stage conditioned on a corrupted
low-resolution image and told how corrupted it is.

A cascade's later stages see the earlier stages' samples, not real images. Training on
clean low-resolution images teaches a stage to trust artefacts it then never meets;
noising the condition by the forward process at a random level per sample (and passing the
level along) teaches it to treat the condition as evidence of a known reliability. At
sampling, one fixed level is used, or several are tried and each sample keeps its best.

Levels u lie in [0, 1]: u = 0 is the clean image, u > 0 is the condition process at time
t_min + u * (t_max - t_min). The condition process is any registered process (default the
cosine VP process, as in DeepFloyd IF); level 1 is (numerically) pure noise.

The output follows core's image-conditioning contract: ``{"image": (B, C, low, low),
"aug_level": (B,)}``. A denoiser that reads ``aug_level`` (Imagen's Efficient U-Net does)
learns the level; one that does not still gets the noised image.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from diffplug import (
    AUG_LEVEL,
    Cond,
    LowResConditioner,
    LowResConfig,
    OptionError,
    Process,
    build_process,
    option,
    resize,
)

#: mixes a sample's seed into its augmentation stream, apart from its sampling noise
_STREAM = 0x9E3779B97F4A7C15
SCORERS = ("lowres", "lowres-l1")


@dataclass
class NoiseAugConfig(LowResConfig):
    level: float = option(0.1, "sampling: the augmentation level (literature: 0.1-0.3)",
                          min=0.0, max=1.0)  # fmt: skip
    sweep: list[float] = option(
        [], "sampling: levels to try; each sample keeps the best by --scorer (empty: off)"
    )
    scorer: str = option("lowres", "sweep score: lowres (MSE of the downsampled sample to the "
                         "condition) or lowres-l1", choices=SCORERS)  # fmt: skip
    max_level: float = option(0.5, "training: levels are drawn uniformly in [0, max_level]",
                              min=0.0, max=1.0)  # fmt: skip
    blur: float = option(
        0.0,
        "training: Gaussian blur of sigma ~ U(0, blur) pixels before noising (0: none)",
        min=0.0,
    )
    process: dict = option(
        {"name": "vp", "beta_schedule": "squaredcos_cap_v2"},
        "the forward process whose noise corrupts the condition",
    )

    def __post_init__(self) -> None:
        if any(not 0.0 <= u <= 1.0 or math.isnan(u) for u in self.sweep):
            raise OptionError(f"conditioner noise-aug: --sweep levels must lie in [0, 1]; "
                              f"got {self.sweep}")  # fmt: skip


class NoiseAugConditioner(LowResConditioner):
    """Low-resolution image, noised at a per-sample level, and the level."""

    Config = NoiseAugConfig

    def __init__(self, config: NoiseAugConfig | None = None) -> None:
        super().__init__(config)
        self._process: tuple[dict, Process] | None = None

    @property
    def process(self) -> Process:
        """Built on first use (construction stays registry-free) and when the config's
        process changes."""
        if self._process is None or self._process[0] != self.config.process:
            self._process = (dict(self.config.process), build_process(self.config.process))
        return self._process[1]

    def augment(self, image: torch.Tensor, level: torch.Tensor, noise: torch.Tensor) -> Cond:
        """``image`` (B, C, h, w) at levels (B,) with standard normal ``noise``."""
        lo, hi = self.process.t_range
        t = lo + level.double().cpu() * (hi - lo)
        alpha, sigma = self.process.alpha_sigma(t)
        clean = level.cpu() == 0
        alpha = torch.where(clean, 1.0, alpha).to(image.device, image.dtype)
        sigma = torch.where(clean, 0.0, sigma).to(image.device, image.dtype)
        noised = alpha.view(-1, 1, 1, 1) * image + sigma.view(-1, 1, 1, 1) * noise
        return {"image": noised, AUG_LEVEL: level.to(image.device, image.dtype)}

    def forward(self, inputs: Sequence[Any]) -> Cond:
        """Clean conditions at level 0 (for a fixed level and its noise, see ``condition``)."""
        cond = super().forward(inputs)
        assert cond is not None
        return {**cond, AUG_LEVEL: torch.zeros(len(inputs), device=cond["image"].device)}

    def null(self, batch: int) -> Cond:
        cond = super().forward([None] * batch)
        assert cond is not None
        level = torch.full((batch,), self.config.level, device=cond["image"].device)
        return {**cond, AUG_LEVEL: level}

    def condition(self, inputs: Sequence[Any], seeds: Sequence[int]) -> Cond:
        """The inputs at the sampling level, each noised from its own seed's stream."""
        image = super().forward(inputs)["image"]  # type: ignore[index]
        noise = torch.stack([
            torch.randn(image.shape[1:], generator=torch.Generator().manual_seed(
                (int(s) * _STREAM + 1) % (1 << 63)))
            for s in seeds
        ]).to(image.device, image.dtype)  # fmt: skip
        level = torch.full((len(seeds),), self.config.level, dtype=torch.float64)
        return self.augment(image, level, noise)

    def sweep(self) -> list[NoiseAugConditioner]:
        if not self.config.sweep:
            return [self]
        variants = []
        for u in self.config.sweep:
            variant = type(self)(dataclasses.replace(self.config, level=float(u), sweep=[]))
            variant.name = self.name
            variants.append(variant.to(self._anchor.device))
        return variants

    def score(self, samples: torch.Tensor, inputs: Sequence[Any]) -> torch.Tensor:
        """How far each sample, shrunk to the condition's size, is from its clean input."""
        target = super().forward(inputs)["image"]  # type: ignore[index]
        got = resize(samples.float().clamp(-1, 1), self.config.low_size)
        diff = (got - target.to(got.device)).flatten(1)
        return diff.abs().mean(1) if self.config.scorer == "lowres-l1" else diff.pow(2).mean(1)

    def from_data(
        self, x0: torch.Tensor, generator: torch.Generator, labels: torch.Tensor | None = None
    ) -> Cond:
        """The batch shrunk to ``low_size``, optionally blurred, noised at levels drawn per
        sample from ``generator``."""
        image = super().from_data(x0, generator, labels)["image"]  # type: ignore[index]
        n = len(image)
        level = torch.rand(n, generator=generator, dtype=torch.float64) * self.config.max_level
        if self.config.blur > 0:
            sigmas = torch.rand(n, generator=generator) * self.config.blur
            image = gaussian_blur(image, sigmas.to(image.device))
        noise = torch.randn(image.shape, generator=generator).to(image.device, image.dtype)
        return self.augment(image, level, noise)


def gaussian_blur(images: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Blur each image (B, C, h, w) by its own sigma (B,) in pixels (0: unchanged);
    separable, reflect-padded, radius 2."""
    offsets = torch.arange(-2, 3, device=images.device, dtype=images.dtype)
    s = sigmas.to(images.dtype).clamp(min=1e-6)[:, None]
    kernel = torch.exp(-0.5 * (offsets[None] / s) ** 2)
    kernel = kernel / kernel.sum(1, keepdim=True)  # (B, 5); sigma -> 0 gives a delta
    b, c, h, w = images.shape
    x = F.pad(images.reshape(1, b * c, h, w), (2, 2, 2, 2), mode="reflect")
    k = kernel.repeat_interleave(c, dim=0)
    x = F.conv2d(x, k[:, None, None, :], groups=b * c)
    x = F.conv2d(x, k[:, None, :, None], groups=b * c)
    return x.reshape(b, c, h, w)
