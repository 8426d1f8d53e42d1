"""img2img and inpainting on the shipped digits models: how often the init's class survives.

All 300 held-out digits, one sample each (seeds from 0). img2img at strength 0.3 (and DDIM at
0.2); inpainting regenerates the lower half (rows 4-7 of 8) and keeps the upper half, which
must come back within 1/255. The class is the in-repo digits classifier's. Writes the
"generation" section of docs/generation.md.
"""

from __future__ import annotations

import torch

import diffplug
from benchmarks.common import ROOT, machine, table
from diffplug.data import digits
from diffplug.evaluate import classify

DOC = ROOT / "docs" / "generation.md"
DETERMINISTIC = {"deterministic": True}
#: (sampler, model, steps, strength, sampler options)
IMG2IMG = [("adm", "adm-digits", 10, 0.3, {}), ("adm", "adm-digits", 10, 0.3, DETERMINISTIC),
           ("ddim", "ddpm-digits", 10, 0.3, {}), ("ddim", "ddpm-digits", 50, 0.3, {}),
           ("ddim", "ddpm-digits", 50, 0.2, {})]  # fmt: skip
#: (sampler, model, steps, repaint)
INPAINT = [("ddim", "ddpm-digits", 50, 0), ("ddim", "ddpm-digits", 50, 4),
           ("ddpm", "ddpm-digits", 50, 4), ("ddpm", "ddpm-digits", 50, 9),
           ("adm", "adm-digits", 10, 0),
           ("adm", "adm-digits", 10, 4)]  # fmt: skip


def run() -> str:
    held = digits("heldout", 8)
    real, labels = ((held.images + 1) / 2).clamp(0, 1), held.labels
    lower = torch.zeros(1, 8, 8)
    lower[:, 4:] = 1
    rows = []
    for sampler, model, steps, strength, options in IMG2IMG:
        run_ = diffplug.load(sampler=sampler, model=model, steps=steps, **options)
        out = run_.sample(len(real), seed=0, init=real, strength=strength, progress=False).tensor
        kept = (classify(out * 2 - 1) == labels).float().mean()
        flags = "".join(f" --{k}" for k in options)
        rows.append(["img2img", f"`{sampler}{flags}` on `{model}`, {steps} steps",
                     f"strength {strength:g}", "-", f"{100 * kept:.1f}%"])  # fmt: skip
    for sampler, model, steps, repaint in INPAINT:
        run_ = diffplug.load(sampler=sampler, model=model, steps=steps)
        out = run_.sample(len(real), seed=0, init=real, mask=lower, repaint=repaint,
                          progress=False).tensor  # fmt: skip
        known = float((out[..., :4, :] - real[..., :4, :]).abs().max()) * 255
        kept = (classify(out * 2 - 1) == labels).float().mean()
        rows.append(["inpainting", f"`{sampler}` on `{model}`, {steps} steps",
                     f"repaint {repaint}", f"{known:.2f}/255", f"{100 * kept:.1f}%"])  # fmt: skip
    return "\n".join([
        f"Measured on {machine()}, all 300 held-out digits, "
        "`uv run python benchmarks/run.py generation`:",
        "",
        table(["mode", "sampler and model", "setting", "known half, max error",
               "class kept"], rows),  # fmt: skip
        "",
        f"How far the upper half fixes the class: the training digit whose upper half is "
        f"nearest has the held-out digit's label in {100 * upper_half_ceiling():.1f}%.",
    ])  # fmt: skip


def upper_half_ceiling() -> float:
    """The share of held-out digits whose nearest training digit by the upper half alone
    (L2, rows 0-3) has the same label: about what any completion of the lower half can keep."""
    train, held = digits("train", 8), digits("heldout", 8)
    up = [d.images[..., :4, :].reshape(len(d), -1) for d in (train, held)]
    nearest = torch.cdist(up[1], up[0]).argmin(1)
    return float((train.labels[nearest] == held.labels).float().mean())
