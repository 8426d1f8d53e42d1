"""The digits evaluator: a small CNN trained on the digits' training split scores samples.

Why in-repo: Inception FID means nothing on 8x8 greyscale digits and needs a download. A
classifier trained on the same digits gives features that do mean something here:

* digits FD: Frechet distance between the samples' features and those of ``n`` real digits,
  printed beside the *floor*, the FD of ``n`` other real digits against the same reference.
  FD is biased upwards at small ``n``; the floor is that bias, so the ratio is what to read.
  Both are means over ``REPEATS`` (20) seeded draws of the real sets, which steadies them.
* the predicted class histogram and the mean confidence (max class probability).
* memorisation: the share of samples whose nearest training image (L2, pixels at 8x8) is
  nearer than the nearest training image of 90% of held-out real digits. Held-out digits
  score 0.10 by construction; a model that copies its training set scores near 1.

The real sets (``real_pairs``): for each repeat, the 1797 ``all`` digits are shuffled (one
generator seeded by ``seed``) and split into disjoint halves A (898) and B (899). Each set of
``n`` is the first ``n`` of its shuffled half; when ``n`` exceeds the half, it is the whole
half plus ``n - len(half)`` images drawn with replacement from it. Samples are scored against
B; the floor is A against B. Above ~900 the real sets hold duplicates, which add noise
rather than remove it: past n=900 the floor stops falling (and slowly rises).

Samples of another size S are made grey and resized to 8x8 (antialiased); the real digits
they are compared with go 8 -> S -> 8 through the same ``data.resize`` first, as the model
(trained on ``digits(split, S)``) saw them then as its samples are brought back.

The shipped weights (``weights/digits-classifier.safetensors``) are reproduced with
``python -m diffplug.evaluate --train``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diffplug.data import digits, resize
from diffplug.errors import UserError
from diffplug.metrics import frechet_distance

SIZE = 8
FEATURES = 64
CLASSES = 10
FORMAT = "diffplug-digits-classifier/1"
WEIGHTS = Path(__file__).parent / "weights" / "digits-classifier.safetensors"
HELDOUT_QUANTILE = 0.10
REPEATS = 20
ALL_DIGITS = 1797
SPLITS = ("all", "train", "heldout")
_CACHE: dict[str, Any] = {}


class DigitsClassifier(nn.Module):
    """Three 3x3 convolutions, two poolings, a 64-d ReLU feature layer, a linear head."""

    def __init__(self, features: int = FEATURES) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 4, features),
            nn.ReLU(),
        )
        self.head = nn.Linear(features, CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (N, 64) of (N, 1, 8, 8) images in [-1, 1]: FD lives here."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (N, 10)."""
        return self.head(self.features(x))


def _shift(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image moved by -1, 0 or +1 pixel in x and y (background fills in): augmentation."""
    n = len(x)
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dy = torch.randint(0, 3, (n,), generator=generator)
    dx = torch.randint(0, 3, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(SIZE))[:, None, :, None].expand(n, 1, SIZE, SIZE + 2)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(SIZE))[:, None, None, :].expand(n, 1, SIZE, SIZE)
    return out.gather(3, cols)


def train_classifier(
    seed: int = 0, epochs: int = 60, batch_size: int = 128, lr: float = 4e-3
) -> tuple[DigitsClassifier, float]:
    """Train on the digits training split; return (model, held-out accuracy).

    Deterministic for a seed: one thread (also the fastest for a net this small), one
    generator for init, order and shifts; torch's global RNG is left as it was.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(seed, epochs, batch_size, lr)
    finally:
        torch.set_num_threads(threads)


def _train(seed: int, epochs: int, batch_size: int, lr: float) -> tuple[DigitsClassifier, float]:
    train, held = digits("train"), digits("heldout")
    assert train.labels is not None
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitsClassifier()
    steps_per_epoch = -(-len(train) // batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch
    )
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(train), generator=generator)
        for start in range(0, len(train), batch_size):
            idx = order[start : start + batch_size]
            x = _shift(train.images[idx], generator)
            loss = F.cross_entropy(model(x), train.labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    return model, accuracy(model, held.images, held.labels)


@torch.no_grad()
def accuracy(model: DigitsClassifier, images: torch.Tensor, labels: torch.Tensor | None) -> float:
    """Share of ``images`` whose predicted class is the label."""
    assert labels is not None
    return float((model(images).argmax(1) == labels).float().mean())


def save_classifier(model: DigitsClassifier, path: str | os.PathLike[str], **info: Any) -> None:
    """Write the weights as safetensors, atomically, with how they were made as metadata."""
    from safetensors.torch import save_file

    from diffplug.atomic import atomic_path

    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    metadata = {"diffplug.format": FORMAT, **{k: str(v) for k, v in info.items()}}
    with atomic_path(path) as tmp:
        save_file(state, os.fspath(tmp), metadata=metadata)


def load_classifier(path: str | os.PathLike[str] | None = None) -> DigitsClassifier:
    """The shipped (or given) classifier from safetensors, never a pickle; cached per path."""
    from diffplug.checkpoint import load_tensors, read_header

    path = Path(path or WEIGHTS)
    key = f"model:{path.resolve()}"
    if key not in _CACHE:
        if not path.is_file():
            raise UserError(
                f"digits classifier weights {path} are missing; rebuild them with "
                "`python -m diffplug.evaluate --train`"
            )
        _, meta = read_header(path)
        if meta.get("diffplug.format") != FORMAT:
            raise UserError(f"{path} is not a digits classifier ({FORMAT}) file")
        model = DigitsClassifier()
        model.load_state_dict(load_tensors(path), strict=True)
        _CACHE[key] = model.eval()
    return _CACHE[key]


def to_digits(samples: torch.Tensor) -> torch.Tensor:
    """(N, 1|3, S, S) in [-1, 1] -> (N, 1, 8, 8): RGB to grey (BT.601 luma), antialiased resize."""
    if samples.ndim != 4 or samples.shape[1] not in (1, 3) or samples.shape[2] != samples.shape[3]:
        raise UserError(f"samples must be (N, 1 or 3, S, S); got {tuple(samples.shape)}")
    return resize(_grey(samples), SIZE)


def _grey(samples: torch.Tensor) -> torch.Tensor:
    """(N, 1|3, S, S) -> (N, 1, S, S) float32 on the CPU; RGB by BT.601 luma."""
    x = samples.detach().float().cpu()
    if x.shape[1] == 3:
        x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    return x


@torch.no_grad()
def classify(samples: torch.Tensor) -> torch.Tensor:
    """(N,) the digit the shipped classifier reads in each sample (N, 1|3, S, S) in [-1, 1]."""
    return load_classifier()(to_digits(samples)).argmax(1)


def detail(samples: torch.Tensor) -> float:
    """RMS of what an 8x8 round trip removes from (N, 1|3, S, S) images in [-1, 1] (clamped,
    as written to files): the part of a sample at S > 8 that digits FD, computed at 8x8,
    cannot see. Noise a sampler leaves at full resolution shows up here and only here."""
    x = _grey(samples.detach().clamp(-1, 1))
    size = x.shape[-1]
    return float((x - resize(resize(x, SIZE), size)).pow(2).mean().sqrt())


def _round_trip(images: torch.Tensor, size: int) -> torch.Tensor:
    """Real 8x8 digits as a model trained at ``size`` saw them (``digits(split, size)``), then
    brought back to 8x8 like its samples: the resizes blur, and the reference must share it."""
    return resize(resize(images, size), SIZE) if size != SIZE else images


def real_pairs(
    n: int, seed: int = 0, repeats: int = REPEATS, total: int = ALL_DIGITS
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Index pairs (A, B) into ``digits("all")``: disjoint real sets of size ``n`` (see top)."""
    generator = torch.Generator().manual_seed(seed)

    def take(half: torch.Tensor) -> torch.Tensor:
        if n <= len(half):
            return half[:n]
        extra = torch.randint(len(half), (n - len(half),), generator=generator)
        return torch.cat([half, half[extra]])

    pairs = []
    for _ in range(repeats):
        perm = torch.randperm(total, generator=generator)
        pairs.append((take(perm[: total // 2]), take(perm[total // 2 :])))
    return pairs


def _reference(size: int = SIZE) -> dict[str, torch.Tensor]:
    """Features of every real digit and the held-out memorisation baseline, for samples made
    at ``size``; computed once per size."""
    key = f"reference:{size}"
    if key not in _CACHE:
        model = load_classifier()
        real, train, held = (_round_trip(digits(split).images, size) for split in SPLITS)
        with torch.no_grad():
            features = model.features(real).double()
        held_dist = nearest_train_distance(held, train)
        _CACHE[key] = {
            "detail": detail(resize(digits("all").images, size)) if size != SIZE else 0.0,
            "features": features,
            "train_pixels": train,
            "heldout_distance": held_dist,
            "threshold": torch.quantile(held_dist, HELDOUT_QUANTILE),
        }
    return _CACHE[key]


def nearest_train_distance(images: torch.Tensor, train: torch.Tensor) -> torch.Tensor:
    """L2 distance (8x8 pixels in [-1, 1], float64) from each image to its nearest ``train``."""
    a, b = images.reshape(len(images), -1).double(), train.reshape(len(train), -1).double()
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist").min(1).values


@torch.no_grad()
def evaluate(samples: torch.Tensor, seed: int = 0) -> dict[str, Any]:
    """Score samples (N, 1|3, S, S) in [-1, 1]: digits FD and its floor, classes, memorisation.

    Samples made at S != 8 are compared with real digits taken through the same 8 -> S -> 8
    resizes (``_round_trip``), so the resizing blur is not charged to the model.
    """
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    x = to_digits(samples)
    n = len(x)
    if n < 2:
        raise UserError("need at least 2 samples to fit a Frechet distance")
    model, ref = load_classifier(), _reference(samples.shape[-1])
    feats = model.features(x)
    probs = F.softmax(model.head(feats), dim=1)
    real = ref["features"]
    pairs = real_pairs(n, seed, total=len(real))
    # one BLAS thread: on 64x64 matrices more threads only fight torch's for the cores (5x slower)
    with threadpool_limits(1, user_api="blas"):
        digits_fd = float(np.mean([frechet_distance(feats, real[b]) for _, b in pairs]))
        floor = float(np.mean([frechet_distance(real[a], real[b]) for a, b in pairs]))
    histogram = torch.bincount(probs.argmax(1), minlength=CLASSES).double() / n
    dist = nearest_train_distance(x, ref["train_pixels"])
    threshold = ref["threshold"]
    memorised = float((dist < threshold).double().mean())
    heldout_share = float((ref["heldout_distance"] < threshold).double().mean())
    # at S > 8: full-resolution detail beside that of real digits at S (1 = as real)
    detail_ratio = detail(samples) / ref["detail"] if ref["detail"] else None
    return {
        "n": n,
        "size": samples.shape[-1],
        "seed": seed,
        "repeats": REPEATS,
        "digits_fd": digits_fd,
        "floor": floor,
        "fd_ratio": digits_fd / floor if floor > 0 else float("inf"),
        "class_histogram": histogram.tolist(),
        "confidence": float(probs.max(1).values.mean()),
        "memorised_share": memorised,
        "heldout_share": heldout_share,
        "memorisation_threshold": float(threshold),
        "median_nearest_train": float(dist.median()),
        "heldout_median_nearest_train": float(ref["heldout_distance"].median()),
        "detail_ratio": detail_ratio,
        "checks": {
            "fd_within_3x_floor": digits_fd <= 3 * floor,
            "detail_within_1.5x_real": detail_ratio is None or detail_ratio <= 1.5,
            "classes_within_5_15_percent": bool(((histogram >= 0.05) & (histogram <= 0.15)).all()),
            "memorised_within_2x_heldout": memorised <= 2 * heldout_share,
        },
    }


def main(argv: list[str] | None = None) -> None:
    """``python -m diffplug.evaluate [--train]``: check (or retrain and ship) the weights."""
    parser = argparse.ArgumentParser(prog="python -m diffplug.evaluate", description=main.__doc__)
    parser.add_argument("--train", action="store_true", help="retrain and write the weights")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=WEIGHTS)
    args = parser.parse_args(argv)
    held = digits("heldout")
    if not args.train:
        acc = accuracy(load_classifier(args.output), held.images, held.labels)
        print(f"{args.output}: held-out accuracy {acc:.4f}")
        return
    start = time.perf_counter()
    model, acc = train_classifier(seed=args.seed)
    seconds = time.perf_counter() - start
    save_classifier(model, args.output, seed=args.seed, heldout_accuracy=f"{acc:.4f}")
    print(f"trained in {seconds:.1f} s; held-out accuracy {acc:.4f}; wrote {args.output}")


if __name__ == "__main__":
    main()
