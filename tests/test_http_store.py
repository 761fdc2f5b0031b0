"""The release database: durable, idempotent, one order, bounded reads, migration."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import pytest
import torch

from latentfuse.deploy.server.store import DuplicateUpload, ReleaseDatabase, migrate_release_log
from latentfuse.deploy.wire import encode_release
from latentfuse.method.transport import ReleaseBatch

SHAPE = (4, 2, 2)


def release(ids: tuple[int, ...], client_id: int = 1, fill: float = 0.0) -> ReleaseBatch:
    """A release of `ids` whose latents are `fill + id`."""
    latents = torch.stack([torch.full(SHAPE, fill + i) for i in ids])
    labels = torch.tensor([i % 3 for i in ids])
    return ReleaseBatch(client_id, ids, latents, labels, handoff_t=100, epoch=0)


def held(db: ReleaseDatabase) -> dict[tuple[int, int], float]:
    """(client, image) -> the first element of its latent, over everything held."""
    out = {}
    for batch in db.read_since(0, db.max_seq(), page=3):
        for i, latent in zip(batch.image_ids, batch.latents, strict=True):
            out[(batch.client_id, i)] = float(latent.flatten()[0])
    return out


def test_uploads_survive_a_reopen_and_a_replay_is_refused(tmp_path):
    db = ReleaseDatabase(tmp_path / "r.db", SHAPE)
    bodies = {}
    for n, ids in enumerate([(0, 1), (2,), (3, 4, 5)]):
        batch = release(ids)
        bodies[f"u{n}"] = encode_release(batch)
        entry = db.append(f"u{n}", batch, bodies[f"u{n}"])
        assert entry.seq == n + 1 and entry.sha256 == hashlib.sha256(bodies[f"u{n}"]).hexdigest()
    db.close()
    again = ReleaseDatabase(tmp_path / "r.db", SHAPE)
    assert [e.upload_id for e in again.uploads()] == ["u0", "u1", "u2"]
    assert again.counts() == {1: 6} and len(again) == 3
    assert held(again) == {(1, i): float(i) for i in range(6)}
    with pytest.raises(DuplicateUpload, match="already committed") as caught:
        again.append("u1", release((9,)), b"other")
    assert caught.value.entry.sha256 == hashlib.sha256(bodies["u1"]).hexdigest()
    assert again.counts() == {1: 6}  # the refused upload left nothing


def test_a_new_release_of_an_image_replaces_the_old_and_is_read_again(tmp_path):
    db = ReleaseDatabase(tmp_path / "r.db", SHAPE)
    db.append("a", release((0, 1)), b"a")
    first = db.max_seq()
    db.append("b", release((1,), fill=100.0), b"b")
    assert held(db) == {(1, 0): 0.0, (1, 1): 101.0}
    newer = [(b.client_id, b.image_ids) for b in db.read_since(first, db.max_seq())]
    assert newer == [(1, (1,))]


def test_concurrent_uploads_commit_each_once_in_one_order(tmp_path):
    db = ReleaseDatabase(tmp_path / "r.db", SHAPE)
    barrier = threading.Barrier(16)
    errors = []

    def upload(i: int) -> None:
        barrier.wait()
        try:
            db.append(f"u{i}", release((i,), client_id=i % 4), bytes([i]))
        except Exception as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert sorted(e.seq for e in db.uploads()) == list(range(1, 17))
    assert sum(db.counts().values()) == 16


def test_a_failed_transaction_leaves_nothing(tmp_path, monkeypatch):
    db = ReleaseDatabase(tmp_path / "r.db", SHAPE)
    db.append("kept", release((0,)), b"k")
    rows = ReleaseDatabase._release_rows

    def disk_full_after_one_row(batch, seq):
        generated = rows(batch, seq)
        yield next(generated)
        raise OSError("disk full")

    monkeypatch.setattr(ReleaseDatabase, "_release_rows", staticmethod(disk_full_after_one_row))
    with pytest.raises(OSError, match="disk full"):
        db.append("lost", release((1, 2)), b"l")
    monkeypatch.setattr(ReleaseDatabase, "_release_rows", staticmethod(rows))
    assert [e.upload_id for e in db.uploads()] == ["kept"] and db.counts() == {1: 1}
    db.append("lost", release((1, 2)), b"l")  # and the upload can be retried
    assert [e.upload_id for e in db.uploads()] == ["kept", "lost"]


def test_a_large_image_id_costs_one_row(tmp_path):
    db = ReleaseDatabase(tmp_path / "r.db", SHAPE)
    db.append("far", release((199_999,)), b"x")
    assert db.counts() == {1: 1}
    assert (tmp_path / "r.db").stat().st_size < 1 << 20


def test_a_database_of_another_latent_shape_is_refused(tmp_path):
    ReleaseDatabase(tmp_path / "r.db", SHAPE)
    with pytest.raises(ValueError, match="shape"):
        ReleaseDatabase(tmp_path / "r.db", (4, 8, 8))


def test_an_old_json_index_release_log_is_migrated_and_kept(tmp_path):
    old = tmp_path / "releases"
    (old / "shards").mkdir(parents=True)
    entries = []
    for n, ids in enumerate([(0, 1), (1, 2)]):
        body = encode_release(release(ids, fill=10.0 * n))
        name = f"client1-{n}.safetensors"
        (old / "shards" / name).write_bytes(body)
        entries.append(
            {
                "seq": n + 1,
                "client_id": 1,
                "upload_id": f"u{n}",
                "file": name,
                "sha256": hashlib.sha256(body).hexdigest(),
                "num_images": len(ids),
                "epoch": 0,
            }
        )
    (old / "index.json").write_text(json.dumps({"format": 1, "entries": entries}))
    db = ReleaseDatabase(tmp_path / "r.db", SHAPE)
    assert migrate_release_log(old, db) == 2
    assert [(e.upload_id, e.sha256) for e in db.uploads()] == [
        (e["upload_id"], e["sha256"]) for e in entries
    ]
    assert held(db) == {(1, 0): 0.0, (1, 1): 11.0, (1, 2): 12.0}  # the later upload wins
    assert not old.exists() and (tmp_path / "releases.migrated" / "index.json").is_file()
    assert migrate_release_log(old, db) == 0  # nothing left to migrate


def test_reads_come_in_pages_of_bounded_size(tmp_path):
    db = ReleaseDatabase(tmp_path / "r.db", SHAPE)
    db.append("a", release(tuple(range(10))), b"a")
    sizes = [len(b.image_ids) for b in db.read_since(0, db.max_seq(), page=4)]
    assert sizes == [4, 4, 2]


def test_readonly_needs_an_existing_database(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="no release database"):
        ReleaseDatabase(tmp_path / "none.db", SHAPE, readonly=True)
