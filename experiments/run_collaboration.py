r"""The data-scarce collaboration benchmark (experiments.collaboration): train every
(images per client, model, seed) point of the config's [benchmark] grid for the same number of
steps, score its EMA model per client and pooled, and write the report.

    OMP_NUM_THREADS=1 nohup python -m experiments.run_collaboration \
        --config configs/collaboration-cifar10-cpu.toml --out-dir runs/collaboration \
        --report results/collaboration --shard 0/2 --resume > collab-0.log 2>&1 &
    (and --shard 1/2 beside it: two one-thread jobs share the grid)

Every point lives in `<out-dir>/<name>/` (checkpoint, model, benchmark.json, row.json,
worst-cases.png); `--resume` continues unfinished runs and skips scored points. After each
point the report is rewritten from every finished point in `<out-dir>` (either shard's):
`<report>.json` (atomically), `<report>.md`, `<report>.png` and `<report>-worst-cases.png`.
`--report-only` rewrites the report without training. Rows already in `<report>.json` (with
the same config and scoring) count as finished: a fresh machine resumes from the commit.
`key=value` overrides apply to every run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import tomllib
from pathlib import Path

from experiments.collaboration import (
    BenchmarkSettings,
    backfill_keys,
    collect_rows,
    run_benchmark,
)
from experiments.collaboration_report import write_report
from experiments.frontier_report import write_frontier_report
from latentfuse.config import apply_overrides, config_from_dict


def _shard(text: str) -> tuple[int, int]:
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K/N, e.g. 0/2, got {text!r}") from None
    if not 0 <= k < n:
        raise argparse.ArgumentTypeError(f"shard K/N needs 0 <= K < N, got {text!r}")
    return k, n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", required=True, type=Path, help="run config with a [benchmark] table")
    p.add_argument("--out-dir", required=True, type=Path, help="one folder per point")
    p.add_argument("--report", required=True, type=Path, help="report path without suffix")
    p.add_argument("--resume", action="store_true", help="continue a benchmark in --out-dir")
    p.add_argument("--shard", type=_shard, default=(0, 1), help="K/N: run points i %% N == K")
    p.add_argument(
        "--models",
        type=lambda text: [m.strip() for m in text.split(",") if m.strip()],
        default=None,
        help="comma-separated model names: train only these points of the grid first (the "
        "report still shows every finished point)",
    )
    p.add_argument("--report-only", action="store_true", help="rewrite the report; no training")
    p.add_argument(
        "--format",
        choices=("collaboration", "frontier", "pretrained"),
        default="collaboration",
        help="the report: the collaboration benchmark's, the privacy-utility frontier's "
        "(pooled seed variance, Holm's correction, FID against re-identification), or the "
        "pretrained grid's (the same statistics, its own claims)",
    )
    p.add_argument(
        "--known",
        type=Path,
        action="append",
        default=[],
        help="another report's JSON whose rows count as finished points where their config "
        "and scoring match (e.g. results/collaboration.json for the frontier); repeatable",
    )
    p.add_argument("overrides", nargs="*", help="run config overrides, key=value")
    return p


def load(path: Path, overrides: list[str]):
    """The run config and the benchmark settings from one TOML file."""
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    values = tomllib.loads(path.read_text())
    table = values.pop("benchmark", None)
    if table is None:
        raise ValueError(f"{path} has no [benchmark] table")
    apply_overrides(values, overrides)
    return config_from_dict(values), BenchmarkSettings.from_dict(table)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config, settings = load(args.config, args.overrides)
    except (ValueError, FileNotFoundError, tomllib.TOMLDecodeError) as error:
        parser.error(str(error))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    command = "python -m experiments.run_collaboration " + shlex.join(argv or sys.argv[1:])
    meta = {"config": str(args.config), "threads": os.environ.get("OMP_NUM_THREADS")}

    known = {}  # rows with a key count as finished: a fresh machine resumes from the commit
    for source in [*args.known, args.report.with_suffix(".json")]:
        if source != args.report.with_suffix(".json") and not source.is_file():
            parser.error(f"--known {source}: no such file")
        committed = json.loads(source.read_text()).get("rows", []) if source.is_file() else []
        known.update({row["name"]: row for row in committed if "key" in row})

    def report() -> None:
        rows = backfill_keys(
            config, args.out_dir, settings, collect_rows(args.out_dir, settings, known, config)
        )
        if args.format in ("frontier", "pretrained"):
            train = command.replace(" --report-only", "")
            train += "" if "--resume" in train else " --resume"
            commands = [f"OMP_NUM_THREADS=1 {train}  # twice, side by side"]
            commands.append(f"{train} --report-only")
            write_frontier_report(args.report, rows, {**meta, "commands": commands}, args.format)
        else:
            write_report(args.report, config, settings, rows, meta, args.out_dir)

    if not args.report_only:
        meta["command"] = command
        run_benchmark(
            config,
            args.out_dir,
            settings,
            args.resume,
            args.shard,
            on_point=report,
            known=known,
            models=args.models,
        )
    report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
