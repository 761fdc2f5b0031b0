"""Durable releases: append-only safetensors shards and an index, each written atomically.

An upload is acknowledged only after its shard (the exact bytes received) and the index that
names it are on disk: temporary file, fsync, rename, fsync of the folder. The index is the
commit record: at start-up a shard it does not name (written, never acknowledged, when the
process died) is removed, and the client's retry sends it again. Shards are named by client
and a random suffix; their order is the index's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import tempfile
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

INDEX_FORMAT = 1
UPLOAD_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def fsync_dir(directory: Path) -> None:
    """Flush a folder's entries (a rename inside it) to disk."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int = 0o644) -> Path:
    """Write `data` to a temporary file, fsync it, rename it over `path`, fsync the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


@dataclass(frozen=True)
class ShardEntry:
    """One acknowledged upload: which client, under which idempotency key, in which file."""

    seq: int
    client_id: int
    upload_id: str
    file: str
    sha256: str
    num_images: int
    epoch: int


class DuplicateUpload(ValueError):
    """The upload's key is committed (`entry`) or being committed by a concurrent twin (None)."""

    def __init__(self, client_id: int, upload_id: str, entry: ShardEntry | None):
        state = "being committed" if entry is None else f"committed as shard {entry.seq}"
        super().__init__(f"upload {upload_id!r} of client {client_id} is already {state}")
        self.entry = entry


class ReleaseLog:
    """The server's durable record of every acknowledged release upload, in commit order.

    Thread-safe, with group commit: shards are written in parallel, and one index write makes
    every shard that waits durable at once, so concurrent uploads share the index's fsync.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.shards = self.directory / "shards"
        self.index_file = self.directory / "index.json"
        self.shards.mkdir(parents=True, exist_ok=True)
        self._entries: list[ShardEntry] = self._recover()
        self._keys = {(e.client_id, e.upload_id): e for e in self._entries}
        self._reserved: set[tuple[int, str]] = set()
        self._pending: list[tuple[ShardEntry, Callable[[], None]]] = []
        self._failed: dict[int, BaseException] = {}
        self._durable = self._entries[-1].seq if self._entries else 0
        self._next_seq, self._writing = self._durable + 1, False
        self._cond = threading.Condition()

    def _recover(self) -> list[ShardEntry]:
        entries = []
        if self.index_file.exists():
            data = json.loads(self.index_file.read_text())
            if data.get("format") != INDEX_FORMAT:
                raise ValueError(f"{self.index_file}: index format must be {INDEX_FORMAT}")
            entries = [ShardEntry(**e) for e in data["entries"]]
        named = {e.file for e in entries}
        for entry in entries:
            if not (self.shards / entry.file).is_file():
                raise FileNotFoundError(
                    f"{self.index_file} names shard {entry.file}, which is missing: the release "
                    "log is damaged"
                )
        for path in self.shards.iterdir():
            if path.name not in named:  # never acknowledged: the client retries it
                logger.warning("removing unacknowledged shard %s", path.name)
                path.unlink()
        for path in self.directory.glob(".*.tmp"):
            path.unlink()
        return entries

    def __len__(self) -> int:
        with self._cond:
            return len(self._entries)

    def entries(self) -> list[ShardEntry]:
        """Every acknowledged upload, oldest first."""
        with self._cond:
            return list(self._entries)

    def lookup(self, client_id: int, upload_id: str) -> ShardEntry | None:
        """The committed upload under this key, if any."""
        with self._cond:
            return self._keys.get((client_id, upload_id))

    def append(
        self,
        client_id: int,
        upload_id: str,
        body: bytes,
        num_images: int,
        epoch: int,
        on_commit: Callable[[], None] = lambda: None,
    ) -> ShardEntry:
        """Make an upload durable (shard, then index); `on_commit` runs in commit order once it is.

        DuplicateUpload if the key is committed or being committed.
        """
        if not UPLOAD_ID.match(upload_id):
            raise ValueError(f"upload id {upload_id!r} must match {UPLOAD_ID.pattern}")
        key = (client_id, upload_id)
        with self._cond:
            if key in self._keys or key in self._reserved:
                raise DuplicateUpload(client_id, upload_id, self._keys.get(key))
            self._reserved.add(key)
        name = f"client{client_id}-{secrets.token_hex(8)}.safetensors"
        try:
            atomic_write_bytes(self.shards / name, body)  # concurrent uploads write in parallel
        except BaseException:
            with self._cond:
                self._reserved.discard(key)
            raise
        digest = hashlib.sha256(body).hexdigest()
        with self._cond:
            entry = ShardEntry(
                self._next_seq, client_id, upload_id, name, digest, num_images, epoch
            )
            self._next_seq += 1
            self._pending.append((entry, on_commit))
            while self._durable < entry.seq and entry.seq not in self._failed:
                if self._writing:
                    self._cond.wait()
                else:
                    self._commit_pending()
            error = self._failed.pop(entry.seq, None)
        if error is not None:
            raise error
        return entry

    def _commit_pending(self) -> None:
        """Write one index naming every pending shard (call holding the lock; it is released
        during the write)."""
        batch, self._pending, self._writing = self._pending, [], True
        entries = self._entries + [entry for entry, _ in batch]
        index = {"format": INDEX_FORMAT, "entries": [asdict(e) for e in entries]}
        self._cond.release()
        try:
            atomic_write_bytes(self.index_file, json.dumps(index).encode())
            error = None
        except BaseException as caught:
            error = caught
        finally:
            self._cond.acquire()
            self._writing = False
        for entry, on_commit in batch:
            key = (entry.client_id, entry.upload_id)
            self._reserved.discard(key)
            if error is None:
                self._entries.append(entry)
                self._keys[key] = entry
                try:
                    on_commit()
                except Exception:  # durable already; a restart's replay will try it again
                    logger.exception("on_commit of shard %s failed", entry.file)
            else:
                (self.shards / entry.file).unlink(missing_ok=True)
                self._failed[entry.seq] = error
        if error is None:
            self._durable = batch[-1][0].seq
        self._cond.notify_all()

    def read(self, entry: ShardEntry) -> bytes:
        """The bytes of an acknowledged upload, checked against the sha256 in the index."""
        data = (self.shards / entry.file).read_bytes()
        if hashlib.sha256(data).hexdigest() != entry.sha256:
            raise ValueError(f"shard {entry.file} does not match its sha256 in the index")
        return data
