"""Throughput and reconstruction quality of the shipped autoencoder on CIFAR-10 train images.

The autoencoder trained on the test split, so the train split is held out for it.

Example: python bench/bench_autoencoder.py --num-images 1000 --batch-size 250
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

from latentfuse.data.autoencoder import decode, encode, load_vae, psnr
from latentfuse.data.datasets import load_cifar10, load_image
from latentfuse.paths import DEFAULT_VAE_DIR


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmark's options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae", default=str(DEFAULT_VAE_DIR), help="autoencoder folder")
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--split", default="train", choices=("train", "test"))
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0, help="which images are drawn")
    args = parser.parse_args(argv)
    if args.num_images < 1 or args.batch_size < 1:
        parser.error(f"--num-images and --batch-size must be >= 1, got {args}")
    return args


def _timed_batches(
    fn: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor, batch_size: int, device: str
) -> tuple[torch.Tensor, float]:
    """Run `fn` over `inputs` in batches (the first batch once untimed, as warm-up)."""
    fn(inputs[:batch_size])
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    outputs = [fn(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return torch.cat(outputs), time.perf_counter() - start


def _stored_dtypes(path: Path) -> set[str]:
    """The dtypes of the tensors in a safetensors file, as written (e.g. F16)."""
    with safe_open(path, framework="pt") as f:
        names = f.keys()  # a safe_open handle is not iterable itself
        return {f.get_slice(name).get_dtype() for name in names}


def main(argv: list[str] | None = None) -> None:
    """Print encode/decode throughput, mean PSNR, latent shape and checkpoint size."""
    args = parse_args(argv)
    vae_dir = Path(args.vae)
    vae = load_vae(vae_dir, device=args.device)
    dataset = load_cifar10(args.split)
    generator = torch.Generator().manual_seed(args.seed)
    # A random draw, not the first n: the folder is sorted by class.
    picks = torch.randperm(len(dataset), generator=generator)[: args.num_images].tolist()
    images = torch.stack([load_image(dataset.records[i].path, args.resolution) for i in picks])
    images = images.to(args.device)  # (n, 3, h, w)

    latents, encode_s = _timed_batches(
        lambda x: encode(vae, x), images, args.batch_size, args.device
    )
    recon, decode_s = _timed_batches(
        lambda z: decode(vae, z), latents, args.batch_size, args.device
    )
    scores = psnr(images, recon)

    weights = sorted(vae_dir.glob("*.safetensors"))
    size = sum(p.stat().st_size for p in weights)
    n = len(images)
    stored = sorted({dtype for path in weights for dtype in _stored_dtypes(path)})
    print(f"autoencoder      {vae_dir} ({type(vae).__name__}, {vae.num_parameters():,} params)")
    print(f"device           {args.device}, torch threads {torch.get_num_threads()}, {vae.dtype}")
    print(f"images           {n} from CIFAR-10 {args.split}, batch size {args.batch_size}")
    print(
        f"latent shape     {tuple(latents.shape[1:])} (image {tuple(images.shape[1:])}, "
        f"{images[0].numel() / latents[0].numel():.1f}x fewer values)"
    )
    print(f"encode           {n / encode_s:10.1f} images/s ({encode_s:.3f} s)")
    print(f"decode           {n / decode_s:10.1f} images/s ({decode_s:.3f} s)")
    print(f"decode / encode  {decode_s / encode_s:10.2f}x the time")
    print(
        f"mean PSNR        {scores.mean().item():10.2f} dB (min {scores.min().item():.2f}, "
        f"posterior mode)"
    )
    print(
        f"checkpoint size  {size:,} bytes = {size / 2**20:.2f} MB "
        f"({', '.join(p.name for p in weights) or 'no safetensors found'}, stored as {stored})"
    )


if __name__ == "__main__":
    main()
