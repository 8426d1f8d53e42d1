"""Per-sample noise streams: sample k with seed s draws the same numbers in any batch.

Each sample owns a generator seeded with its seed. Step noise is drawn ahead in blocks whose
length depends only on the per-sample shape, never on the batch size, so a sample's stream
is identical whether it runs alone or among 63 others, and the loop draws once per block
instead of once per step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

#: elements drawn ahead per sample (1 MiB of float32).
BLOCK_ELEMENTS = 1 << 18


class NoiseSource:
    """The initial noise and the per-step noise of one batch."""

    def __init__(
        self,
        seeds: Sequence[int],
        shape: Sequence[int],
        *,
        steps: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.shape = tuple(shape)
        self.device = torch.device(device)
        self.dtype = dtype
        self.generators = [torch.Generator(self.device).manual_seed(int(s)) for s in seeds]
        self.remaining = steps
        numel = 1
        for n in self.shape:
            numel *= n
        self.block_len = max(1, BLOCK_ELEMENTS // numel)
        self.block: torch.Tensor | None = None
        self.pos = 0

    def _draw(self, lead: tuple[int, ...]) -> torch.Tensor:
        out = torch.empty(
            (len(self.generators), *lead, *self.shape), device=self.device, dtype=self.dtype
        )
        for k, g in enumerate(self.generators):
            torch.randn((*lead, *self.shape), generator=g, out=out[k])
        return out

    def initial(self) -> torch.Tensor:
        """x_T's noise: the first draw of every stream."""
        return self._draw(())

    def next(self) -> torch.Tensor:
        """Noise for the next stochastic step."""
        if self.block is None or self.pos == self.block.shape[1]:
            length = max(1, min(self.block_len, self.remaining))
            self.block = self._draw((length,))
            self.pos = 0
        z = self.block[:, self.pos]
        self.pos += 1
        self.remaining -= 1
        return z
