"""The text-to-digits cascade: guidance and thresholding sweep, and the end-to-end target.

1. Base stage alone (8x8): for every digit and the four phrasings "7", "seven",
   "a handwritten seven", "the digit 7", 10 samples each (400 per setting), at guidance
   1, 3, 5, 8, with no, static and dynamic thresholding (dynamic at the base model's recorded
   percentile). Class accuracy is the share the in-repo
   digits classifier assigns to the prompt's digit; digits FD is of all 400 (class-balanced).
2. The whole cascade at its defaults (base + super-resolution to 32x32): accuracy of 200
   samples of "a handwritten seven" (target >= 90% classified as 7) and of all ten digits.

Models default to the shipped ones; ``IMAGEN_BASE`` / ``IMAGEN_SR`` name others.
"""

from __future__ import annotations

import os

import torch

from benchmarks.common import ROOT, machine, table
from diffplug.evaluate import classify, evaluate
from diffplug.pipeline import StageSpec, run_stage
from diffplug_imagen.cascade import Cascade, CascadeConfig
from diffplug_imagen.text import WORDS

PHRASINGS = ["{n}", "{w}", "a handwritten {w}", "the digit {n}"]
GUIDANCE = [1.0, 3.0, 5.0, 8.0]
PER_CELL = 10
BASE = os.environ.get("IMAGEN_BASE", "imagen-digits-base")
SR = os.environ.get("IMAGEN_SR", "imagen-digits-sr")


def prompts_and_labels() -> tuple[list[str], torch.Tensor]:
    prompts, labels = [], []
    for phrasing in PHRASINGS:
        for d in range(10):
            prompts += [phrasing.format(n=d, w=WORDS[d])] * PER_CELL
            labels += [d] * PER_CELL
    return prompts, torch.tensor(labels)


def sweep() -> tuple[list[list[object]], dict]:
    prompts, labels = prompts_and_labels()
    seeds = list(range(len(prompts)))
    rows, curves = [], {}
    for threshold in ("none", "static", "dynamic"):
        for w in GUIDANCE:
            spec = StageSpec(BASE, "ddim", 50, w, threshold)
            images = run_stage(spec, seeds=seeds, conditions=prompts, batch_size=500,
                               device=torch.device("cpu")).images  # fmt: skip
            hit = classify(images) == labels
            per_phrasing = hit.view(len(PHRASINGS), -1).float().mean(1)
            sevens = hit[(labels == 7) & (torch.arange(len(labels)) // (10 * PER_CELL) == 2)]
            fd = evaluate(images)["digits_fd"]
            rows.append([threshold, f"{w:g}", *(f"{100 * a:.1f}%" for a in per_phrasing),
                         f"{100 * hit.float().mean():.1f}%", f"{100 * sevens.float().mean():.0f}%",
                         f"{fd:.2f}"])  # fmt: skip
            curves.setdefault(threshold, []).append((w, float(hit.float().mean()), fd))
    return rows, curves


def cascade_target() -> list[list[object]]:
    cascade = Cascade(CascadeConfig(base_model=BASE, sr_models=[SR]))
    rows = []
    for name, prompts in (
        ("a handwritten seven", ["a handwritten seven"] * 200),
        ("all ten digits", [f"a handwritten {WORDS[d]}" for d in range(10) for _ in range(20)]),
    ):
        labels = (
            torch.tensor([7] * 200)
            if name.endswith("seven")
            else torch.arange(10).repeat_interleave(20)
        )
        stages = cascade.run(prompts=prompts, seeds=list(range(200)), batch_size=200,
                             device=torch.device("cpu"))  # fmt: skip
        base_acc = (classify(stages[0].images) == labels).float().mean()
        final_acc = (classify(stages[-1].images) == labels).float().mean()
        # FD against all ten classes means nothing for one prompt's samples
        fd = "-" if name.endswith("seven") else f"{evaluate(stages[-1].images)['digits_fd']:.2f}"
        rows.append([name, f"{100 * base_acc:.1f}%", f"{100 * final_acc:.1f}%", fd])
    return rows


def plot(curves: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for threshold, points in curves.items():
        w, acc, fd = zip(*points, strict=True)
        axes[0].plot(w, [100 * a for a in acc], marker="o", label=f"threshold {threshold}")
        axes[1].plot(w, fd, marker="o", label=f"threshold {threshold}")
    axes[0].set(title=f"class accuracy ({40 * PER_CELL} prompts)", xlabel="guidance w", ylabel="%")
    axes[1].set(title="digits FD (lower is better)", xlabel="guidance w")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / "imagen-guidance.png", dpi=90)


def recorded_thresholding(model: str) -> str:
    """A stage's thresholding at the cascade's defaults, as ``run`` resolves it."""
    import diffplug

    probe = diffplug.load(model=model, sampler="ddim", steps=1, device="cpu")
    if probe.threshold == "dynamic":
        return f"dynamic, p = {probe.percentile:g}"
    return probe.threshold


def run() -> str:
    rows, curves = sweep()
    plot(curves)
    header = ["threshold", "guidance", *[f'"{p.format(n=7, w="seven")}"' for p in PHRASINGS],
              "all", 'its 7s: "a handwritten seven"', "digits FD"]  # fmt: skip
    cascade = cascade_target()
    return "\n\n".join([
        f"### Imagen cascade ({machine()})",
        f"Base stage `{BASE}` alone, DDIM 50 steps, {40 * PER_CELL} prompts per row (each digit "
        f"in four phrasings, {PER_CELL} seeds each; the phrasing columns show the 7's phrasing but average over "
        "all ten digits). Accuracy: the in-repo classifier agrees with the prompt's digit.",
        table(header, rows),
        "![guidance sweep](imagen-guidance.png)",
        f"Whole cascade at its defaults (`{BASE}` then `{SR}`, "
        f"guidance {CascadeConfig().guidance:g}; thresholding as each model records it: base "
        f"{recorded_thresholding(BASE)}, super-resolution {recorded_thresholding(SR)}), 200 "
        "samples each:",
        table(["prompt", "base accuracy", "final (32x32) accuracy", "final digits FD"], cascade),
    ])  # fmt: skip


if __name__ == "__main__":
    from benchmarks.common import write_section

    write_section("imagen", run())
