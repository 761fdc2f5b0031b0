r"""The privacy sweep: train a run per cut (and per target epsilon of the formal-privacy mode),
attack it with everything the server holds, and report each figure beside its baseline.

    OMP_NUM_THREADS=1 python -m experiments.run_privacy_sweep \
        --config configs/sweep-cifar10-cpu.toml --out-dir results/privacy-sweep-runs \
        --report results/privacy-sweep --resume

Every point lives in `<out-dir>/<name>/` (checkpoint, model, its clients' keys, privacy.json);
`--resume` continues unfinished runs and skips attacked points. The report is written as
`<report>.json` (atomically), `<report>.md` and `<report>.png`. `key=value` overrides apply to
every run. `--rerender` rewrites the report from `<report>.json` alone (the run folders need
not exist), recomputing every binomial interval and p-value from the stored hit counts.
`--reattack-releases` re-runs only the release attackers (re-identification, release
membership) of every point in `<report>.json` after a change to them, without training: each
point's clients are rebuilt in `<out-dir>/<name>/` with fresh keys (a release's distribution
does not depend on the key or on training); the model attackers' figures are kept.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from dataclasses import fields
from pathlib import Path

from experiments.privacy_report import plot_privacy, privacy_markdown
from experiments.privacy_sweep import (
    PrivacySweepSettings,
    reattack_releases,
    refresh_binomials,
    run_privacy_sweep,
)
from latentfuse.checkpointing import atomic_write_json
from latentfuse.config import load_config


def _numbers(kind):
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(c) for c in text.split(",") if c.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated numbers, got {text!r}"
            ) from None

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The command line; every PrivacySweepSettings field is a flag with its default."""
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="run config TOML (every run starts from it)")
    p.add_argument("--out-dir", type=Path, help="one folder per point (required unless --rerender)")
    p.add_argument("--report", required=True, type=Path, help="report path without suffix")
    p.add_argument("--resume", action="store_true", help="continue a sweep in --out-dir")
    p.add_argument(
        "--rerender",
        action="store_true",
        help="rewrite <report>.md/.png/.json from <report>.json; no training or attacks",
    )
    p.add_argument(
        "--reattack-releases",
        action="store_true",
        help="re-run the release attackers of <report>.json's points (no training)",
    )
    defaults = PrivacySweepSettings()
    for f in fields(PrivacySweepSettings):
        value = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, tuple):
            kind = float if f.name == "epsilons" else int
            p.add_argument(flag, type=_numbers(kind), default=value, help=f"default {value}")
        else:
            p.add_argument(flag, type=type(value), default=value, help=f"default {value}")
    p.add_argument("overrides", nargs="*", help="config overrides, key=value")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run (or resume) the sweep and write the report."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.rerender:
        source = args.report.with_suffix(".json")
        if not source.is_file():
            parser.error(f"--rerender: no report at {source}")
        summary = refresh_binomials(json.loads(source.read_text()))
        _write_report(args.report, summary, summary.get("command", ""))
        return 0
    if args.out_dir is None:
        parser.error("--out-dir is required (unless --rerender)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        config = load_config(args.config, args.overrides)
        settings = PrivacySweepSettings(
            **{f.name: getattr(args, f.name) for f in fields(PrivacySweepSettings)}
        )
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    command = "python -m experiments.run_privacy_sweep " + shlex.join(argv or sys.argv[1:])
    if args.reattack_releases:
        source = args.report.with_suffix(".json")
        if not source.is_file():
            parser.error(f"--reattack-releases: no report at {source}")
        summary = reattack_releases(config, args.out_dir, settings, json.loads(source.read_text()))
        summary["reattack_command"] = command
        _write_report(args.report, summary, summary.get("command", ""))
        return 0
    summary = run_privacy_sweep(config, args.out_dir, settings, resume=args.resume)
    summary["command"] = command
    summary["threads"] = os.environ.get("OMP_NUM_THREADS")
    _write_report(args.report, summary, command)
    return 0


def _write_report(report: Path, summary: dict, command: str) -> None:
    report.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(report.with_suffix(".json"), summary)
    report.with_suffix(".md").write_text(privacy_markdown(summary, command))
    plot_privacy(summary, report.with_suffix(".png"))


if __name__ == "__main__":
    sys.exit(main())
