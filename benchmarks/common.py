"""Shared helpers: timing medians and writing a section of docs/benchmarks.md."""

from __future__ import annotations

import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
HEADER = """# Benchmarks

Written by `uv run python benchmarks/run.py` (one section per benchmark, replaced in place when
that benchmark is re-run: `uv run python benchmarks/run.py training`). Every number below was
measured by that command on the machine named in its section; ratios are measured in one
process, so they compare like with like.
"""


def machine() -> str:
    threads = torch.get_num_threads()
    return f"{platform.processor() or platform.machine()}, {threads} torch threads, torch {torch.__version__}"


def median_time(
    fn: Callable[[], object], repeats: int = 7, warmup: int = 1, min_seconds: float = 0.05
) -> float:
    """Median seconds per call over ``repeats`` timings; each timing loops ``fn`` enough times
    to last ``min_seconds``, so millisecond calls are not timer and scheduler noise."""
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    fn()
    inner = max(1, int(min_seconds / max(time.perf_counter() - start, 1e-9)))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - start) / inner)
    return statistics.median(times)


def write_section(name: str, body: str, doc: Path = DOC) -> None:
    """Replace (or append) the section ``name`` of ``doc`` (docs/benchmarks.md)."""
    text = doc.read_text() if doc.exists() else HEADER
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    block = f"{begin}\n{body.strip()}\n{end}"
    if begin in text:
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.write_text(text)


def table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
