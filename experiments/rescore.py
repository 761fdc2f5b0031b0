r"""Score trained points of a grid again with another sampler: is a verdict the sampler's grid?

    OMP_NUM_THREADS=1 nohup python -m experiments.rescore \
        --config configs/frontier-cifar10-cpu.toml --out-dir runs/frontier \
        --models split-100 exact-compensated original-cut original-compensated --seeds 2 \
        --scheduler ddpm --num-inference-steps 1000 --num-samples 500 \
        --report results/frontier-ddpm1000 > rescore.log 2>&1 &

Seed 2: the committed split-100 rows of seeds 0 and 1 were trained on another machine, so
seed 2 is the first seed whose four arms all exist as model folders. Each point must be
trained already (the grid's own run); its scores under the new sampler go
to `<point>/benchmark-<scheduler><steps>.json` (the grid's own `benchmark.json` is left
alone) and one row per point to `<report>.json`, rewritten after every point: resumable.
Privacy is not scored again (the sampler does not touch the releases).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shlex
import sys
from pathlib import Path

from experiments.collaboration import (
    _Shared,
    benchmark_points,
    evaluate_point,
    point_config,
)
from experiments.run_collaboration import load
from latentfuse.checkpointing import atomic_write_json
from latentfuse.evaluation.features import InceptionExtractor

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    """Rescore the chosen points; write the report."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--out-dir", required=True, type=Path, help="the grid's point folders")
    parser.add_argument("--models", nargs="+", required=True)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--scheduler", default="ddpm", choices=("ddpm", "ddim", "euler", "dpm"))
    parser.add_argument("--num-inference-steps", type=int, default=1000)
    parser.add_argument("--num-samples", type=int, default=500, help="per point, all clients")
    parser.add_argument("--report", required=True, type=Path, help="path without suffix")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    config, settings = load(args.config, [])
    unknown = set(args.models) - {m.name for m in settings.models}
    if unknown:
        parser.error(f"--models {sorted(unknown)} are not in {args.config}")
    settings = dataclasses.replace(
        settings,
        scheduler=args.scheduler,
        num_inference_steps=args.num_inference_steps,
        num_samples=args.num_samples,
        privacy=False,
    )
    cache = f"benchmark-{args.scheduler}{args.num_inference_steps}.json"
    shared = _Shared(InceptionExtractor(None, settings.device))
    rows, command = [], "python -m experiments.rescore " + shlex.join(argv or sys.argv[1:])
    for point in benchmark_points(settings):
        if point.model.name not in args.models or point.seed not in args.seeds:
            continue
        folder = args.out_dir / point.name
        if not (folder / "model" / "collafuse.json").is_file():
            logger.warning("%s is not trained yet: skipped", point.name)
            continue
        cfg = point_config(config, point)
        # the sampler's grid is the question: every arm gets the same chain length here
        result = evaluate_point(cfg, folder, settings, shared, cache=cache)
        pooled = result["pooled"]
        rows.append(
            {
                "name": point.name,
                "model": point.model.name,
                "seed": point.seed,
                "scheduler": args.scheduler,
                "num_inference_steps": result.get("num_inference_steps"),
                "network_evaluations": result.get("network_evaluations"),
                "fid": pooled["fid"],
                "fid_se": pooled["fid_se"],
                "kid": pooled["kid"],
                "kid_se": pooled["kid_se"],
                "clients": result["clients"],
            }
        )
        atomic_write_json(args.report.with_suffix(".json"), {"command": command, "rows": rows})
        logger.info("%s: FID %.1f", point.name, pooled["fid"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
