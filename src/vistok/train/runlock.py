"""One process at a time per run folder.

`RUN/.lock` is an OS file lock (filelock: fcntl/flock, released by the kernel when the holder exits,
killed or not, so a lock left by a dead process is never in the way); `RUN/.lock.owner.json` says who
holds it (pid, host, start time) for the error message, and is simply replaced by the next holder.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Callable, Optional

from filelock import FileLock, Timeout

LOCK_NAME = ".lock"
OWNER_NAME = ".lock.owner.json"


class RunFolderBusy(ValueError):
    """The run folder is held by another live process."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """Hold `run_dir` for this process; `acquire()` raises RunFolderBusy naming the holder."""

    def __init__(self, run_dir: Path, log: Optional[Callable[[str], None]] = None):
        self.run_dir = Path(run_dir)
        self.log = log or (lambda _msg: None)
        self._lock: Optional[FileLock] = None

    def acquire(self) -> "RunLock":
        self.run_dir.mkdir(parents=True, exist_ok=True)
        owner_file = self.run_dir / OWNER_NAME
        previous = self._read_owner(owner_file)
        lock = FileLock(str(self.run_dir / LOCK_NAME), is_singleton=False, thread_local=False)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            who = previous or {}
            raise RunFolderBusy(
                f"run folder {self.run_dir} is in use by another process (pid {who.get('pid', '?')} on host "
                f"{who.get('host', '?')}, since {who.get('started', '?')}): wait for it to finish, or pass another "
                "--out") from None
        self._lock = lock
        pid = previous.get("pid") if previous else None
        pid = pid if isinstance(pid, int) and not isinstance(pid, bool) and pid > 0 else None  # informational only:
        # a hand-edited owner file ({"pid": null}, "abc") raised TypeError/ValueError here, and pid <= 0
        # made os.kill address a process group (0) or every process (-1)
        if pid is not None and previous.get("host") == socket.gethostname() and not _pid_alive(pid):
            self.log(f"run folder {self.run_dir}: the previous holder (pid {previous['pid']}) is gone; taking it over")
        owner_file.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                          "started": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
        return self

    @staticmethod
    def _read_owner(path: Path) -> Optional[dict]:
        try:
            data = json.loads(path.read_text())
            return data if isinstance(data, dict) else None
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self._lock is not None:
            (self.run_dir / OWNER_NAME).unlink(missing_ok=True)
            self._lock.release()
            self._lock = None

    @property
    def held(self) -> bool:
        return self._lock is not None
