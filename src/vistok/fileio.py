"""Atomic file writes: a crash mid-write never damages the file being replaced."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `target`; on success it is renamed over `target` (with the permissions
    a normal file would get), on failure it is removed and `target` is untouched."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # the data is on disk before the rename makes it visible
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # not supported on every filesystem
    finally:
        os.close(fd)


def remove_stale_temps(directory: str | os.PathLike, names: Optional[Sequence[str]] = None) -> list[Path]:
    """Temp files `atomic_path` left in `directory` by a process killed mid-write (`.<name>.<random>.tmp`),
    only those of `names` when given. Only call this where no other process writes those files (e.g. a
    locked run folder, or the files of a release about to be replaced)."""
    directory = Path(directory)
    patterns = [f".{name}.*.tmp" for name in names] if names is not None else [".*.tmp"]
    stale = [p for pat in patterns for p in directory.glob(pat) if p.is_file()] if directory.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale
