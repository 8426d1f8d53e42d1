"""Every installed sampler on every shipped digits model: samples scored, or the refusal's reason.

The table in docs/benchmarks.md (linked from docs/concepts.md) comes from here;
``tests/test_matrix.py`` runs the same cells with the bounds the docs state.
"""

from __future__ import annotations

import time

from benchmarks.common import machine, table
from diffplug.registry import default_registry
from diffplug.testing.matrix import Cell, cells, run_cell

N, STEPS = 200, 20


def score(cell: Cell) -> str:
    """FD / floor, then detail (models above 8x8) and accuracy (text models) where measured."""
    parts = [f"{cell.fd_ratio:.2f}"]
    if cell.detail_ratio is not None:
        parts.append(f"d {cell.detail_ratio:.2f}")
    if cell.accuracy is not None:
        parts.append(f"{100 * cell.accuracy:.0f}%")
    return ", ".join(parts)


def run() -> str:
    samplers = default_registry().names("scheduler")
    results: dict[tuple[str, str], dict[str, Cell]] = {}
    reasons: dict[str, int] = {}  # refusal text -> footnote number (one per distinct reason)
    start = time.perf_counter()
    for sampler, model, mode in cells():
        cell = run_cell(sampler, model, mode, n=N, steps=STEPS)
        results.setdefault((model, mode), {})[sampler] = cell
        print(cell, flush=True)
    minutes = (time.perf_counter() - start) / 60
    rows = []
    for (model, mode), by_sampler in results.items():
        first = next(iter(by_sampler.values()))
        row: list[object] = [f"`{model}`", first.conditioning, first.space, mode]
        for sampler in samplers:
            cell = by_sampler[sampler]
            if cell.refused:
                number = reasons.setdefault(cell.refused, len(reasons) + 1)
                row.append(f"refused ({number})")
            else:
                row.append(score(cell))
        rows.append(row)
    sampled = sum(not c.refused for row in results.values() for c in row.values())
    total = sum(len(row) for row in results.values())
    notes = "\n".join(f"{k}. {reason}" for reason, k in reasons.items())
    return "\n\n".join([
        f"### Sampler x model matrix ({machine()})",
        f"Every installed sampler x every shipped digits model x {{unconditional, conditional}}: "
        f"{sampled} of {total} cells sample, the rest are refused before the first step "
        f"({N} samples per cell, {STEPS} steps, {minutes:.0f} minutes in all: "
        "`uv run python benchmarks/run.py matrix`). A conditional cell conditions the model as "
        "it was trained (text models: \"a handwritten <digit>\" cycling through the digits at "
        "the model's recorded guidance; super-resolution models: the held-out real digits at "
        "8x8) and gives an unconditional model core's `lowres` image conditioner; an "
        "unconditional cell gives no conditioner. Latent models are decoded by their recorded "
        "autoencoder; a sampler of another process is bridged (see concepts).",
        "Each cell: digits FD / the real-vs-real floor at the same number of samples; `d`: "
        "detail, what an 8x8 round trip removes from a sample larger than 8x8 over the same "
        "for real digits (noise left at full resolution, which the 8x8 FD cannot see); a "
        "percentage: share of samples the classifier reads as the prompted digit. "
        "`tests/test_matrix.py` runs every cell at 100 samples and asserts FD / floor <= 3 "
        "(6 for the mixture oracle, which is not digits), detail <= 1.5, accuracy >= 80%, "
        "or a refusal with its reason before the first step.",
        table(["model", "takes", "space", "cell", *samplers], rows),
        "Refusals, as core words them:\n\n" + notes if notes else "No cell is refused.",
    ])  # fmt: skip


if __name__ == "__main__":
    from benchmarks.common import write_section

    write_section("matrix", run())
