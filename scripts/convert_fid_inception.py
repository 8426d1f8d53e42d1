"""Convert pytorch-fid's FID Inception weights to the safetensors file ``diffplug eval``
reads with ``--features FILE`` (or ``--features inception --features-weights FILE``).

    uv run python scripts/convert_fid_inception.py \\
        pt_inception-2015-12-05-6726825d.pth fid-inception.safetensors

The input is the file pytorch-fid downloads on first use (``FID_WEIGHTS_URL`` in its
``inception.py``; often already in ``~/.cache/torch/hub/checkpoints/``): a torch pickle of
the state dict of its ``fid_inception_v3()``, the TF FID graph ported to torchvision's
Inception-v3 layout. It is read with ``torch.load(weights_only=True)``, which refuses
anything but tensors and plain containers (no code runs). The classifier (``fc.*``, unused
by pool3) and the batch-norm counters are dropped, every other tensor is checked by name and
shape against ``diffplug.features.fid_inception.FIDInceptionV3`` and written as float32
with the format and the source file's SHA-256 in the metadata. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from diffplug.atomic import atomic_path
from diffplug.features.inception import FORMAT, expected_shapes, layout_problem

#: the published file's SHA-256 starts so (torch hub names files by it)
PUBLISHED_PREFIX = "6726825d"


def read_pth(path: Path) -> dict[str, torch.Tensor]:
    """A torch state-dict pickle, loaded with ``weights_only`` (tensors only, no code)."""
    state = torch.load(path, map_location="cpu", weights_only=True)  # noqa: TID251 (the input is a pickle)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SystemExit(f"{path}: not a state dict of tensors")
    return state


def convert(source: Path, target: Path) -> dict[str, str]:
    """Write ``target`` from ``source``; return the metadata written."""
    state = read_pth(source)
    problem = layout_problem({k: tuple(v.shape) for k, v in state.items()})
    if problem:
        raise SystemExit(f"{source}: not pytorch-fid's FID Inception weights: {problem}")
    keep = expected_shapes()
    tensors = {k: v.float().contiguous() for k, v in state.items() if k in keep}
    metadata = {
        "diffplug.format": FORMAT,
        "source": source.name,
        "source_sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
    }
    with atomic_path(target) as tmp:
        save_file(tensors, os.fspath(tmp), metadata=metadata)
    return metadata


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", type=Path, help="pt_inception-2015-12-05-6726825d.pth")
    parser.add_argument("target", type=Path, help="the .safetensors file to write")
    args = parser.parse_args(argv)
    if not args.source.is_file():
        raise SystemExit(f"{args.source}: no such file")
    meta = convert(args.source, args.target)
    size = args.target.stat().st_size / 1e6
    if not meta["source_sha256"].startswith(PUBLISHED_PREFIX):
        print(f"note: {args.source} is not the published file (SHA-256 {PUBLISHED_PREFIX}...); "
              "its features are not FID's", file=sys.stderr)  # fmt: skip
    digest = meta["source_sha256"][:12]
    print(f"wrote {args.target} ({size:.1f} MB) from {args.source} (sha256 {digest}...)")


if __name__ == "__main__":
    sys.exit(main())
