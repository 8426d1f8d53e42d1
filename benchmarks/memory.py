"""Peak resident memory of `diffplug run` with the default model, in a fresh process."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import machine, table, write_section

CODE = """
import resource, sys
from diffplug.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
"""


def peak_mib(args: list[str]) -> float:
    proc = subprocess.run(
        [sys.executable, "-c", CODE, *args], capture_output=True, text=True, check=True
    )
    return int(proc.stderr.strip().splitlines()[-1]) / 1024


def run() -> str:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (16, 64, 1000):
            args = ["run", "--sampler", "ddim", "--num-samples", str(n), "--steps", "50", "-q",
                    "-o", str(Path(tmp) / "x.png"), "--overwrite"]  # fmt: skip
            rows.append([f"diffplug run --sampler ddim --num-samples {n}", f"{peak_mib(args):.0f}"])
        rows.append(["python -c 'import torch' (baseline)", f"{_torch_only():.0f}"])
    return f"""## Peak memory

Peak resident set size (ru_maxrss) of a fresh process, default model (`ddpm-digits`), 50
DDIM steps, batch size 64; {machine()}. Most of it is the torch runtime itself.

{table(["command", "peak MiB"], rows)}
"""


def _torch_only() -> float:
    code = "import resource, sys, torch; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(proc.stderr.strip().splitlines()[-1]) / 1024


if __name__ == "__main__":
    write_section("memory", run())
