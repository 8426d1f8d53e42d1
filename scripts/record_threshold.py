"""Record a model's default thresholding in its file, as training records its guidance.

    uv run python scripts/record_threshold.py MODEL.safetensors static
    uv run python scripts/record_threshold.py MODEL.safetensors dynamic 0.9

Why: which thresholding is best depends on the model's data (docs/claims.md measures it per
shipped model), so the choice travels with the weights: ``diffplug run`` and the Imagen
cascade use ``extra["threshold"]`` when no ``--threshold`` is given. The tensors are written
back unchanged; only the metadata's ``extra`` gains ``threshold``.
"""

from __future__ import annotations

import json
import os
import sys

from safetensors import safe_open
from safetensors.torch import save_file

from diffplug.transforms import THRESHOLDS


def main(path: str, kind: str, percentile: float = 0.995) -> None:
    if kind not in THRESHOLDS:
        sys.exit(f"threshold must be one of {', '.join(THRESHOLDS)}; got {kind!r}")
    if not 0 < percentile <= 1:
        sys.exit(f"percentile must be in (0, 1]; got {percentile}")
    with safe_open(path, framework="pt") as f:
        metadata = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iter
    extra = json.loads(metadata.get("diffplug.extra", "{}"))
    extra["threshold"] = {"kind": kind, "percentile": percentile}
    metadata["diffplug.extra"] = json.dumps(extra, sort_keys=True)
    temporary = f"{path}.tmp"
    save_file(tensors, temporary, metadata=metadata)
    os.replace(temporary, path)


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2], *(float(v) for v in sys.argv[3:]))
