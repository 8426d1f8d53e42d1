"""What a run returns: the images, and the recipe that made them.

``Samples.tensor`` is (N, C, H, W) float32 in [0, 1] on the CPU; ``images`` are the same as
PIL images; ``save`` writes a PNG grid, a safetensors file or a folder of PNGs, atomically,
each carrying the recipe so that ``diffplug run --recipe FILE`` can make them again.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffplug.output import check_output_path, save_folder, to_pil, write_samples


@dataclass
class Samples:
    """Images drawn by a ``Run`` and their recipe (components, options, seeds, weights)."""

    #: (N, C, H, W), float32, [0, 1], on the CPU
    tensor: torch.Tensor
    recipe: dict[str, Any] = field(default_factory=dict)
    #: a pipeline's every stage, base first (empty for a single model)
    stages: list[Samples] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.tensor)

    @property
    def images(self) -> list[Any]:
        """One PIL image per sample (mode L or RGB)."""
        return [to_pil(x) for x in self.tensor]

    @property
    def seeds(self) -> list[int]:
        return list(self.recipe.get("seeds", []))

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write ``.png`` (a grid), ``.safetensors`` (the tensor) or a folder (a path ending
        in ``/`` or an existing directory: one PNG per sample, each with its own recipe).
        Refused before anything is written if the target exists, unless ``overwrite``."""
        target = check_output_path(path, overwrite, folders=True)
        if target.suffix.lower() in (".png", ".safetensors"):
            write_samples(self.tensor * 2 - 1, target, self.recipe)
        else:
            save_folder(self.tensor, target, [self.recipe_of(k) for k in range(len(self))])
        return target

    def recipe_of(self, k: int) -> dict[str, Any]:
        """The recipe of sample ``k`` alone: its seed, its prompt."""
        recipe = copy.deepcopy(self.recipe)
        for key in ("seeds", "prompts", "negative_prompts", "init_index"):
            if isinstance(recipe.get(key), list) and len(recipe[key]) == len(self):
                recipe[key] = [recipe[key][k]]
        return recipe

    def __repr__(self) -> str:
        what = self.recipe.get("model", {})
        name = what.get("name") if isinstance(what, dict) else what
        return f"Samples({len(self)} x {tuple(self.tensor.shape[1:])}, model={name!r})"


__all__ = ["Samples"]
