"""Run every benchmark (or the ones named) and rewrite their sections of docs/benchmarks.md.

uv run python benchmarks/run.py            # all
uv run python benchmarks/run.py training   # one
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import write_section  # noqa: E402

ALL = [
    "loop",
    "quality",
    "training",
    "cli",
    "memory",
    "gpu",
    "imagen",
    "noise_aug",
    "vae",
    "latent",
    "matrix",
]


def main(names: list[str]) -> None:
    for name in names or ALL:
        if name not in ALL:
            sys.exit(f"unknown benchmark {name!r}; choose from {', '.join(ALL)}")
        print(f"running {name}...", file=sys.stderr)
        body = importlib.import_module(f"benchmarks.{name}").run()
        write_section(name, body)
        print(body)


if __name__ == "__main__":
    main(sys.argv[1:])
