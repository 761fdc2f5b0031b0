"""The server's durable state in SQLite (WAL): every acknowledged upload and the latest release
of every (client, image), one transaction per upload.

Why a database: the JSON index it replaces was rewritten whole at every commit, so an upload
cost grew with every upload before it. Here an append is one insert per image plus one per
upload whatever the database holds, idempotency is a unique key `(client_id, upload_id)`, and
the commit order is the `uploads.seq` key. Latents live in the database as float32 blobs (one
row per release: 4 KiB for a 4x16x16 latent); readers take them in pages (`read_since`), so
nothing holds the store densely in memory.

The interface (`append`, `lookup`, `uploads`, `counts`, `read_since`, `max_seq`) is what the
front and the trainer use; a PostgreSQL store (and object storage for the blobs) can implement
it on a multi-node deployment: the same two tables, `BIGSERIAL` for `seq`, `INSERT ... ON
CONFLICT (client_id, image_id) DO UPDATE` for the replace, `bytea` or object keys for latents.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from latentfuse.method.transport import ReleaseBatch

logger = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS uploads (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    client_id INTEGER NOT NULL,
    upload_id TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    num_images INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    unix_time REAL NOT NULL,
    bytes INTEGER NOT NULL DEFAULT 0,
    removed INTEGER NOT NULL DEFAULT 0,
    UNIQUE (client_id, upload_id)
);
CREATE TABLE IF NOT EXISTS removals (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    client_id INTEGER NOT NULL,
    after_seq INTEGER NOT NULL,
    releases INTEGER NOT NULL,
    unix_time REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS releases (
    client_id INTEGER NOT NULL,
    image_id INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    label INTEGER,
    t_cut INTEGER NOT NULL,
    latent BLOB NOT NULL,
    condition BLOB,
    PRIMARY KEY (client_id, image_id)
);
CREATE INDEX IF NOT EXISTS releases_by_seq ON releases (seq);
"""


@dataclass(frozen=True)
class UploadEntry:
    """One acknowledged upload: which client, under which idempotency key, in which order."""

    seq: int
    client_id: int
    upload_id: str
    sha256: str
    num_images: int
    epoch: int


class DuplicateUpload(ValueError):
    """The upload's key is already committed (`entry`)."""

    def __init__(self, client_id: int, upload_id: str, entry: UploadEntry | None):
        state = "being committed" if entry is None else f"committed as upload {entry.seq}"
        super().__init__(f"upload {upload_id!r} of client {client_id} is already {state}")
        self.entry = entry


class QuotaExceeded(ValueError):
    """An upload would take its client past a quota."""


class ReleaseDatabase:
    """The durable store of acknowledged uploads and held releases (thread-safe: one SQLite
    connection per thread; SQLite serialises the writers)."""

    def __init__(
        self, path: str | Path, latent_shape: tuple[int, ...] | None, readonly: bool = False
    ):
        """`latent_shape` None: the shape the database records (it must exist)."""
        self.path, self.readonly = Path(path), readonly
        self._condition_shape: tuple[int, ...] | None = None
        if latent_shape is None:
            if not self.path.is_file():
                raise FileNotFoundError(f"no release database at {self.path}")
            with sqlite3.connect(self.path) as db:
                row = db.execute("SELECT value FROM meta WHERE key = 'latent_shape'").fetchone()
            if row is None:
                raise ValueError(f"{self.path} records no latent shape")
            latent_shape = tuple(json.loads(row[0]))
        self.latent_shape = tuple(int(x) for x in latent_shape)
        if readonly and not self.path.is_file():
            raise FileNotFoundError(f"no release database at {self.path}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        try:
            if not readonly:
                with self._connect() as db:
                    db.executescript(SCHEMA)
                self._add_condition_column()
            self._check_shape()
        except sqlite3.DatabaseError as error:
            raise ValueError(
                f"release database {self.path} is unreadable ({error}); restore it from a "
                f"backup, or salvage it with `sqlite3 {self.path} .recover`; nothing was changed"
            ) from None

    def _connect(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")  # an acknowledged upload survives power loss
            db.execute("PRAGMA busy_timeout=60000")
            self._local.db = db
        return db

    def _add_condition_column(self) -> None:
        """Databases from before float conditioning lack `releases.condition`: add it (an
        added nullable column changes no row)."""
        db = self._connect()
        columns = {row[1] for row in db.execute("PRAGMA table_info(releases)")}
        if "condition" not in columns:
            db.execute("ALTER TABLE releases ADD COLUMN condition BLOB")

    def condition_shape(self) -> tuple[int, ...] | None:
        """The shape of one release's float conditioning (attribute vector or token states),
        as the first upload that carried one recorded it; None before any. Once recorded it
        never changes, so it is read once."""
        if self._condition_shape is None:
            row = (
                self._connect()
                .execute("SELECT value FROM meta WHERE key = 'condition_shape'")
                .fetchone()
            )
            self._condition_shape = None if row is None else tuple(json.loads(row[0]))
        return self._condition_shape

    def _record_condition_shape(self, batch: ReleaseBatch) -> None:
        """Inside an upload's transaction: every float conditioning has one shape."""
        if batch.labels is None or not batch.labels.is_floating_point():
            return
        shape, known = tuple(batch.labels.shape[1:]), self.condition_shape()
        if known is None:
            self._connect().execute(
                "INSERT INTO meta VALUES ('condition_shape', ?)", (json.dumps(shape),)
            )
        elif known != shape:
            raise ValueError(
                f"{self.path} holds conditioning rows of shape {known}, this upload's are {shape}"
            )

    def _check_shape(self) -> None:
        db = self._connect()
        row = db.execute("SELECT value FROM meta WHERE key = 'latent_shape'").fetchone()
        if row is None and not self.readonly:
            db.execute(
                "INSERT OR IGNORE INTO meta VALUES ('latent_shape', ?)",
                (json.dumps(self.latent_shape),),
            )
        elif row is not None and tuple(json.loads(row[0])) != self.latent_shape:
            raise ValueError(
                f"{self.path} holds latents of shape {tuple(json.loads(row[0]))}, the config "
                f"gives {self.latent_shape}: is this the state folder of another model?"
            )

    def close(self) -> None:
        """Close this thread's connection."""
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    # ---- writes --------------------------------------------------------------------------------
    def append(
        self,
        upload_id: str,
        batch: ReleaseBatch,
        body: bytes,
        max_releases: int = 0,
        max_bytes: int = 0,
    ) -> UploadEntry:
        """Make one upload durable in one transaction: its record and its releases (a release of
        an image already held replaces it). DuplicateUpload if the key is committed;
        QuotaExceeded if the client would hold more than `max_releases` releases or have sent
        more than `max_bytes` bytes (0: no quota), checked inside the transaction, so
        concurrent uploads cannot pass a quota together."""
        sha256, count = hashlib.sha256(body).hexdigest(), len(batch.image_ids)
        db = self._connect()
        try:
            db.execute("BEGIN IMMEDIATE")
            self._check_quota(batch, len(body), max_releases, max_bytes)
            self._record_condition_shape(batch)
            cursor = db.execute(
                "INSERT INTO uploads "
                "(client_id, upload_id, sha256, num_images, epoch, unix_time, bytes)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (batch.client_id, upload_id, sha256, count, batch.epoch, time.time(), len(body)),
            )
            db.executemany(
                "INSERT OR REPLACE INTO releases "
                "(client_id, image_id, seq, label, t_cut, latent, condition) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                self._release_rows(batch, cursor.lastrowid),
            )
            db.execute("COMMIT")
        except sqlite3.IntegrityError:
            db.execute("ROLLBACK")
            raise DuplicateUpload(
                batch.client_id, upload_id, self.lookup(batch.client_id, upload_id)
            ) from None
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return UploadEntry(cursor.lastrowid, batch.client_id, upload_id, sha256, count, batch.epoch)

    def _check_quota(
        self, batch: ReleaseBatch, size: int, max_releases: int, max_bytes: int
    ) -> None:
        if not max_releases and not max_bytes:
            return
        usage = self.usage(batch.client_id)
        held = usage["releases"] + self.new_images(batch.client_id, batch.image_ids)
        if max_releases and held > max_releases:
            raise QuotaExceeded(
                f"client {batch.client_id} holds {usage['releases']} releases; this upload would "
                f"pass its quota of {max_releases}"
            )
        if max_bytes and usage["bytes"] + size > max_bytes:
            raise QuotaExceeded(
                f"client {batch.client_id} has uploaded {usage['bytes']} bytes; this upload "
                f"would pass its quota of {max_bytes}"
            )

    @staticmethod
    def _release_rows(batch: ReleaseBatch, seq: int) -> Iterator[tuple]:
        """The `releases` rows of one upload: latents (and float conditioning) as float32
        bytes, class labels as integers."""
        latents = batch.latents.detach().to(torch.float32).contiguous().numpy()
        count, labels = len(latents), batch.labels
        conditions: list = [None] * count
        if labels is not None and labels.is_floating_point():
            rows = labels.detach().to(torch.float32).contiguous().numpy()
            conditions, labels = [row.tobytes() for row in rows], None
        classes = labels.tolist() if labels is not None else [None] * count
        for image_id, label, latent, condition in zip(
            batch.image_ids, classes, latents, conditions, strict=True
        ):
            row = (batch.client_id, int(image_id), seq, label, batch.handoff_t, latent.tobytes())
            yield (*row, condition)

    def remove(self, client_id: int, after_upload: str | None = None) -> int:
        """Remove a client's releases: all of them, or those its uploads after `after_upload`
        committed (an operator's answer to a poisoned or revoked client). The uploads stay on
        record as removed, so a replay of one is still a duplicate; trainers rebuild their
        store at their next step (`removal_version`). Returns the releases removed."""
        db = self._connect()
        after = 0
        if after_upload is not None:
            entry = self.lookup(client_id, after_upload)
            if entry is None:
                raise ValueError(f"client {client_id} has no upload {after_upload!r}")
            after = entry.seq
        db.execute("BEGIN IMMEDIATE")
        try:
            gone = db.execute(
                "DELETE FROM releases WHERE client_id = ? AND seq > ?", (client_id, after)
            ).rowcount
            db.execute(
                "UPDATE uploads SET removed = 1 WHERE client_id = ? AND seq > ?",
                (client_id, after),
            )
            db.execute(
                "INSERT INTO removals (client_id, after_seq, releases, unix_time) "
                "VALUES (?, ?, ?, ?)",
                (client_id, after, gone, time.time()),
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        logger.info(
            "removed %d releases of client %d (uploads after seq %d)", gone, client_id, after
        )
        return gone

    def removal_version(self) -> int:
        """How many removals the database has seen (a trainer rebuilds when it changes)."""
        return self._connect().execute("SELECT COALESCE(MAX(id), 0) FROM removals").fetchone()[0]

    def first_removed_seq(self, since_removal: int, upto_removal: int) -> int | None:
        """The earliest upload sequence that the removals after `since_removal` up to
        `upto_removal` (`removal_version`s) took out, or None if they took out no upload."""
        row = (
            self._connect()
            .execute(
                "SELECT MIN(u.seq) FROM removals r JOIN uploads u ON u.client_id = r.client_id "
                "AND u.seq > r.after_seq AND u.removed = 1 WHERE r.id > ? AND r.id <= ?",
                (since_removal, upto_removal),
            )
            .fetchone()
        )
        return None if row[0] is None else int(row[0])

    # ---- reads ---------------------------------------------------------------------------------
    def lookup(self, client_id: int, upload_id: str) -> UploadEntry | None:
        """The committed upload under this key, if any."""
        row = (
            self._connect()
            .execute(
                "SELECT seq, client_id, upload_id, sha256, num_images, epoch FROM uploads "
                "WHERE client_id = ? AND upload_id = ?",
                (client_id, upload_id),
            )
            .fetchone()
        )
        return UploadEntry(*row) if row else None

    def uploads(self, client_id: int | None = None) -> list[UploadEntry]:
        """Every acknowledged upload (of one client, or all), oldest first."""
        query = "SELECT seq, client_id, upload_id, sha256, num_images, epoch FROM uploads"
        args: tuple = ()
        if client_id is not None:
            query, args = query + " WHERE client_id = ?", (client_id,)
        rows = self._connect().execute(query + " ORDER BY seq", args).fetchall()
        return [UploadEntry(*row) for row in rows]

    def __len__(self) -> int:
        return self._connect().execute("SELECT COUNT(*) FROM uploads").fetchone()[0]

    def counts(self) -> dict[int, int]:
        """Releases held per client."""
        rows = self._connect().execute(
            "SELECT client_id, COUNT(*) FROM releases GROUP BY client_id ORDER BY client_id"
        )
        return {int(c): int(n) for c, n in rows}

    def usage(self, client_id: int) -> dict[str, int]:
        """What a client holds against its quotas: releases held, bytes uploaded (all uploads
        on record, removed ones included: they were received)."""
        db = self._connect()
        held = db.execute("SELECT COUNT(*) FROM releases WHERE client_id = ?", (client_id,))
        sent = db.execute(
            "SELECT COALESCE(SUM(bytes), 0) FROM uploads WHERE client_id = ?", (client_id,)
        )
        return {"releases": held.fetchone()[0], "bytes": sent.fetchone()[0]}

    def new_images(self, client_id: int, image_ids: tuple[int, ...]) -> int:
        """How many of `image_ids` the client holds no release of yet."""
        db, known = self._connect(), 0
        for start in range(0, len(image_ids), 500):  # SQLite's bound-parameter limit
            part = image_ids[start : start + 500]
            marks = ",".join("?" * len(part))
            known += db.execute(
                f"SELECT COUNT(*) FROM releases WHERE client_id = ? AND image_id IN ({marks})",
                (client_id, *part),
            ).fetchone()[0]
        return len(image_ids) - known

    def labels(self, client_id: int) -> set[int]:
        """The class labels of the releases a client holds."""
        rows = self._connect().execute(
            "SELECT DISTINCT label FROM releases WHERE client_id = ? AND label IS NOT NULL",
            (client_id,),
        )
        return {int(label) for (label,) in rows}

    def max_seq(self) -> int:
        """The newest upload's sequence number (0 when none)."""
        return self._connect().execute("SELECT COALESCE(MAX(seq), 0) FROM uploads").fetchone()[0]

    def read_since(self, after: int, until: int, page: int = 4096) -> Iterator[ReleaseBatch]:
        """The releases written by uploads `after < seq <= until`, one batch per page and client
        (the latest copy of each image), in (seq, client, image) order."""
        db, last = self._connect(), (after, 1 << 62, 1 << 62)  # everything of seq <= after
        while True:
            rows = db.execute(
                "SELECT seq, client_id, image_id, label, t_cut, latent, condition FROM releases "
                "WHERE (seq, client_id, image_id) > (?, ?, ?) AND seq <= ? "
                "ORDER BY seq, client_id, image_id LIMIT ?",
                (*last, until, page),
            ).fetchall()
            if not rows:
                return
            last = rows[-1][:3]
            yield from self._batches(rows)

    def _batches(self, rows: list[tuple]) -> Iterator[ReleaseBatch]:
        by_client: dict[tuple[int, int], list[tuple]] = {}
        for row in rows:
            by_client.setdefault((row[1], row[4]), []).append(row)
        for (client_id, t_cut), group in by_client.items():
            latents = np.stack(
                [np.frombuffer(r[5], dtype=np.float32).reshape(self.latent_shape) for r in group]
            )
            yield ReleaseBatch(
                client_id=client_id,
                image_ids=tuple(int(r[2]) for r in group),
                latents=torch.from_numpy(latents.copy()),
                labels=self._conditioning(group),
                handoff_t=t_cut,
                epoch=0,
            )

    def _conditioning(self, group: list[tuple]) -> torch.Tensor | None:
        """The conditioning of one group of rows: class labels, float rows, or None."""
        if group[0][6] is not None:
            shape = self.condition_shape()
            rows = [np.frombuffer(r[6], dtype=np.float32).reshape(shape) for r in group]
            return torch.from_numpy(np.stack(rows).copy())
        if group[0][3] is None:
            return None
        return torch.tensor([r[3] for r in group], dtype=torch.long)


def migrate_release_log(old: Path, database: ReleaseDatabase) -> int:
    """Move a JSON-index release log (`old`: index.json + shards/, the earlier layout) into
    `database`, in its commit order, with its upload ids and digests; the old folder is then
    renamed `<old>.migrated` (kept, never deleted). Returns the uploads migrated."""
    from latentfuse.deploy.wire import decode_release

    index = old / "index.json"
    if not index.is_file():
        return 0
    if len(database):
        raise ValueError(
            f"{old} holds a release log to migrate, but {database.path} already holds uploads: "
            "move one of them aside"
        )
    entries = json.loads(index.read_text())["entries"]
    for entry in entries:
        body = (old / "shards" / entry["file"]).read_bytes()
        if hashlib.sha256(body).hexdigest() != entry["sha256"]:
            raise ValueError(f"{old}: shard {entry['file']} does not match its sha256")
        batch = decode_release(body, len(body), 1 << 30)
        database.append(entry["upload_id"], batch, body)
    old.rename(old.with_name(old.name + ".migrated"))
    logger.info("migrated %d uploads from %s into %s", len(entries), old, database.path)
    return len(entries)
