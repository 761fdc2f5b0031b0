"""The release database at scale (issue 13): upload latency and memory as releases pile up, and
training throughput reading from the store against an in-memory tensor, as ratios in one run.

    OMP_NUM_THREADS=1 python bench/bench_store.py --sizes 1000 10000 100000

For each size it fills a fresh database to that many held releases (uploads of --images each,
4x16x16 latents), then times --probes more uploads (p50/p95 ms) and reads the process's
RSS growth. Targets: p95 at the largest size / p95 at the smallest <= 1.5; memory growing with
releases held, not with the largest image id (one upload at id 199,999 must cost one row).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from latentfuse.deploy.server.store import ReleaseDatabase  # noqa: E402
from latentfuse.deploy.wire import encode_release  # noqa: E402
from latentfuse.method.transport import ReleaseBatch  # noqa: E402

SHAPE = (4, 16, 16)


def batch(client_id: int, first: int, count: int) -> ReleaseBatch:
    """A release upload of `count` images from image id `first`."""
    ids = tuple(range(first, first + count))
    latents = torch.randn(count, *SHAPE)
    return ReleaseBatch(client_id, ids, latents, torch.zeros(count, dtype=torch.long), 100, 0)


def rss_mb() -> float:
    """Resident memory of this process now, MB."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


def upload_latency(size: int, images: int, probes: int) -> dict:
    """Fill a database to `size` releases; the latency of `probes` more uploads."""
    with tempfile.TemporaryDirectory() as tmp:
        db = ReleaseDatabase(Path(tmp) / "r.db", SHAPE)
        body = encode_release(batch(0, 0, images))  # the bytes' digest only; content is batch's
        for n in range(size // images):
            db.append(f"fill{n}", batch(n % 8, (n // 8) * images, images), body)
        times = []
        for n in range(probes):
            start = time.perf_counter()
            db.append(f"probe{n}", batch(9, n * images, images), body)
            times.append(1000 * (time.perf_counter() - start))
        times.sort()
        return {
            "held": sum(db.counts().values()),
            "p50_ms": statistics.median(times),
            "p95_ms": times[int(0.95 * (len(times) - 1))],
            "db_mb": (Path(tmp) / "r.db").stat().st_size / 2**20,
            "rss_mb": rss_mb(),
        }


def training_throughput(releases: int, steps: int) -> dict:
    """Steps/s of the deployment trainer (configs/deploy.toml's server UNet) that syncs with
    the database before every step, against the same trainer drawing from its in-memory store
    with no database reads (the baseline), on the same `releases`."""
    from latentfuse.deploy.config import load_deploy_config
    from latentfuse.deploy.server.trainer import ServerTrainer

    repo = Path(__file__).resolve().parent.parent
    config, deploy = load_deploy_config(
        repo / "configs" / "deploy.toml", ["train.max_steps=1000000"]
    )
    with tempfile.TemporaryDirectory() as tmp:
        trainer = ServerTrainer(config, deploy, tmp)
        for n in range(releases // 100):
            b = batch(n % 5, (n // 5) * 100, 100)
            b = ReleaseBatch(b.client_id, b.image_ids, b.latents, b.labels, 100, 0)
            trainer.database.append(f"u{n}", b, b"x")
        trainer.sync()
        trainer.train_step()  # warm-up

        def rate(sync: bool) -> float:
            start = time.perf_counter()
            for _ in range(steps):
                if sync:
                    trainer.sync()
                trainer.train_step()
            return steps / (time.perf_counter() - start)

        memory, store = rate(False), rate(True)
        memory2 = rate(False)  # the baseline again: the drift of the machine meanwhile
    return {"memory": (memory + memory2) / 2, "store": store, "drift": memory2 / memory}


def main() -> int:
    """Print one line per size and the ratios."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    p.add_argument("--images", type=int, default=16, help="releases per upload")
    p.add_argument("--probes", type=int, default=200, help="timed uploads per size")
    p.add_argument("--train-releases", type=int, default=5000, help="held while training")
    p.add_argument("--train-steps", type=int, default=20, help="timed steps per variant")
    args = p.parse_args()
    results = {}
    for size in args.sizes:
        results[size] = upload_latency(size, args.images, args.probes)
        r = results[size]
        print(
            f"held {r['held']:>7}: upload p50 {r['p50_ms']:.2f} ms, p95 {r['p95_ms']:.2f} ms, "
            f"db {r['db_mb']:.1f} MB, RSS {r['rss_mb']:.0f} MB",
            flush=True,
        )
    small, large = results[min(args.sizes)], results[max(args.sizes)]
    print(f"p95 ratio {max(args.sizes)}/{min(args.sizes)}: {large['p95_ms'] / small['p95_ms']:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        db = ReleaseDatabase(Path(tmp) / "r.db", SHAPE)
        before = rss_mb()
        db.append("far", batch(0, 199_999, 1), b"x")
        print(
            f"one upload at image id 199,999: {sum(db.counts().values())} row, "
            f"RSS +{rss_mb() - before:.1f} MB"
        )
    t = training_throughput(args.train_releases, args.train_steps)
    print(
        f"training with {args.train_releases} releases held: in-memory {t['memory']:.2f} steps/s, "
        f"syncing with the database every step {t['store']:.2f} steps/s, ratio "
        f"{t['store'] / t['memory']:.3f} (target >= 0.95; baseline drift {t['drift']:.3f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
