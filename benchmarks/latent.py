"""Text to digits in a VAE's latents (`imagen-latent-digits`): guidance against fidelity.

500 samples per row (50 per digit, "a handwritten <digit>"), 50 steps, decoded by the recorded
autoencoder and scored on the 32x32 images: digits FD against real digits through the same
resizes, the share the classifier reads as the prompted digit, and memorisation. Each row is
one cell of the matrix (``diffplug.testing.matrix.run_cell``) at another guidance weight.
"""

from __future__ import annotations

from benchmarks.common import machine, table
from diffplug.checkpoint import read_metadata
from diffplug.evaluate import HELDOUT_QUANTILE
from diffplug.registry import default_registry
from diffplug.testing.matrix import run_cell

MODEL, N, STEPS = "imagen-latent-digits", 500, 50
#: (sampler, guidance); None is the weight the checkpoint records
ROWS = [("ddim", 1.0), ("ddim", None), ("ddim", 3.0), ("ddpm", None)]


def run() -> str:
    recorded = read_metadata(default_registry().get("pretrained", MODEL).load())["extra"]
    rows, floor = [], None
    for sampler, guidance in ROWS:
        cell = run_cell(sampler, MODEL, n=N, steps=STEPS, guidance=guidance)
        assert cell.refused is None, cell.refused
        assert cell.accuracy is not None and cell.memorised is not None
        floor = cell.floor
        weight = f"{recorded['guidance']:g} (recorded)" if guidance is None else f"{guidance:g}"
        rows.append([sampler, weight, f"{cell.digits_fd:.2f}", f"{100 * cell.accuracy:.1f}%",
                     f"{100 * cell.memorised:.1f}%", f"{cell.detail_ratio:.2f}"])  # fmt: skip
        print(rows[-1], flush=True)
    return "\n\n".join([
        f"### Text to digits in latents: `{MODEL}` ({machine()})",
        f"{N} samples per row (50 per digit, \"a handwritten <digit>\"), {STEPS} steps, decoded "
        f"by `vae-digits`; digits FD floor {floor:.2f} at {N} samples; memorised: share nearer a "
        f"training digit than the held-out digits' {100 * HELDOUT_QUANTILE:.0f}% quantile (by "
        "construction about that share of held-out digits); detail: full-resolution detail over "
        "real digits'.",
        table(["sampler", "guidance", "digits FD", "prompted digit", "memorised", "detail"],
              rows),  # fmt: skip
    ])  # fmt: skip


if __name__ == "__main__":
    from benchmarks.common import write_section

    write_section("latent", run())
