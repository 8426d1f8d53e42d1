"""Train diffplug-emoji's subcategory classifier and write its shipped weights.

    OMP_NUM_THREADS=1 uv run python scripts/train_emoji_classifier.py

Trains ``diffplug_emoji.classifier.EmojiClassifier`` on the emoji's training split only
(3428 images, 99 subcategories) at 32x32, then measures it on the held-out split (358
images of base emoji it never saw, nor any of their skin tones) and writes
``plugins/emoji/src/diffplug_emoji/data/emoji-classifier.safetensors`` with how it was made
and what it measured in the metadata. Deterministic for a seed: one thread, one generator
for the initialisation, the order and the augmentation (shifts of up to 2 pixels with a
white border, horizontal flips); torch's global RNG is left as it was.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from diffplug.atomic import atomic_path
from diffplug_emoji.classifier import (
    FORMAT,
    SIZE,
    WEIGHTS,
    EmojiClassifier,
    labels,
    prepare,
    subcategories,
)
from diffplug_emoji.dataset import Emoji

SHIFT = 2


def split_data(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A split as the network sees it: (N, 3, 32, 32) in [-1, 1], and its labels."""
    return prepare(Emoji().images(split).float() / 255), labels(split)


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image shifted by up to ``SHIFT`` pixels each way (white fills in), and half of
    them mirrored: an emoji's subcategory survives both."""
    n = len(x)
    padded = F.pad(x, (SHIFT,) * 4, value=1.0)
    dy = torch.randint(0, 2 * SHIFT + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * SHIFT + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(SIZE))[:, None, :, None].expand(n, 3, SIZE, SIZE + 2 * SHIFT)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(SIZE))[:, None, None, :].expand(n, 3, SIZE, SIZE)
    out = out.gather(3, cols)
    flip = torch.rand(n, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)


@torch.no_grad()
def evaluate(model: EmojiClassifier, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Top-1 and top-5 accuracy of ``model`` (in eval mode) on (x, y)."""
    model.eval()
    logits = torch.cat([model(x[k : k + 512]) for k in range(0, len(x), 512)])
    top5 = logits.topk(5, dim=1).indices
    return {
        "accuracy": float((top5[:, 0] == y).float().mean()),
        "top5": float((top5 == y[:, None]).any(1).float().mean()),
    }


def train(
    seed: int = 0,
    epochs: int = 20,
    batch_size: int = 128,
    lr: float = 3e-3,
    width: int = 32,
    limit: int | None = None,
) -> tuple[EmojiClassifier, dict[str, Any]]:
    """Train on the training split (its first ``limit`` images, for tests); return the
    model (eval mode) and what it measured."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(seed, epochs, batch_size, lr, width, limit)
    finally:
        torch.set_num_threads(threads)


def _train(
    seed: int, epochs: int, batch_size: int, lr: float, width: int, limit: int | None
) -> tuple[EmojiClassifier, dict[str, Any]]:
    x, y = split_data("train")
    x, y = x[:limit], y[:limit]
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = EmojiClassifier(classes=len(subcategories()), width=width)
    steps = epochs * -(-len(x) // batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        for k in range(0, len(x), batch_size):
            idx = order[k : k + batch_size]
            with torch.random.fork_rng(devices=[]):  # dropout draws from the seeded stream
                torch.manual_seed(int(torch.randint(2**62, (), generator=generator)))
                loss = F.cross_entropy(model(augment(x[idx], generator)), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    seconds = time.perf_counter() - start
    held = evaluate(model, *split_data("heldout"))
    trained = evaluate(model, x, y)
    majority = float((labels("heldout") == torch.bincount(y).argmax()).float().mean())
    return model, {
        "seed": seed,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "width": width,
        "train_images": len(x),
        "seconds": round(seconds, 1),
        "heldout_accuracy": f"{held['accuracy']:.4f}",
        "heldout_top5": f"{held['top5']:.4f}",
        "train_accuracy": f"{trained['accuracy']:.4f}",
        "heldout_majority_baseline": f"{majority:.4f}",
    }


def save(model: EmojiClassifier, path: str | os.PathLike[str], info: dict[str, Any]) -> None:
    """The weights as safetensors (atomically), with the class names and ``info``."""
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    metadata = {
        "diffplug.format": FORMAT,
        "classes": json.dumps(list(subcategories())),
        "size": str(SIZE),
        **{k: str(v) for k, v in info.items()},
    }
    with atomic_path(path) as tmp:
        save_file(state, os.fspath(tmp), metadata=metadata)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--output", type=Path, default=Path(os.fspath(WEIGHTS)))
    args = parser.parse_args(argv)
    model, info = train(seed=args.seed, epochs=args.epochs, width=args.width)
    save(model, args.output, info)
    print(json.dumps(info, indent=2))
    print(f"wrote {args.output} ({args.output.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
