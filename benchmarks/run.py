"""Run every benchmark (or the ones named) and rewrite their sections of docs/benchmarks.md
(or of the page a benchmark names as its ``DOC``, as claims writes docs/claims.md).

uv run python benchmarks/run.py            # all
uv run python benchmarks/run.py training   # one
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import DOC, write_section  # noqa: E402

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
    "claims",
    "emoji",
    "generation",
    "sd",
]


def main(names: list[str]) -> None:
    for name in names or ALL:
        if name not in ALL:
            sys.exit(f"unknown benchmark {name!r}; choose from {', '.join(ALL)}")
        print(f"running {name}...", file=sys.stderr)
        module = importlib.import_module(f"benchmarks.{name}")
        result = module.run()
        # a benchmark of several sections returns them by name: NAME-KEY each
        sections = result if isinstance(result, dict) else {"": result}
        for key, body in sections.items():
            write_section(f"{name}-{key}" if key else name, body, getattr(module, "DOC", DOC))
            print(body)


if __name__ == "__main__":
    main(sys.argv[1:])
