"""What every experiment grid shares: claiming a point so that several jobs can walk one grid.

A point's folder is claimed by an exclusive `flock` on `<folder>/worker.lock`, held while the
job works on it. The operating system drops the lock when the process ends however it ends
(`kill -9` included), so a crashed job leaves nothing to clean up and a reused PID can never
look like a live holder.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK = "worker.lock"


class Claim:
    """An exclusive hold on one point's folder; `release()` (or the process ending) frees it."""

    def __init__(self, folder: Path, descriptor: int):
        self.folder, self._fd = folder, descriptor

    def release(self) -> None:
        """Let other jobs take the folder."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def claim(folder: Path) -> Claim | None:
    """Take `folder` for this process, or None while another process holds it."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())  # for a person looking: who works here
    return Claim(folder, fd)
