"""`latentfuse sample`: sample a grid of images for one or every client of a model folder."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

logger = logging.getLogger(__name__)


def add_sample_parser(commands: argparse._SubParsersAction) -> None:
    """Register the `sample` sub-command."""
    sample = commands.add_parser(
        "sample",
        help="sample images from a trained CollaFuse model",
        description="Example: latentfuse sample --model checkpoints/cifar10-collafuse "
        "--client 2 --num-images 16 --out grid.png",
    )
    sample.add_argument(
        "--model",
        default="checkpoints/cifar10-collafuse",
        help="model folder written by train.py (or a hub id)",
    )
    sample.add_argument(
        "--client", default="all", help="client id, or 'all' for one row block per client (default)"
    )
    sample.add_argument(
        "--class-label",
        type=int,
        default=None,
        help="class label (default: drawn from the client's classes)",
    )
    sample.add_argument("--num-images", type=int, default=16, help="images per client")
    sample.add_argument("--num-inference-steps", type=int, default=50)
    sample.add_argument("--scheduler", default="ddim", choices=["ddpm", "ddim", "dpm", "euler"])
    sample.add_argument("--guidance-scale", type=float, default=1.0)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--out", default="grid.png")
    sample.set_defaults(func=run_sample)


def _scheduler(name: str, config):
    from diffusers import (
        DDIMScheduler,
        DDPMScheduler,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
    )

    classes = {
        "ddpm": DDPMScheduler,
        "ddim": DDIMScheduler,
        "dpm": DPMSolverMultistepScheduler,
        "euler": EulerDiscreteScheduler,
    }
    return classes[name].from_config(config)


def run_sample(args: argparse.Namespace) -> int:
    """Sample `--num-images` per client and save one grid (a row block per client)."""
    import torch

    from .imaging import make_grid, save_image
    from .pipelines import CollaFusePipeline

    if args.num_images < 1:
        raise ValueError(f"--num-images must be >= 1, got {args.num_images}")
    model = Path(args.model)
    if not model.exists() and (args.model.startswith((".", "/")) or args.model.count("/") != 1):
        raise FileNotFoundError(f"model folder not found: {args.model}")
    pipe = CollaFusePipeline.from_pretrained(args.model)
    pipe.scheduler = _scheduler(args.scheduler, pipe.scheduler.config)
    clients = sorted(int(c) for c in pipe.collafuse_config["clients"])
    chosen = clients if args.client == "all" else [int(args.client)]
    start, blocks = time.time(), []
    for client_id in chosen:
        generators = [
            torch.Generator().manual_seed(args.seed * 100_000 + i) for i in range(args.num_images)
        ]
        labels = None if args.class_label is None else [args.class_label] * args.num_images
        images = pipe(
            client_id=client_id,
            class_labels=labels,
            generator=generators,
            num_inference_steps=args.num_inference_steps,
            guidance_scale=args.guidance_scale,
            output_type="pt",
        ).images
        blocks.append(images * 2 - 1)
    grid = make_grid(torch.cat(blocks), columns=min(8, args.num_images))
    save_image(grid, args.out)
    print(
        f"wrote {args.out}: {args.num_images} images for client(s) {chosen} "
        f"({args.scheduler}, {args.num_inference_steps} steps) in {time.time() - start:.1f} s"
    )
    return 0
