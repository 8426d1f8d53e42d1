"""``diffplug eval``: score a samples file with the digits evaluator (see diffplug.evaluate)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click

from diffplug.errors import UserError

FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
TOLERANCE = 1e-4  # [0, 1] up to rounding


@click.command()
@click.argument("samples", metavar="SAMPLES.safetensors", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option(
    "--seed", type=int, default=0, show_default=True, help="seed of the real digits drawn"
)
def evaluate(samples: Path, as_json: bool, seed: int) -> None:
    """Score samples: digits FD beside its real-vs-real floor, classes, memorisation.

    SAMPLES is a file from `diffplug run -o NAME.safetensors` (a "samples" tensor
    (N, 1 or 3, S, S) in [0, 1]). Other sizes are resized to 8x8 and RGB made grey; the
    real digits they are compared with go through the same resizes.
    """
    from diffplug.evaluate import evaluate as score

    images = read_samples(samples)
    result = {"file": os.fspath(samples), **score(images * 2 - 1, seed=seed)}
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(report(result, tuple(images.shape)))


def read_samples(path: Path) -> Any:
    """The "samples" tensor of a safetensors file, validated: (N>=2, 1|3, S, S), in [0, 1]."""
    import torch
    from safetensors import safe_open

    from diffplug.checkpoint import read_header

    if path.suffix.lower() == ".png":
        raise UserError(f"{path}: a PNG grid cannot be scored; sample with -o NAME.safetensors")
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if not path.is_file():
        raise UserError(f"{path} is not a file")
    header, _ = read_header(path)  # a CheckpointError (exit 2) if it is not safetensors
    entry = header.get("samples")
    if entry is None:
        found = ", ".join(sorted(header)) or "none"
        raise UserError(
            f"{path}: no 'samples' tensor (found: {found}); write one with "
            "`diffplug run -o NAME.safetensors`"
        )
    shape = entry["shape"]
    if entry["dtype"] not in FLOAT_DTYPES:
        raise UserError(f"{path}: 'samples' is {entry['dtype']}; expected floats in [0, 1]")
    if len(shape) != 4 or shape[1] not in (1, 3) or shape[0] < 2 or not shape[2] == shape[3] > 0:
        raise UserError(
            f"{path}: 'samples' has shape {tuple(shape)}; expected (N>=2, 1 or 3, S, S)"
        )
    with safe_open(os.fspath(path), framework="pt") as fh:
        images = fh.get_tensor("samples").float()
    if not torch.isfinite(images).all():
        raise UserError(f"{path}: 'samples' holds NaN or Inf")
    low, high = float(images.min()), float(images.max())
    if low < -TOLERANCE or high > 1 + TOLERANCE:
        raise UserError(
            f"{path}: 'samples' values span [{low:.3g}, {high:.3g}]; expected [0, 1] "
            "(diffplug writes samples in [0, 1])"
        )
    return images.clamp(0, 1)


def report(r: dict[str, Any], shape: tuple[int, ...]) -> str:
    """The human table."""

    def mark(ok: bool) -> str:
        return "ok" if ok else "MISSED"

    checks = r["checks"]
    n, c, h, w = shape
    size = f"{h}x{w} {'grey' if c == 1 else 'RGB'}" + ("" if (h, w) == (8, 8) else " -> 8x8")
    lines = [
        f"samples      {n} ({size})  {r['file']}",
        f"digits FD    {r['digits_fd']:.2f}   floor {r['floor']:.2f} (real vs real, n={n}, "
        f"mean of {r['repeats']} draws)   ratio {r['fd_ratio']:.2f}x   "
        f"[<= 3x: {mark(checks['fd_within_3x_floor'])}]",
        f"confidence   {r['confidence']:.3f} (mean max class probability)",
        f"classes      [each 5-15%: {mark(checks['classes_within_5_15_percent'])}]",
    ]
    for digit, share in enumerate(r["class_histogram"]):
        lines.append(f"  {digit}  {share * 100:5.1f}%  {'#' * round(share * 100)}")
    lines += [
        f"memorised    {r['memorised_share'] * 100:.1f}% of samples nearer a training image "
        f"than {r['memorisation_threshold']:.2f} (held-out digits: "
        f"{r['heldout_share'] * 100:.1f}%)   [<= 2x held-out: "
        f"{mark(checks['memorised_within_2x_heldout'])}]",
    ]
    if r.get("detail_ratio") is not None:
        lines.append(
            f"detail       {r['detail_ratio']:.2f}x real digits' (what an 8x8 round trip "
            f"removes, at {h}x{w})   [<= 1.5x: {mark(checks['detail_within_1.5x_real'])}]"
        )
    lines += [
        f"nearest      median distance to a training image {r['median_nearest_train']:.2f} "
        f"(held-out digits: {r['heldout_median_nearest_train']:.2f})",
    ]
    return "\n".join(lines)
