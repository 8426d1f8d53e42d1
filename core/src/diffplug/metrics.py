"""Distances between two sets of feature vectors: Frechet distance, KID, k-NN precision and
recall. Pure maths on (N, D) arrays; which features they are is ``diffplug.features``' job.
(Used by ``diffplug eval``; the training log's numbers are ``diffplug.trainlog``'s.)

- ``frechet_distance``: FD between Gaussians fitted to each set (Heusel et al. 2017); FID is
  this in Inception's pool3 space. Biased upwards at small N.
- ``kid``: kernel inception distance (Binkowski et al. 2018): the unbiased estimate of MMD^2
  with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over random subsets
  of equal size m = min(N1, N2, subset_size), with the std over subsets, as torch-fidelity
  and clean-fid compute it (100 subsets of at most 1000). Unbiased: ~0 (and as often
  negative as positive) for two draws of one distribution.
- ``precision_recall``: Kynkaanniemi et al. 2019: each set's manifold is the union of balls
  around its points reaching their k-th nearest neighbour (k=3); precision is the share of
  samples inside the reference's manifold, recall the share of reference points inside the
  samples'.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from diffplug.errors import UserError

#: KID's defaults, as torch-fidelity's and clean-fid's
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000
#: the neighbour that bounds each point's ball (Kynkaanniemi et al.: k=3)
NEAREST_K = 3
#: up to this many rows a side, KID computes each kernel matrix once and indexes subsets
_WHOLE_KERNEL = 5000


def _array(feats: Any) -> np.ndarray:
    return np.asarray(torch.as_tensor(feats).double().cpu(), dtype=np.float64)


def _pair(feats_a: Any, feats_b: Any, least: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    a, b = _array(feats_a), _array(feats_b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < least:
        raise UserError(f"{what} needs (N>={least}, D) sets; got {a.shape} and {b.shape}")
    return a, b


def frechet_distance(feats_a: Any, feats_b: Any) -> float:
    """FD between Gaussians fitted to two (N, D) feature sets (ddof=1 covariances), float64.

    tr sqrt(Sa Sb) is computed as the sum of sqrt-eigenvalues of the symmetric PSD matrix
    sqrt(Sa) Sb sqrt(Sa): no complex parts, no scipy.
    """
    a, b = _pair(feats_a, feats_b, 2, "frechet_distance")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a = np.atleast_2d(np.cov(a, rowvar=False))
    cov_b = np.atleast_2d(np.cov(b, rowvar=False))
    vals, vecs = np.linalg.eigh(cov_a)
    root_a = (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T
    middle = root_a @ cov_b @ root_a
    trace_root = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    fd = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_root
    return float(max(fd, 0.0))


def _kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The cubic polynomial kernel (x.y / d + 1)^3 between the rows of a and b."""
    return (a @ b.T / a.shape[1] + 1) ** 3


def _mmd2(k_aa: np.ndarray, k_bb: np.ndarray, k_ab: np.ndarray) -> float:
    """Unbiased MMD^2 from the kernel matrices of two sets of one size m: the mean of k over
    distinct pairs within each set, minus twice the mean across them."""
    m = len(k_aa)
    within = (k_aa.sum() - np.trace(k_aa) + k_bb.sum() - np.trace(k_bb)) / (m * (m - 1))
    return float(within - 2 * k_ab.mean())


def mmd2_unbiased(feats_a: Any, feats_b: Any) -> float:
    """The unbiased MMD^2 of two equal-size sets (m >= 2, D), cubic polynomial kernel."""
    a, b = _pair(feats_a, feats_b, 2, "mmd2_unbiased")
    if len(a) != len(b):
        raise UserError(f"mmd2_unbiased needs sets of one size; got {len(a)} and {len(b)}")
    return _mmd2(_kernel(a, a), _kernel(b, b), _kernel(a, b))


def kid(
    feats_a: Any,
    feats_b: Any,
    subsets: int = KID_SUBSETS,
    subset_size: int = KID_SUBSET_SIZE,
    seed: int = 0,
) -> dict[str, float]:
    """KID: ``mean`` and ``std`` of the unbiased MMD^2 over ``subsets`` random subsets of
    ``subset`` = min(N1, N2, subset_size) rows of each set (drawn without replacement)."""
    a, b = _pair(feats_a, feats_b, 2, "kid")
    m = min(len(a), len(b), subset_size)
    rng = np.random.default_rng(seed)
    whole = max(len(a), len(b)) <= _WHOLE_KERNEL
    if whole:
        k_aa, k_bb, k_ab = _kernel(a, a), _kernel(b, b), _kernel(a, b)
    values = []
    for _ in range(subsets):
        i, j = rng.choice(len(a), m, replace=False), rng.choice(len(b), m, replace=False)
        if whole:
            values.append(_mmd2(k_aa[np.ix_(i, i)], k_bb[np.ix_(j, j)], k_ab[np.ix_(i, j)]))
        else:
            x, y = a[i], b[j]
            values.append(_mmd2(_kernel(x, x), _kernel(y, y), _kernel(x, y)))
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "subset": m}


#: rows of a distance matrix held at once: memory stays rows x N, whatever N
_ROWS = 1024


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances (len(a), len(b)) in float64 (through a matrix product, as
    scikit-learn's: rounding far below any neighbour gap that matters here)."""
    return torch.cdist(torch.from_numpy(a), torch.from_numpy(b)).numpy()


def _radii(x: np.ndarray, k: int) -> np.ndarray:
    """Each point's distance to its k-th nearest other point."""
    out = [
        np.partition(_distances(x[i : i + _ROWS], x), k, axis=1)[:, k]  # column 0: itself
        for i in range(0, len(x), _ROWS)
    ]
    return np.concatenate(out)


def _inside(points: np.ndarray, centres: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Whether each point lies in some centre's ball (distance <= its radius)."""
    return np.concatenate(
        [
            (_distances(points[i : i + _ROWS], centres) <= radii[None, :]).any(1)
            for i in range(0, len(points), _ROWS)
        ]
    )


def precision_recall(samples: Any, reference: Any, k: int = NEAREST_K) -> dict[str, float]:
    """k-NN precision and recall of ``samples`` against ``reference`` (module docstring)."""
    s, r = _pair(samples, reference, k + 1, "precision_recall")
    precision = _inside(s, r, _radii(r, k)).mean()
    recall = _inside(r, s, _radii(s, k)).mean()
    return {"precision": float(precision), "recall": float(recall), "k": k}
