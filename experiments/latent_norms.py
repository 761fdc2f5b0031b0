"""Percentiles of the L2 norms of every client's training latents under a run config: the
clip norms of the formal-privacy mode (privacy.clip_norm) are chosen from these.

    python -m experiments.latent_norms --config configs/frontier-cifar10-cpu.toml

The config's [benchmark] table, if any, is ignored; `key=value` overrides apply
(data.max_images_per_client=250 is the frontier's data size, its default here).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import tomllib
from pathlib import Path

from experiments.sweep import latent_clip_norm
from latentfuse.config import apply_overrides, config_from_dict
from latentfuse.training.setup import build_run


def main(argv: list[str] | None = None) -> int:
    """Print one JSON line per percentile."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, type=Path, help="a run config (TOML)")
    parser.add_argument("--percentiles", type=float, nargs="+", default=[50.0, 99.0])
    parser.add_argument("overrides", nargs="*", default=["data.max_images_per_client=250"])
    args = parser.parse_args(argv)
    values = tomllib.loads(args.config.read_text())
    values.pop("benchmark", None)
    apply_overrides(values, args.overrides)
    with tempfile.TemporaryDirectory() as run_dir:  # the simulated release keys go here
        run = build_run(config_from_dict(values), run_dir)
        for percentile in args.percentiles:
            print(json.dumps(latent_clip_norm(run, percentile)[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
