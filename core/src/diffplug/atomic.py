"""Atomic file output: write beside the target, fsync, rename. A crash or Ctrl-C never
leaves a half-written file under the user's name."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path in the target's directory; rename it over ``path`` on success.
    A symlink is written through: its target is replaced, the link stays a link."""
    target = Path(os.path.realpath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp_path, 0o666 & ~_umask())  # not mkstemp's 0600 (writers may recreate it)
        os.replace(tmp_path, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> None:
    """``write(tmp)`` then rename ``tmp`` to ``path``."""
    with atomic_path(path) as tmp:
        write(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
