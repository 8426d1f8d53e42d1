"""``pixels``: the default feature space, raw pixel statistics. It needs no weights file.

Images are made RGB (grey repeated), resized to 32x32 (antialiased when shrinking), and
their 3072 values in [0, 1] projected to 512 dimensions by a fixed Gaussian matrix (seed
0, entries N(0, 1/512)): distances are kept to within a few percent (Johnson-Lindenstrauss)
while FD's 512x512 covariances stay cheap. It sees colour, layout and blur, not semantics:
FD here is not FID and is not comparable with any published number.
"""

from __future__ import annotations

import functools

import torch

from diffplug.data import resize
from diffplug.features import FeatureSpace

SIDE, DIM, SEED = 32, 512, 0


@functools.cache
def projection() -> torch.Tensor:
    """The fixed (3 * 32 * 32, 512) projection, the same on every machine."""
    generator = torch.Generator().manual_seed(SEED)
    return torch.randn(3 * SIDE * SIDE, DIM, generator=generator, dtype=torch.float64) / DIM**0.5


class PixelFeatures(FeatureSpace):
    """Pixels at 32x32 RGB, randomly projected to 512-d (module docstring)."""

    name = "pixels"
    label = f"pixel statistics ({SIDE}x{SIDE} RGB, fixed random projection to {DIM}-d; not FID)"

    def extract(self, images: torch.Tensor) -> torch.Tensor:
        x = resize(images.expand(-1, 3, -1, -1), SIDE)
        return x.reshape(len(x), -1).double() @ projection()
