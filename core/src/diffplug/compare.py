"""``diffplug eval SAMPLES --reference REF``: two image sets compared in one feature space.

FD, KID and k-NN precision and recall (``diffplug.metrics``) of the samples' features
against the reference's; the result names the feature space and both sample counts, and
so does every line of ``report``, so that no number travels without them. FD is biased
upwards at small N and depends on N: compare FDs only at equal counts. KID is unbiased.
"""

from __future__ import annotations

from typing import Any

from diffplug import metrics
from diffplug.features import FeatureSpace
from diffplug.image_sets import ImageSet


def compare(
    samples: ImageSet,
    reference: ImageSet,
    space: FeatureSpace,
    *,
    seed: int = 0,
    kid_subsets: int = metrics.KID_SUBSETS,
    kid_subset_size: int = metrics.KID_SUBSET_SIZE,
    k: int = metrics.NEAREST_K,
) -> dict[str, Any]:
    """The metrics of ``samples`` against ``reference`` in ``space``, as a JSON-able dict."""
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    ours, theirs = space(samples.images), space(reference.images)
    notes = [f"samples: {n}" for n in samples.notes] + [f"reference: {n}" for n in reference.notes]
    n, m = len(ours), len(theirs)
    if min(n, m) < 2 * ours.shape[1]:
        notes.append(
            f"FD fits {ours.shape[1]}-d covariances to {min(n, m)} images: biased upwards, and "
            "comparable only at equal counts"
        )
    if n != m:
        notes.append(f"unequal counts ({n} samples, {m} reference): FD depends on both")
    # one BLAS thread: these matrices are small, and more threads only fight over the cores
    with threadpool_limits(1, user_api="blas"):
        fd = metrics.frechet_distance(ours, theirs)
        kid = metrics.kid(ours, theirs, kid_subsets, kid_subset_size, seed=seed)
        pr = metrics.precision_recall(ours, theirs, k=k) if min(n, m) > k else None
    if pr is None:
        notes.append(f"no precision and recall: they need more than k={k} images a set")
    return {
        "features": {"name": space.name, "label": space.label, "dim": int(ours.shape[1])},
        "samples": {"source": samples.describe(), "n": n},
        "reference": {"source": reference.describe(), "n": m},
        "fd": {"name": space.fd_name, "value": fd},
        "kid": {**kid, "subsets": kid_subsets},
        "precision_recall": pr,
        "seed": seed,
        "notes": notes,
    }


def report(r: dict[str, Any]) -> str:
    """The human lines: each metric with its feature space and both counts."""
    counts = f"samples n={r['samples']['n']}, reference n={r['reference']['n']}"
    where = f"in {r['features']['label']}; {counts}"
    kid = r["kid"]
    lines = [
        f"samples      {r['samples']['source']}",
        f"reference    {r['reference']['source']}",
        f"{r['fd']['name']:<12} {r['fd']['value']:.4g}   {where}",
        f"{'KID':<12} {kid['mean']:.4g} +- {kid['std']:.2g} (std over {kid['subsets']} "
        f"subsets of {kid['subset']})   {where}",
    ]
    pr = r["precision_recall"]
    if pr is not None:
        lines += [
            f"{'precision':<12} {pr['precision']:.3f} (k={pr['k']})   {where}",
            f"{'recall':<12} {pr['recall']:.3f} (k={pr['k']})   {where}",
        ]
    lines += [f"note         {note}" for note in r["notes"]]
    return "\n".join(lines)
