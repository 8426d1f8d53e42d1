"""Ablation: the digits cascade's super-resolution stage trained with and without
noise-conditioning augmentation, both fed the base model's samples.

500 base samples (50 per digit, "a handwritten <digit>", the cascade's default guidance and
thresholding) are super-resolved 8 -> 32 by each SR model; the final images are scored by
digits FD and by class accuracy against the prompt's digit. The augmented model is tried at
fixed levels and with the best-of sweep; the control model (trained on clean conditions,
``--max-level 0``) at level 0, the only level it has seen. Real held-out digits as conditions
give each model's ceiling.

Models default to the shipped ones; ``SR_AUG`` / ``SR_CLEAN`` / ``IMAGEN_BASE`` name others.
"""

from __future__ import annotations

import os

import torch

from benchmarks.common import ROOT, machine, table
from diffplug.data import digits
from diffplug.evaluate import classify, evaluate
from diffplug.pipeline import StageSpec, run_stage
from diffplug_imagen.cascade import CascadeConfig
from diffplug_imagen.text import WORDS

BASE = os.environ.get("IMAGEN_BASE", "imagen-digits-base")
SR_AUG = os.environ.get("SR_AUG", "imagen-digits-sr")
SR_CLEAN = os.environ.get("SR_CLEAN", "imagen-digits-sr-noaug")
N_PER_DIGIT = 50
SR_STEPS = 25
SETTINGS = [
    ("augmented", SR_AUG, {"level": 0.0}),
    ("augmented", SR_AUG, {"level": 0.1}),
    ("augmented", SR_AUG, {"level": 0.2}),
    ("augmented", SR_AUG, {"level": 0.3}),
    ("augmented", SR_AUG, {"level": 0.2, "sweep": [0.0, 0.1, 0.2, 0.3]}),
    ("clean (control)", SR_CLEAN, {"level": 0.0}),
]
CPU = torch.device("cpu")


def accuracy(images: torch.Tensor, labels: torch.Tensor) -> float:
    return float((classify(images) == labels).float().mean())


def base_samples() -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.arange(10).repeat_interleave(N_PER_DIGIT)
    prompts = [f"a handwritten {WORDS[int(d)]}" for d in labels]
    defaults = CascadeConfig()
    spec = StageSpec(BASE, defaults.base_sampler, defaults.base_steps, defaults.guidance)
    images = run_stage(spec, seeds=list(range(len(prompts))), conditions=prompts,
                       batch_size=500, device=CPU).images  # fmt: skip
    return images, labels


def super_resolve(model: str, options: dict, conditions: torch.Tensor) -> torch.Tensor:
    sampler = CascadeConfig().sr_samplers[0]
    # each stage thresholded as its model records (the cascade's default)
    spec = StageSpec(model, sampler, SR_STEPS, 1.0, conditioner_options=options)
    return run_stage(spec, seeds=list(range(10_000, 10_000 + len(conditions))),
                     conditions=list(conditions), batch_size=250, device=CPU).images  # fmt: skip


def run() -> str:
    low, labels = base_samples()
    real = digits("heldout", 8)
    rows, bars = [], []
    base_acc = accuracy(low, labels)
    base_fd = evaluate(low)["digits_fd"]
    for name, model, options in SETTINGS:
        out = super_resolve(model, options, low)
        acc, fd = accuracy(out, labels), evaluate(out)["digits_fd"]
        level = "sweep 0-0.3" if "sweep" in options else f"{options['level']:g}"
        rows.append([name, level, f"{fd:.2f}", f"{100 * acc:.1f}%"])
        bars.append((f"{name.split()[0]}\n{level}", fd, acc))
    ceiling = []
    for name, model in (("augmented", SR_AUG), ("clean (control)", SR_CLEAN)):
        out = super_resolve(model, {"level": 0.0}, real.images)
        ceiling.append([name, f"{evaluate(out)['digits_fd']:.2f}",
                        f"{100 * accuracy(out, real.labels):.1f}%"])  # fmt: skip
    plot(bars, base_fd)
    return "\n\n".join([
        f"### Noise-conditioning augmentation ablation ({machine()})",
        f"Base stage `{BASE}` (500 samples, 50 per digit, \"a handwritten <digit>\"): "
        f"8x8 digits FD {base_fd:.2f}, accuracy {100 * base_acc:.1f}%. Each row "
        f"super-resolves those same 500 samples to 32x32 ({CascadeConfig().sr_samplers[0]} "
        f"{SR_STEPS} steps, each stage's recorded thresholding); FD and accuracy are of the "
        "final images.",
        table(["SR stage trained", "sampling level", "digits FD", "class accuracy"], rows),
        "![ablation](noise-aug.png)",
        "Ceiling: the same SR stages conditioned on the 300 real held-out digits (level 0):",
        table(["SR stage trained", "digits FD", "class accuracy"], ceiling),
        "The same stages on 200 base samples (level 0, DDPM 25 steps) when the condition does "
        "or does not take the training images' path:",
        table(["conditions", "augmented stage FD", "clean stage FD", "accuracy (aug / clean)"],
              mismatch()),
    ])  # fmt: skip


def mismatch() -> list[list[object]]:
    """Both stages fed 200 sharp base samples (20 per digit) at level 0, with the conditions
    shrunk directly (``image_size`` 0, the mismatch) or through the training images' path."""
    labels = torch.arange(10).repeat_interleave(20)
    prompts = [f"a handwritten {WORDS[int(d)]}" for d in labels]
    low = run_stage(StageSpec(BASE, "ddim", 50, 3.0), seeds=list(range(200)),
                    conditions=prompts, batch_size=200, device=CPU).images  # fmt: skip
    rows = []
    for size, name in ((0, "sharp 8x8, shrunk directly (mismatched)"),
                       (32, "through the training images' path (image_size 32)")):  # fmt: skip
        fds, accs = [], []
        for model in (SR_AUG, SR_CLEAN):
            spec = StageSpec(model, "ddpm", SR_STEPS, 1.0,
                             conditioner_options={"level": 0.0, "image_size": size})  # fmt: skip
            out = run_stage(spec, seeds=list(range(10_000, 10_200)), conditions=list(low),
                            batch_size=200, device=CPU).images  # fmt: skip
            fds.append(f"{evaluate(out)['digits_fd']:.1f}")
            accs.append(f"{100 * accuracy(out, labels):.0f}%")
        rows.append([name, *fds, " / ".join(accs)])
    return rows


def plot(bars: list, base_fd: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    names = [b[0] for b in bars]
    colours = ["C0" if n.startswith("augmented") else "C1" for n in names]
    axes[0].bar(names, [b[1] for b in bars], color=colours)
    axes[0].axhline(base_fd, color="grey", ls="--", label="base samples (8x8)")
    axes[0].set(title="digits FD of the 32x32 outputs (lower is better)")
    axes[0].legend()
    axes[1].bar(names, [100 * b[2] for b in bars], color=colours)
    axes[1].set(title="class accuracy (%)", ylim=(0, 100))
    for ax in axes:
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / "noise-aug.png", dpi=90)


if __name__ == "__main__":
    from benchmarks.common import write_section

    write_section("noise_aug", run())
