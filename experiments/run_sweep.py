r"""The cut-point sweep of the evaluation: train a run per t_cut, score it, and report.

    python -m experiments.run_sweep --config configs/sweep-cifar10.toml \
        --out-dir results/cifar10-sweep
    python -m experiments.run_sweep --config configs/sweep-cifar10.toml \
        --out-dir results/cifar10-sweep \
        --cuts 0,100,1000 --num-samples 200 --max-steps 500 --resume train.seed=1

Every (cut, variant) run lives in `<out-dir>/cut-0100-base/` with its checkpoint and its
`evaluation.json`; `--resume` continues unfinished runs and skips finished points. The report
is written beside the folder: `<out-dir>.json` (atomically), `<out-dir>.md` and `<out-dir>.png`.
`key=value` overrides apply to every run.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from experiments.sweep import SweepSettings, run_sweep
from experiments.sweep_report import markdown, notes, write_report
from latentfuse.config import load_config

logger = logging.getLogger("sweep")


def parse_cuts(text: str) -> tuple[int, ...]:
    """ "0,20,100" -> (0, 20, 100); "" -> ()."""
    try:
        return tuple(int(c) for c in text.split(",") if c.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    defaults = SweepSettings()
    join = lambda cuts: ",".join(map(str, cuts))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", help="run config TOML (every run starts from it)")
    p.add_argument("--out-dir", required=True, type=Path, help="one folder per (cut, variant)")
    p.add_argument("--cuts", type=parse_cuts, default=defaults.cuts, help=join(defaults.cuts))
    p.add_argument(
        "--ablation-cuts",
        type=parse_cuts,
        default=defaults.ablation_cuts,
        help=f"objective and release-policy ablations at these cuts ({join(defaults.ablation_cuts)}"
        "); empty for none",
    )
    p.add_argument(
        "--ablations",
        type=lambda text: tuple(a.strip() for a in text.split(",") if a.strip()),
        default=defaults.ablations,
        help=f"which ablations run at --ablation-cuts ({','.join(defaults.ablations)})",
    )
    p.add_argument("--num-samples", type=int, default=defaults.num_samples, help="per client")
    p.add_argument(
        "--num-releases",
        type=int,
        default=defaults.num_releases,
        help="releases attacked and re-identified per client (default: --num-samples)",
    )
    p.add_argument("--num-inference-steps", type=int, default=defaults.num_inference_steps)
    p.add_argument(
        "--scheduler",
        default=defaults.scheduler,
        choices=["ddpm", "ddim", "dpm", "euler"],
        help="sampler of the scored images (ddpm: ancestral), recorded in the report",
    )
    p.add_argument("--attack-steps", type=int, default=defaults.attack_steps)
    p.add_argument("--max-steps", type=int, help="train.max_steps of every run")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="evaluation")
    p.add_argument("--seed", type=int, default=defaults.seed, help="evaluation seed")
    p.add_argument("--clip", help="CLIP model (folder or hub id) for FCD; default: no FCD")
    p.add_argument("--inception", help="Inception TorchScript weights (default: the offline one)")
    p.add_argument("--device", default=None, help="evaluation device (default: cuda if present)")
    p.add_argument("--resume", action="store_true", help="continue a sweep in --out-dir")
    p.add_argument("overrides", nargs="*", help="key=value config overrides for every run")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run (or resume) the sweep and write its report; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    overrides = list(args.overrides)
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    try:
        config = load_config(args.config, overrides)
        settings = SweepSettings(
            cuts=args.cuts,
            ablation_cuts=args.ablation_cuts,
            ablations=args.ablations,
            num_samples=args.num_samples,
            num_releases=args.num_releases,
            num_inference_steps=args.num_inference_steps,
            scheduler=args.scheduler,
            attack_steps=args.attack_steps,
            seed=args.seed,
            batch_size=args.batch_size,
            clip=args.clip,
            inception=args.inception,
            device=args.device,
        )
        summary = run_sweep(config, args.out_dir, settings, resume=args.resume)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"sweep: error: {error}", file=sys.stderr)
        return 2
    summary = {"config_file": args.config, "overrides": overrides, **summary}
    summary["notes"] = notes(summary)
    paths = write_report(summary, args.out_dir, Path(args.config or "defaults").stem)
    print(markdown(summary, args.out_dir.name).split("\n## Notes")[0])
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
