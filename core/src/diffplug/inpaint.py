"""One batch's init in the denoiser's space: img2img's start and inpainting's known region.

A plan is made on some Gaussian process, so its call i sees x = alpha[i]*x0 + sigma[i]*eps
(``Plan.alpha``, ``Plan.sigma``; k-diffusion's x0 + s*eps has alpha = 1). img2img starts
at the first call of the plan's tail with the init noised to that level,
``alpha[0]*x0 + sigma[0]*eps``, eps being the first draw of the sample's own generator (the
one text-to-image starts from), so sample k does not depend on its batch.

Inpainting any model (Lugmayr et al. 2022, RePaint; diffusers' inpainting pipeline with a
4-channel UNet): after every call the known region (mask 0) of x is replaced by the init
noised to the level of the next call with that same eps, and by the init itself after the
last. ``repaint`` N is RePaint's algorithm: the known region is drawn afresh from
q(x_j | x0) at every level (fresh noise from the sample's stream, not its first eps), and
each step is resampled N more times: x is noised back to the step's start level with fresh noise,
x_i = (alpha_i/alpha_j)*x_j + sqrt(sigma_i^2 - (alpha_i/alpha_j)^2 sigma_j^2)*z, and the step
is taken again, which lets the generated region agree with the known one. A denoiser with
``takes_mask = True`` (an inpainting UNet, SD's 9-channel layout) is given the mask and the
masked image instead (``mask_condition``) and nothing is replaced.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

#: the condition entries a ``takes_mask`` denoiser reads
MASK_KEYS = ("mask", "masked")


@dataclass
class Region:
    """A batch's encoded init ``x0`` (B, C, h, w) and mask (B, 1, h, w; 1 = regenerate) at
    the denoiser's resolution, with the plan's alpha and sigma at each call (then 1, 0)."""

    x0: torch.Tensor
    mask: torch.Tensor | None
    alpha: list[float]
    sigma: list[float]
    #: paste the known region after each call (False for a ``takes_mask`` denoiser)
    paste_known: bool
    #: start from the plan's own noise (inpainting at strength 1), not the noised init
    from_noise: bool
    known: torch.Tensor | None = None
    known_eps: torch.Tensor | None = None

    def start(self, eps: torch.Tensor, init_scale: float) -> torch.Tensor:
        """x at the first call, from the sample's noise ``eps``; keeps (1 - mask)*eps for
        the known region's later levels."""
        if self.paste_known and self.mask is not None:
            keep = 1 - self.mask
            self.known, self.known_eps = self.x0 * keep, eps * keep
        if self.from_noise:
            return eps * init_scale
        return self.x0 * self.alpha[0] + eps * self.sigma[0]

    @property
    def pastes(self) -> bool:
        return self.paste_known and self.mask is not None

    def paste(self, x: torch.Tensor, j: int, inplace: bool,
              noise: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """x (at call j's level; j = len(plan): the sample) with the known region put back,
        noised with the sample's first eps, or with ``noise`` (RePaint's fresh draw)."""
        if self.known is None or self.known_eps is None or self.mask is None:
            return x
        out = x.mul_(self.mask) if inplace else x * self.mask
        out.add_(self.known, alpha=self.alpha[j])
        if self.sigma[j]:
            if noise is None:
                out.add_(self.known_eps, alpha=self.sigma[j])
            else:
                out.addcmul_(noise, 1 - self.mask, value=self.sigma[j])
        return out

    def back(self, x: torch.Tensor, i: int, z: torch.Tensor) -> torch.Tensor:
        """RePaint's jump: x at call i + 1's level noised back to call i's."""
        ratio = self.alpha[i] / self.alpha[i + 1]
        std = math.sqrt(max(self.sigma[i] ** 2 - (ratio * self.sigma[i + 1]) ** 2, 0.0))
        return (x * ratio).add_(z, alpha=std)


def region(
    x0: torch.Tensor,
    mask: torch.Tensor | None,
    alpha: list[float],
    sigma: list[float],
    *,
    takes_mask: bool,
    from_noise: bool,
) -> Region:
    """The batch's region, the mask brought to the latent grid (nearest, as diffusers)."""
    return Region(x0, to_grid(mask, x0.shape[-2:]), [*alpha, 1.0], [*sigma, 0.0],
                  paste_known=not takes_mask, from_noise=from_noise)  # fmt: skip


def to_grid(mask: torch.Tensor | None, size: tuple[int, ...] | torch.Size) -> torch.Tensor | None:
    """A (B, 1, H, W) image mask at the denoiser's (h, w): nearest, as diffusers' inpainting."""
    if mask is None or tuple(mask.shape[-2:]) == tuple(size):
        return mask
    return F.interpolate(mask, size=tuple(size), mode="nearest")


def mask_condition(
    images: torch.Tensor,
    mask: torch.Tensor | None,
    encode: Callable[[torch.Tensor], torch.Tensor],
    size: tuple[int, ...] | torch.Size,
) -> dict[str, torch.Tensor]:
    """What a ``takes_mask`` denoiser is given: ``mask`` (B, 1, h, w), 1 = regenerate, and
    ``masked``, the encoding of the init with the regenerated region zeroed (grey), as SD's
    inpainting pipeline builds them. Without a mask, everything is regenerated."""
    if mask is None:
        mask = images.new_ones((images.shape[0], 1, *images.shape[-2:]))
    masked = encode(images * (1 - mask))
    grid = to_grid(mask, size)
    assert grid is not None
    return {"mask": grid.to(masked.dtype), "masked": masked}


__all__ = ["MASK_KEYS", "Region", "mask_condition", "region", "to_grid"]
