"""Every installed sampler on every shipped model: samples scored, or the refusal's reason.

The table in docs/benchmarks.md (and docs/concepts.md's summary) comes from here;
``tests/test_matrix.py`` runs the same cells with the bounds the docs state.
"""

from __future__ import annotations

from benchmarks.common import machine, table
from diffplug.testing.matrix import cells, run_cell

N, STEPS = 200, 20


def run() -> str:
    rows = []
    for sampler, model in cells():
        cell = run_cell(sampler, model, n=N, steps=STEPS)
        if cell.refused:
            rows.append([sampler, model, cell.conditioning, cell.space, "refused: " + cell.refused,
                         "", "", ""])  # fmt: skip
        else:
            acc = "" if cell.accuracy is None else f"{100 * cell.accuracy:.0f}%"
            detail = "" if cell.detail_ratio is None else f"{cell.detail_ratio:.2f}"
            rows.append([sampler, model, cell.conditioning, cell.space, f"{cell.digits_fd:.1f}",
                         f"{cell.fd_ratio:.2f}", detail, acc])  # fmt: skip
        print(rows[-1], flush=True)
    return "\n\n".join([
        f"### Sampler x model matrix ({machine()})",
        f"{N} samples per cell, {STEPS} steps, each model conditioned as it was trained (text "
        "models: \"a handwritten <digit>\" cycling through the digits, at the model's recorded "
        "guidance; super-resolution models: the held-out real digits, 8x8). FD ratio = digits FD "
        f"/ the real-vs-real floor at {N} samples; detail = what an 8x8 round trip removes from "
        "a sample larger than 8x8, over the same for real digits (noise a sampler leaves at "
        "full resolution, which the 8x8 FD cannot see); accuracy = share showing the prompt's "
        "digit. Bounds (`tests/test_matrix.py`): FD / floor <= 3 (12 for the mixture oracle), "
        "detail <= 1.5, accuracy >= 80%.",
        table(["sampler", "model", "conditioning", "space", "digits FD", "FD / floor",
               "detail", "accuracy"], rows),
    ])  # fmt: skip


if __name__ == "__main__":
    from benchmarks.common import write_section

    write_section("matrix", run())
