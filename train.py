"""Collaborative training of a CollaFuse model: every client and the server, one job.

    accelerate launch train.py --config configs/smoke.toml --output-dir outputs/smoke
    accelerate launch train.py --config configs/cifar10.toml split.t_cut=50 train.max_steps=2000
    accelerate launch train.py --config configs/cifar10.toml --output-dir outputs/c10 --resume

Overrides are `section.key=value` (TOML values). The run folder gets the resolved config,
TensorBoard logs, `losses.jsonl`, preview grids under `samples/`, a resumable `checkpoint/`
and, at the end, the diffusers-layout model under `model/`. Ctrl-C or SIGTERM finishes the
step in progress, checkpoints it and exits with status 130; `--resume` continues from there.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from latentfuse.config import load_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="TOML run configuration")
    parser.add_argument("--output-dir", help="run folder (default: outputs/<config name>)")
    parser.add_argument("--max-steps", type=int, help="override train.max_steps")
    parser.add_argument("--resume", action="store_true", help="continue from the run folder")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Validate the whole configuration before any work, then train."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    overrides = list(args.overrides)
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    try:
        config = load_config(args.config, overrides)
    except (ValueError, FileNotFoundError) as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        return 2
    output_dir = Path(args.output_dir or Path("outputs") / Path(args.config).stem)
    from latentfuse.training.runner import train

    try:
        model_dir = train(config, output_dir, resume=args.resume)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM: the last full step is checkpointed
        print(f"train.py: {stop or 'interrupted'}", file=sys.stderr)
        return 130
    logging.getLogger("train").info("model written to %s", model_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
