"""The release database at scale (issue 13): upload latency and memory as releases pile up, and
training throughput reading from the store against an in-memory tensor, as ratios in one run.

    OMP_NUM_THREADS=1 python bench/bench_store.py --sizes 1000 10000 100000

For each size it fills a fresh database to that many held releases (uploads of --images each,
4x16x16 latents), then times --probes more uploads (p50/p95 ms) and reads the process's peak
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

from latentfuse.http.store import ReleaseDatabase  # noqa: E402
from latentfuse.http.wire import encode_release  # noqa: E402
from latentfuse.transport import ReleaseBatch  # noqa: E402

SHAPE = (4, 16, 16)


def batch(client_id: int, first: int, count: int) -> ReleaseBatch:
    """A release upload of `count` images from image id `first`."""
    ids = tuple(range(first, first + count))
    latents = torch.randn(count, *SHAPE)
    return ReleaseBatch(client_id, ids, latents, torch.zeros(count, dtype=torch.long), 100, 0)


def rss_mb() -> float:
    """Peak resident memory of this process, MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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
            "peak_rss_mb": rss_mb(),
        }


def main() -> int:
    """Print one line per size and the ratios."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    p.add_argument("--images", type=int, default=16, help="releases per upload")
    p.add_argument("--probes", type=int, default=200, help="timed uploads per size")
    args = p.parse_args()
    results = {}
    for size in args.sizes:
        results[size] = upload_latency(size, args.images, args.probes)
        r = results[size]
        print(
            f"held {r['held']:>7}: upload p50 {r['p50_ms']:.2f} ms, p95 {r['p95_ms']:.2f} ms, "
            f"db {r['db_mb']:.1f} MB, peak RSS {r['peak_rss_mb']:.0f} MB",
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
            f"peak RSS +{rss_mb() - before:.1f} MB"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
