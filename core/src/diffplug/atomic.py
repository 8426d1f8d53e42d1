"""Atomic file output: write beside the target, fsync, rename, fsync the folder. A crash or
Ctrl-C never leaves a half-written file under the user's name.

A write killed outright (SIGKILL, power loss) can leave its temporary file behind. Its name
says whose it is: ``.NAME.diffplug-HOST-PID-XXXXXXXX.tmp`` (HOST: a hash of the host name,
PID: the writing process). The next write of NAME into that folder removes those of dead
processes on this host, says so on stderr, and touches nothing else: not a file of another
name, not one a live process is writing, not one written from another host.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

#: the name of a temporary file of ``atomic_path`` (mkstemp's 8 random characters)
TEMP_NAME = re.compile(
    r"^\.(?P<name>.+)\.diffplug-(?P<host>[0-9a-f]{8})-(?P<pid>[1-9]\d*)-[a-z0-9_]{8}\.tmp$"
)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path in the target's directory; rename it over ``path`` on success.
    A symlink is written through: its target is replaced, the link stays a link."""
    target = Path(os.path.realpath(path))
    remove_stale(target.parent, target.name)
    fd, tmp = tempfile.mkstemp(prefix=_prefix(target.name), suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp_path, 0o666 & ~_umask())  # not mkstemp's 0600 (writers may recreate it)
        os.replace(tmp_path, target)
        fsync_dir(target.parent)  # the rename itself survives a power loss
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> None:
    """``write(tmp)`` then rename ``tmp`` to ``path``."""
    with atomic_path(path) as tmp:
        write(tmp)


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """Make the entries of ``folder`` (a rename into it) durable; a file system that cannot
    fsync a directory is left as it is."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def stale_temp_files(folder: str | os.PathLike[str], name: str | None = None) -> list[Path]:
    """Temporary files that ``atomic_path`` left in ``folder`` (of target ``name``, or of any
    target) and whose writer is dead: written on this host by a process that has exited."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    stale = []
    for entry in entries:
        match = TEMP_NAME.match(entry.name)
        if match is None or (name is not None and match["name"] != name):
            continue
        if match["host"] != _host() or _alive(int(match["pid"])):
            continue
        if entry.is_file(follow_symlinks=False):
            stale.append(Path(entry.path))
    return sorted(stale)


def remove_stale(folder: str | os.PathLike[str], name: str | None = None) -> list[str]:
    """Remove ``stale_temp_files(folder, name)``, saying so in one stderr line; their names."""
    removed = []
    for path in stale_temp_files(folder, name):
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        except OSError:  # not ours to force: the write goes on without it
            continue
        removed.append(path.name)
    if removed:
        report_removed(folder, removed)
    return removed


def report_removed(folder: str | os.PathLike[str], names: list[str]) -> None:
    """The one line that says which stale temporary files of a killed write were removed."""
    print(
        f"diffplug: removed {len(names)} stale temporary file(s) of an interrupted write in "
        f"{folder}: {', '.join(names)}",
        file=sys.stderr,
    )


def _prefix(name: str) -> str:
    return f".{name}.diffplug-{_host()}-{os.getpid()}-"


def _host() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (one we may not signal counts as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # not ours to judge: never removed
        return True
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
