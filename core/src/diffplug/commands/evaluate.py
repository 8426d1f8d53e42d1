"""``diffplug eval``: the digits score of a samples file (``diffplug.evaluate``), or, with
``--reference``, two image sets compared in a feature space (``diffplug.compare``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click

from diffplug.errors import UserError


@click.command()
@click.argument("samples", metavar="SAMPLES")
@click.option(
    "--reference",
    metavar="FOLDER|DATASET|SAMPLES",
    help="compare SAMPLES with these images: a folder, a data set (its held-out split; "
    "NAME:train for the other) or a samples .safetensors",
)
@click.option(
    "--features",
    metavar="NAME|WEIGHTS.safetensors",
    help="the feature space of --reference: pixels (the default; needs no weights), "
    "inception (FID's; needs a weights file), digits, or a plugin's (emoji); a weights "
    "file names its own space",
)
@click.option(
    "--features-weights",
    metavar="FILE",
    help="weights for --features (inception: what scripts/convert_fid_inception.py writes)",
)
@click.option("--kid-subsets", type=click.IntRange(1), default=100, show_default=True)
@click.option("--kid-subset-size", type=click.IntRange(2), default=1000, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="seed of the real digits drawn (with --reference: of KID's subsets)",
)
def evaluate(
    samples: str,
    reference: str | None,
    features: str | None,
    features_weights: str | None,
    kid_subsets: int,
    kid_subset_size: int,
    as_json: bool,
    seed: int,
) -> None:
    """Score samples. With --reference: FD, KID, precision and recall against the reference
    images in a named feature space. Without: the digits score (digits FD beside its
    real-vs-real floor, classes, memorisation).

    SAMPLES is a file from `diffplug run -o NAME.safetensors` (a "samples" tensor
    (N, 1 or 3, S, S) in [0, 1]); with --reference it may also be a folder of images or a
    data set. For the digits score, other sizes are resized to 8x8 and RGB made grey; the
    real digits they are compared with go through the same resizes.
    """
    if reference is not None:
        result = _compare(samples, reference, features, features_weights, seed=seed,
                          kid_subsets=kid_subsets, kid_subset_size=kid_subset_size)  # fmt: skip
        if as_json:
            click.echo(json.dumps(result, indent=2))
            return
        from diffplug.compare import report as compare_report

        click.echo(compare_report(result))
        return
    if features or features_weights:
        raise UserError("--features compares two sets: give --reference FOLDER|DATASET|SAMPLES")
    from diffplug.evaluate import evaluate as score
    from diffplug.image_sets import read_samples

    path = Path(samples)
    if path.is_dir():
        raise UserError(
            f"{path} is not a file: the digits score takes a samples .safetensors; "
            "compare a folder with --reference FOLDER|DATASET|SAMPLES"
        )
    images = read_samples(path)
    result = {"file": os.fspath(path), **score(images * 2 - 1, seed=seed)}
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(report(result, tuple(images.shape)))


def _compare(
    samples: str, reference: str, features: str | None, weights: str | None, **options: Any
) -> dict[str, Any]:
    """``eval --reference``: the feature space first (a bad one fails before any image is
    read), then both sets, then the comparison."""
    from diffplug.compare import compare
    from diffplug.features import feature_space
    from diffplug.image_sets import load_image_set

    space = feature_space(features, weights)
    ours, theirs = load_image_set(samples), load_image_set(reference)
    return compare(ours, theirs, space, **options)


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
