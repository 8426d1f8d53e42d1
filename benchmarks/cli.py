"""Wall time of whole CLI invocations, start-up included, in fresh processes."""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import machine, table, write_section

RUNS = 5


def wall(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "diffplug", *args], check=True, capture_output=True)
    return time.perf_counter() - start


def imports_torch(args: list[str]) -> bool:
    code = (
        "import sys\nfrom diffplug.cli import main\n"
        f"try:\n    main({args!r})\nexcept SystemExit:\n    pass\n"
        "sys.stderr.write(str('torch' in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return proc.stderr.strip().endswith("True")


def run() -> str:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "s.png")
        cases = {
            "diffplug --help": ["--help"],
            "diffplug plugins": ["plugins"],
            "diffplug list": ["list"],
            "diffplug run --sampler ddim (default model, 64 samples, 50 steps)": [
                "run", "--sampler", "ddim", "--num-samples", "64", "--steps", "50", "-q",
                "-o", out, "--overwrite",
            ],
        }  # fmt: skip
        for name, args in cases.items():
            times = [wall(args) for _ in range(RUNS)]
            rows.append([name, f"{statistics.median(times):.2f}", str(imports_torch(args))])
    return f"""## CLI wall time

Fresh `python -m diffplug` processes, start-up included, median of {RUNS}; {machine()}.
Targets: listing commands under 0.5 s without importing torch; `run` with the default model,
64 samples and 50 DDIM steps under 10 s.

{table(["command", "seconds", "imports torch"], rows)}
"""


if __name__ == "__main__":
    write_section("cli", run())
