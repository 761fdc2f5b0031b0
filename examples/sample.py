"""Sample a grid of images for every client of a CollaFuse model folder.

    python examples/sample.py runs/demo/model --out samples --num-images 16 --steps 50

Writes `<out>/client-<id>.png` per client; image i of a grid uses seed `--seed + i`, so a grid
is the same whatever the batch size, and each client's label is drawn from its own classes.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
)
from PIL import Image

from latentfuse import CollaFusePipeline

SCHEDULERS = {
    "ddpm": DDPMScheduler,
    "ddim": DDIMScheduler,
    "dpm": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
}


def grid(images: list[Image.Image], columns: int) -> Image.Image:
    """Paste equally sized images into rows of `columns`."""
    width, height = images[0].size
    rows = math.ceil(len(images) / columns)
    sheet = Image.new("RGB", (columns * width, rows * height))
    for i, image in enumerate(images):
        sheet.paste(image, ((i % columns) * width, (i // columns) * height))
    return sheet


def main(argv: list[str] | None = None) -> int:
    """Load the model, swap the scheduler if asked, write one grid per client."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="model folder written by train.py (or a hub repo id)")
    parser.add_argument("--out", type=Path, default=Path("samples"))
    parser.add_argument("--num-images", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance-scale", type=float, default=1.0)
    parser.add_argument("--scheduler", choices=sorted(SCHEDULERS), default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = CollaFusePipeline.from_pretrained(args.model).to(device)
    if args.scheduler:
        pipe.scheduler = SCHEDULERS[args.scheduler].from_config(pipe.scheduler.config)
    args.out.mkdir(parents=True, exist_ok=True)
    for client_id in pipe.client_ids:
        seeds = range(args.seed, args.seed + args.num_images)
        images = pipe(
            client_id=client_id,
            generator=[torch.Generator(device).manual_seed(s) for s in seeds],
            num_inference_steps=args.steps,
            guidance_scale=args.guidance_scale,
        ).images
        path = args.out / f"client-{client_id}.png"
        grid(images, columns=math.ceil(math.sqrt(len(images)))).save(path)
        print(f"client {client_id} (hand-off {pipe.handoff_t(client_id)}): {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
