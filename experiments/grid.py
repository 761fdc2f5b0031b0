"""What every experiment grid shares: its output folder (`grid_folder`), walking its points so that
several jobs can share one grid (`walk`, `claim`), and results kept under the key of what made
them (`keyed`), so a resumed grid redoes only what changed.

A point's folder is claimed by an exclusive `flock` on `<folder>/worker.lock`, held while the
job works on it. The operating system drops the lock when the process ends however it ends
(`kill -9` included), so a crashed job leaves nothing to clean up and a reused PID can never
look like a live holder.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from tqdm.auto import tqdm

from latentfuse.checkpointing import atomic_write_json

logger = logging.getLogger(__name__)

LOCK = "worker.lock"
T = TypeVar("T")


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


def wait_claim(folder: Path) -> Claim:
    """Take `folder` for this process, waiting while another process holds it."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK, os.O_CREAT | os.O_RDWR, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return Claim(folder, fd)


def walk(
    points: Iterable[T],
    folder_of: Callable[[T], Path],
    work: Callable[[T], None],
    wait: bool = False,
    desc: str = "grid",
    done: Callable[[T], bool] | None = None,
) -> None:
    """Run `work(point)` on every point whose folder no other job holds. Points another job
    holds are skipped (`wait` False: that job finishes them), or taken after all others once
    their holder lets go (`wait` True: every point's work has run here when this returns;
    `work` finds what the other job finished and reuses it). `done(point)`: skip it without
    touching its folder."""
    held_elsewhere = []
    for point in tqdm(list(points), desc=desc):
        if done is not None and done(point):  # finished: no folder made, no lock taken
            continue
        held = claim(folder_of(point))
        if held is None:
            logger.info(
                "%s: another job holds it, %s",
                folder_of(point).name,
                "taken last" if wait else "skipped",
            )
            held_elsewhere.append(point)
            continue
        with held:
            work(point)
    for point in held_elsewhere if wait else ():
        with wait_claim(folder_of(point)):
            work(point)


def grid_folder(out_dir: Path, resume: bool, what: str) -> Path:
    """The output folder of a grid: one that holds results is continued only with `resume`."""
    out_dir = Path(out_dir)
    if not resume and out_dir.is_dir() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} already holds a {what}: pass --resume to continue it")
    return out_dir


def keyed(path: Path, key: Any, compute: Callable[[], dict]) -> dict:
    """The result stored at `path` under `key`, else `compute()`'s, stored there with its key
    (atomically) and read back, so a reused result and a fresh one are the same JSON."""
    saved = json.loads(path.read_text()) if path.is_file() else {}
    if saved.get("key") != key:
        atomic_write_json(path, {"key": key, **compute()})
        saved = json.loads(path.read_text())
    return {k: v for k, v in saved.items() if k != "key"}
