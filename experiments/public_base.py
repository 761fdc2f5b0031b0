"""Train and package a public base denoiser (docs/pretrained.md): the collaboration
benchmark's server denoiser on the CIFAR-10 test split, which no benchmark client holds.

    OMP_NUM_THREADS=1 python -m experiments.public_base --name cifar10-public-base \
        --work runs/public-base [--classes airplane,automobile,bird,cat,deer] [--resume]

Training is `latentfuse`'s own run (configs/public-base-cifar10.toml: one client at t_cut 0,
so the server learns every timestep), checkpointed every 250 steps and resumable. The
package, `checkpoints/<name>/`, holds `unet/` (the EMA weights), `base.json` (its class
names in row order, its null row, what it saw, steps and time) and a model card.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from latentfuse.checkpointing import atomic_write_dir
from latentfuse.config import load_config
from latentfuse.data.datasets import load_cifar10

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "public-base-cifar10.toml"


def class_subset(classes: list[str], folder: Path) -> Path:
    """An ImageFolder of the test split's images of `classes` (symbolic links)."""
    test = load_cifar10("test")
    unknown = sorted(set(classes) - set(test.class_names))
    if unknown:
        raise ValueError(f"--classes {unknown} are not CIFAR-10 classes {list(test.class_names)}")
    for record in test.records:
        name = test.class_names[record.label]
        if name in classes:
            link = folder / name / record.path.name
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.symlink_to(record.path)
    return folder


def model_card(name: str, record: dict) -> str:
    seen, minutes = record["trained_on"], record["train_seconds"] / 60
    return f"""# {name}

A public base for latentfuse (docs/pretrained.md): a class-conditional `UNet2DModel`
(the collaboration benchmark's server denoiser, {record["parameters"]:,} parameters) over the
latents of `checkpoints/cifar10-vae`, trained on every timestep with label dropout
{record["label_dropout"]} (its last class row is the null class).

- Saw: {seen["images"]} images of the CIFAR-10 **test** split, classes {", ".join(seen["classes"])}.
  No client of the benchmarks holds or holds out a test-split image
  (`tests/test_public_base.py` checks the image hashes).
- Steps: {record["steps"]} at batch {record["batch_size"]}; {minutes:.0f} minutes on
  {record["machine"]}.
- Made by: `{record["command"]}`.

Start a run from it: `latentfuse train --data DIR --output-dir OUT --pretrained
checkpoints/{name} [--adapter lora]`.
"""


def main(argv: list[str] | None = None) -> int:
    from latentfuse.models import count_parameters
    from latentfuse.pipelines.folder import load_unet
    from latentfuse.training.runner import train

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="checkpoints/<name> to write")
    parser.add_argument("--work", required=True, help="the run folder (checkpoints, previews)")
    parser.add_argument("--classes", default="", help="comma-separated class names (default all)")
    parser.add_argument("--steps", type=int, default=None, help="train.max_steps (default 6000)")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    work = Path(args.work)
    overrides = [] if args.steps is None else [f"train.max_steps={args.steps}"]
    classes = [c for c in args.classes.split(",") if c]
    if classes:
        folder = class_subset(classes, work.parent / f"{work.name}-images")
        overrides += [f'data.source="{folder}"', 'data.subfolder=""']
    config = load_config(CONFIG, overrides)
    started = time.time()
    model = train(config, work, resume=args.resume)
    seconds = time.time() - started
    timing = work / "base-timing.json"  # a resumed run adds to the time of the sessions before
    if timing.is_file():
        seconds += json.loads(timing.read_text())["seconds"]
    timing.write_text(json.dumps({"seconds": seconds}))
    described = json.loads((model / "collafuse.json").read_text())
    unet = load_unet(model / "server_unet")
    names = described["class_names"]
    record = {
        "class_names": names,
        "null_class": len(names),
        "trained_on": {
            "split": "test",
            "classes": names,
            "images": described["clients"]["0"]["num_train_images"],
        },
        "steps": config.train.max_steps,
        "batch_size": config.train.server_batch_size,
        "label_dropout": config.train.label_dropout,
        "parameters": count_parameters(unet),
        "train_seconds": round(seconds),
        "machine": "2 CPU cores shared with other jobs, one thread",
        "vae": config.vae,
        "command": "python -m experiments.public_base " + " ".join(argv or sys.argv[1:]),
        "run_config": config.to_dict(),
    }

    def write(tmp: Path) -> None:
        shutil.copytree(model / "server_unet", tmp / "unet")
        (tmp / "base.json").write_text(json.dumps(record, indent=2))
        (tmp / "README.md").write_text(model_card(args.name, record))

    out = atomic_write_dir(ROOT / "checkpoints" / args.name, write)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
