"""The text-to-emoji cascade (`imagen-emoji`): does a prompt give the emoji it names?

Prompts are each emoji's plainest caption ("an emoji of a red apple", "the flag of Japan"):
``N_TRAIN`` emoji of the training split (drawn once, seeded) and every held-out emoji (whose
images the model never saw, though it saw their words in other captions). Each prompt is
sampled once through the whole cascade at its defaults (base 16x16, super-resolution to
32x32) and scored at 32x32:

- subcategory accuracy: the share of samples the emoji classifier (``diffplug_emoji.
  classifier``, trained on the training split only) puts in the prompt's subcategory, top-1
  and top-5, beside the same classifier on the real emoji of those prompts (its ceiling);
- named: the share of samples whose nearest emoji of the split (in the classifier's
  features) is the prompted one or one of its skin-tone variants, and among the nearest 10;
  a sample a person would name correctly should land on its own emoji;
- FD in the classifier's 128-d features against the held-out emoji, beside the FD of as many
  real training emoji (for scale, not a floor: the held-out prompts name the held-out emoji);
- memorisation: the share of samples nearer (L2, 32x32 pixels) to some training emoji than
  90% of held-out emoji are to theirs (held-out emoji score 10% by construction).

Also writes docs/img/emoji-cascade.png, the README's picture. ``EMOJI_BASE`` and
``EMOJI_SR`` name other models (e.g. a run's model.safetensors).
"""

from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F

from benchmarks.common import ROOT, machine, table
from diffplug.evaluate import frechet_distance
from diffplug.output import grid, to_pil
from diffplug_emoji.classifier import classify, labels, load_classifier, prepare, subcategories
from diffplug_emoji.dataset import Emoji
from diffplug_imagen.cascade import EmojiCascade, EmojiCascadeConfig

#: the page whose "emoji" section this benchmark writes
DOC = ROOT / "docs" / "models.md"
N_TRAIN = int(os.environ.get("EMOJI_N", "256"))
BASE = os.environ.get("EMOJI_BASE", "imagen-emoji-base")
SR = os.environ.get("EMOJI_SR", "imagen-emoji-sr")
SIZE = 32
CPU = torch.device("cpu")
PICTURE = ROOT / "docs" / "img" / "emoji-cascade.png"
#: the README's prompts: each row of the picture is one prompt, four seeds
SHOWN = ["an emoji of a red apple", "the flag of Japan", "an emoji of a smiling face with sunglasses",
         "an emoji of a grinning face", "an emoji of a heavy black heart", "an emoji of a pile of poo",
         "an emoji of a rocket", "an emoji of a banana"]  # fmt: skip


def real(split: str) -> torch.Tensor:
    """A split's emoji at 32x32 in [0, 1], as the cascade's output size."""
    x = Emoji().images(split).float() / 255
    return F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False,
                         antialias=True)  # fmt: skip


def prompts(split: str, index: torch.Tensor) -> list[str]:
    records = Emoji().records(split)
    return [records[int(i)]["captions"][0] for i in index]


def cascade(texts: list[str], seeds: list[int], **options: object) -> torch.Tensor:
    """The cascade's final images in [0, 1]."""
    config = EmojiCascadeConfig(base_model=BASE, sr_models=[SR], **options)  # type: ignore[arg-type]
    stages = EmojiCascade(config).run(prompts=texts, seeds=seeds, batch_size=256, device=CPU)
    return (stages[-1].images.clamp(-1, 1) + 1) / 2


@torch.no_grad()
def features(images: torch.Tensor) -> torch.Tensor:
    return load_classifier().features(prepare(images)).double()


def nearest(images: torch.Tensor, train: torch.Tensor) -> torch.Tensor:
    a, b = images.reshape(len(images), -1).double(), train.reshape(len(train), -1).double()
    return torch.cdist(a, b).min(1).values


def named(samples: torch.Tensor, split: str, index: torch.Tensor, reals: torch.Tensor) -> list[str]:
    """Shares of samples whose nearest 1 and 10 emoji of ``split`` include the prompted one."""
    bases = [r["base"] for r in Emoji().records(split)]
    closest = torch.cdist(features(samples), features(reals)).topk(10, largest=False).indices
    wanted = [bases[int(i)] for i in index]
    hits = [[bases[int(j)] == want for j in row] for row, want in zip(closest, wanted, strict=True)]
    chance = sum(bases.count(w) for w in wanted) / len(wanted) / len(bases)
    return [f"{100 * sum(h[0] for h in hits) / len(hits):.1f}% (chance {100 * chance:.2f}%)",
            f"{100 * sum(any(h) for h in hits) / len(hits):.1f}%"]  # fmt: skip


def score(samples: torch.Tensor, truth: torch.Tensor, reals: torch.Tensor) -> list[str]:
    top1, probs = classify(samples)
    top5 = probs.topk(5, dim=1).indices
    real_top1, _ = classify(reals)
    return [f"{100 * (top1 == truth).float().mean():.1f}%",
            f"{100 * (top5 == truth[:, None]).any(1).float().mean():.1f}%",
            f"{100 * (real_top1 == truth).float().mean():.1f}%"]  # fmt: skip


def picture(per_prompt: int = 4, cell: int = 96) -> None:
    """One row per prompt of ``SHOWN``: its text, then ``per_prompt`` samples (seeds 0..)."""
    from PIL import Image, ImageDraw

    texts = [p for p in SHOWN for _ in range(per_prompt)]
    images = cascade(texts, list(range(len(texts))))
    cells = to_pil(grid(images, ncols=per_prompt, min_cell=cell))
    label = 300
    sheet = Image.new("RGB", (label + cells.width, cells.height), "white")
    sheet.paste(cells, (label, 0))
    draw = ImageDraw.Draw(sheet)
    step = (cells.height - 2) / len(SHOWN)
    for row, text in enumerate(SHOWN):
        draw.text((8, int(2 + row * step + step / 2 - 6)), text, fill="black")
    sheet.save(PICTURE)


def run() -> str:
    g = torch.Generator().manual_seed(0)
    train_index = torch.randperm(len(Emoji().records("train")), generator=g)[:N_TRAIN]
    held_index = torch.arange(len(Emoji().records("heldout")))
    train_real, held_real = real("train"), real("heldout")
    rows, samples = [], {}
    for split, index, reals in (("train", train_index, train_real),
                                ("heldout", held_index, held_real)):  # fmt: skip
        texts = prompts(split, index)
        start = time.perf_counter()
        samples[split] = cascade(texts, list(range(len(texts))))
        seconds = (time.perf_counter() - start) / len(texts)
        truth = labels(split)[index]
        rows.append([f"{split} prompts", len(texts), *score(samples[split], truth, reals[index]),
                     *named(samples[split], split, index, reals), f"{seconds:.2f} s"])  # fmt: skip
    held_feats = features(held_real)
    both = torch.cat(list(samples.values()))
    fd = frechet_distance(features(both), held_feats)
    scale_index = torch.randperm(len(train_real), generator=g)[: len(both)]
    training_fd = frechet_distance(features(train_real[scale_index]), held_feats)
    baseline = torch.quantile(nearest(held_real, train_real), 0.10)
    memorised = float((nearest(both, train_real) < baseline).double().mean())
    picture()
    return "\n".join([
        f"Measured on {machine()}; the cascade at its defaults (`diffplug run --pipeline "
        f"imagen-emoji`), one sample per prompt, seeds 0..n-1.",
        "",
        table(["prompts", "samples", "subcategory top-1", "top-5", "real emoji top-1",
               "named (nearest emoji)", "among nearest 10", "s/sample"], rows),  # fmt: skip
        "",
        f"- FD in the emoji classifier's features against the {len(held_real)} held-out emoji: "
        f"**{fd:.1f}** for the {len(both)} samples; for scale, {len(both)} real training emoji "
        f"score {training_fd:.1f} (not a floor: {len(held_real)} of the samples are prompted "
        "with the held-out emoji's own captions, which the training emoji do not show).",
        f"- memorisation: {100 * memorised:.1f}% of samples are nearer a training emoji than "
        "90% of held-out emoji are (held-out emoji: 10%).",
        f"- {len(subcategories())} subcategories; chance is about 1%.",
        "",
        "![the text-to-emoji cascade](img/emoji-cascade.png)",
    ])  # fmt: skip


if __name__ == "__main__":
    print(run())
