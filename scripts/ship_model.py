"""Turn a finished training run into the shipped checkpoint: fp16 weights, model card, a grid.

python scripts/ship_model.py --run outputs/cifar10 --out checkpoints/cifar10-collafuse
python scripts/ship_model.py --run outputs/cifar10 --out checkpoints/cifar10-collafuse \
    --metrics results/cifar10-collafuse-eval.json    # after `latentfuse evaluate` of the folder
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from latentfuse import CollaFusePipeline
from latentfuse.checkpointing import atomic_write_dir
from latentfuse.hub import metrics_from_results, model_card

DEFAULT_COMMAND = "accelerate launch train.py --config configs/cifar10.toml"


def training_section(run: Path, description: dict) -> str:
    """Steps, wall time and loss curve summary of the run, from its own logs."""
    losses = [json.loads(line) for line in (run / "losses.jsonl").read_text().splitlines()]
    training = description.get("training", {})
    first, last = losses[0], losses[-1]
    names = [k for k in last if k != "step"]
    rows = [f"| {name} | {first[name]:.3f} | {last[name]:.3f} |" for name in names]
    return "\n".join(
        [
            "## Training",
            "",
            f"- steps: {training.get('steps', last['step'])}; wall time "
            f"{training.get('wall_seconds', 0) / 3600:.2f} h on 2 CPU cores",
            f"- command: `{training.get('command', DEFAULT_COMMAND)}`",
            "- weights: EMA, stored as fp16 safetensors",
            "",
            f"| loss | step {first['step']} | step {last['step']} |",
            "| --- | --- | --- |",
            *rows,
            "",
            "FID per client: see Metrics (from `latentfuse evaluate`, where given).",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", required=True, help="train.py output folder")
    parser.add_argument("--out", required=True)
    parser.add_argument("--wall-hours", type=float, help="wall time to record")
    parser.add_argument("--command", help="training command to record")
    parser.add_argument("--status", help="a status paragraph for the model card")
    parser.add_argument("--metrics", help="`latentfuse evaluate` results.json for the card")
    parser.add_argument("--metrics-command", help="the evaluate command to record with them")
    args = parser.parse_args()
    run = Path(args.run)
    pipe = CollaFusePipeline.from_pretrained(run / "model")
    description = pipe.collafuse_config
    training = description.setdefault("training", {})
    if args.wall_hours is not None:
        training["wall_seconds"] = args.wall_hours * 3600
    if args.command:
        training["command"] = args.command
    if args.metrics:
        results = json.loads(Path(args.metrics).read_text())
        description["metrics"] = metrics_from_results(results, args.metrics_command)
    pipe.to(torch.float16)
    samples = sorted((run / "samples").glob("step-*-client-*.png"))
    last_step = samples[-1].name.split("-")[1] if samples else None

    def write(tmp: Path) -> None:
        pipe.save_pretrained(tmp)
        card = model_card(description) + "\n" + training_section(run, description)
        if args.status:
            card += f"\n## Status\n\n{args.status}\n"
        (tmp / "README.md").write_text(card)
        for png in samples:
            if png.name.split("-")[1] == last_step:
                shutil.copy(png, tmp / png.name.replace(f"step-{last_step}-", "samples-"))

    atomic_write_dir(args.out, write)
    size = sum(f.stat().st_size for f in Path(args.out).rglob("*") if f.is_file())
    print(f"wrote {args.out}: {size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
