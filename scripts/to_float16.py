"""Store a model file's floating-point weights in float16, keeping its metadata.

    uv run python scripts/to_float16.py runs/emoji-base/model.safetensors out.safetensors

Why: a shipped model's size in the repository halves; diffplug loads float16 weights into
its float32 components, so sampling runs as before (on values rounded to float16).
"""

from __future__ import annotations

import sys

from safetensors import safe_open
from safetensors.torch import save_file


def main(source: str, target: str) -> None:
    with safe_open(source, framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iter
    half = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
    save_file(half, target, metadata=metadata)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
