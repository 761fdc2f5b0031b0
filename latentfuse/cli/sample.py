"""`latentfuse sample`: sample a grid of images for one or every client of a model folder.

With `--server`, a deployed client samples through `latentfuse serve`: the server runs the
steps t >= t_cut, this client finishes them with its own denoiser and decoder (`--client-dir`).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

if TYPE_CHECKING:
    import torch

from latentfuse.cli.common import HelpFormatter, check_image_path, parse_client
from latentfuse.description import default_guidance
from latentfuse.paths import check_model_path

logger = logging.getLogger(__name__)


def add_sample_parser(commands: argparse._SubParsersAction) -> None:
    """Register the `sample` sub-command."""
    sample = commands.add_parser(
        "sample",
        help="sample images from a trained CollaFuse model",
        description="Example: latentfuse sample --model checkpoints/cifar10-collafuse "
        "--client 2 --num-images 16 --out grid.png\n"
        "         latentfuse sample --server https://server:8443 --token-file client-0.token "
        "--client-dir client-0/model --client-id 0 --tls-ca cert.pem --out grid.png",
        formatter_class=HelpFormatter,
    )
    sample.add_argument(
        "--model",
        default="checkpoints/cifar10-collafuse",
        help="model folder written by train.py (or a hub id)",
    )
    sample.add_argument(
        "--client", default="all", help="client id, or 'all' for one row block per client"
    )
    sample.add_argument(
        "--class-label",
        type=int,
        default=None,
        help="class label (default: drawn from the client's classes)",
    )
    sample.add_argument("--num-images", type=int, default=16, help="images per client")
    sample.add_argument("--num-inference-steps", type=int, default=50, help="denoising steps")
    sample.add_argument(
        "--scheduler", default="ddim", choices=["ddpm", "ddim", "dpm", "euler"], help="sampler"
    )
    sample.add_argument(
        "--guidance-scale",
        type=float,
        default=None,
        help="classifier-free guidance (default: what the model records it was made for)",
    )
    sample.add_argument("--seed", type=int, default=0, help="seed of the first image")
    sample.add_argument("--out", default="grid.png", help="output image (.png, .jpg, ...)")
    remote = sample.add_argument_group("through a server (deployment)")
    remote.add_argument("--server", help="URL of `latentfuse serve`: it runs t >= t_cut")
    remote.add_argument("--token-file", help="this client's token file")
    remote.add_argument("--client-dir", help="this client's model folder (`latentfuse client`)")
    remote.add_argument("--client-id", type=int, help="this client's id")
    remote.add_argument("--tls-ca", help="CA or self-signed certificate to trust (PEM)")
    remote.add_argument(
        "--retry-for",
        type=float,
        default=300.0,
        help="seconds to keep retrying an unreachable server",
    )
    sample.set_defaults(func=run_sample)


def _scheduler(name: str, config):
    from latentfuse.deploy.config import sampling_scheduler

    return sampling_scheduler(name, config)


def run_sample(args: argparse.Namespace) -> int:
    """Sample `--num-images` per client and save one grid (a row block per client)."""
    import torch

    from latentfuse.pipelines import CollaFusePipeline
    from latentfuse.training.runner import labelled_grid

    if args.num_images < 1:
        raise ValueError(f"--num-images must be >= 1, got {args.num_images}")
    check_image_path(args.out)
    if args.client != "all" and not (args.client.isascii() and args.client.isdigit()):
        parse_client(args.client, [])  # its one-line error, before the model is loaded
    if args.server:
        return run_remote_sample(args)
    check_model_path(args.model)
    description = Path(args.model) / "collafuse.json"
    if description.is_file():  # a local model: its clients are known before it is loaded
        known = sorted(int(c) for c in json.loads(description.read_text())["clients"])
        parse_client(args.client, known)
    pipe = CollaFusePipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = _scheduler(args.scheduler, pipe.scheduler.config)
    clients = sorted(int(c) for c in pipe.collafuse_config["clients"])
    chosen = parse_client(args.client, clients)
    if args.guidance_scale is None:
        args.guidance_scale = default_guidance(pipe.collafuse_config)
    start, blocks = time.time(), []
    for client_id in tqdm(chosen, desc="clients", disable=len(chosen) < 2):
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
    columns = min(8, args.num_images)
    grid = labelled_grid(
        *client_rows(blocks, chosen, pipe.collafuse_config, columns), columns=columns
    )
    check_image_path(args.out)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.out)
    print(
        f"wrote {args.out}: {args.num_images} images for client(s) {chosen} "
        f"({args.scheduler}, {args.num_inference_steps} steps) in {time.time() - start:.1f} s"
    )
    return 0


def client_rows(
    blocks: list[torch.Tensor], chosen: list[int], description: dict, columns: int
) -> tuple[torch.Tensor, list[str]]:
    """Each client's images in rows of their own (a short last row padded white), and the
    name of each row: "client 3 (cat, dog)" on a client's first row."""
    import torch

    images, names = [], []
    for client_id, block in zip(chosen, blocks, strict=True):
        rows = -(-len(block) // columns)
        pad = rows * columns - len(block)
        images += [block, torch.ones(pad, *block.shape[1:])] if pad else [block]
        classes = description["clients"][str(client_id)].get("class_names", [])
        shown = ", ".join(classes[:4]) + (", ..." if len(classes) > 4 else "")
        label = f"client {client_id}" + (f" ({shown})" if shown else "")
        names += [label] + [""] * (rows - 1)
    return torch.cat(images), names


def run_remote_sample(args: argparse.Namespace) -> int:
    """Sample through `--server` and finish locally with `--client-dir`; save one grid."""
    from latentfuse.data.imaging import make_grid, save_image
    from latentfuse.deploy.client.remote import RemoteError, RemoteServer, RetryPolicy, read_token
    from latentfuse.deploy.client.remote_sample import sample_remote

    missing = [
        f"--{n}"
        for n in ("token-file", "client-dir", "client-id")
        if getattr(args, n.replace("-", "_")) is None
    ]
    if missing:
        raise ValueError(f"sampling through --server also needs {', '.join(missing)}")
    if not Path(args.client_dir).is_dir():  # never fall back to a hub download of a typo
        raise FileNotFoundError(
            f"--client-dir {args.client_dir}: no such folder (the model folder that "
            "`latentfuse client` exported: WORK_DIR/model)"
        )
    logging.getLogger("latentfuse").setLevel(logging.INFO)  # show retries, as `client` does
    remote = RemoteServer(
        args.server,
        read_token(args.token_file),
        args.client_id,
        args.tls_ca,
        retry=RetryPolicy(budget=args.retry_for),
    )
    start = time.time()
    try:
        images = sample_remote(
            remote,
            args.client_dir,
            args.num_images,
            args.num_inference_steps,
            args.scheduler,
            args.guidance_scale,
            args.seed,
            args.class_label,
        )
    except RemoteError as error:
        raise ValueError(f"server {args.server}: {error}") from None
    finally:
        remote.close()
    save_image(make_grid(images * 2 - 1, columns=min(8, args.num_images)), args.out)
    print(
        f"wrote {args.out}: {args.num_images} images for client {args.client_id} through "
        f"{args.server} ({args.scheduler}, {args.num_inference_steps} steps) in "
        f"{time.time() - start:.1f} s"
    )
    return 0
