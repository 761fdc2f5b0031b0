"""How often the server's release plausibility check refuses honest releases, and poison.

    OMP_NUM_THREADS=1 python bench/bench_release_checks.py [--images 10000] [--out FILE]

Honest releases: the 10,000 CIFAR-10 test images encoded by the shipped autoencoder (its own
scaling), each released at every cut below with fresh noise, checked by the server's own
`implausible_releases` under the deployment defaults (`deploy.max_latent_abs`,
`max_latent_rms`), as sent in float32 and rounded to float16 (the wire's `fp16`). Poison at each
cut: all-zero latents, constant latents at 4x the honest rms, 58 spikes just under the element
bound on zeros, one channel zeroed in an honest release; and, as the case no check of a single
release can refuse, the same 58 spikes on the level's own noise (an in-range z0 released
honestly: what the per-client gradient bound, `train.server_client_clip`, is for). Prints the
refused counts (target: 0 honest refused, every poison but the last refused).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from latentfuse.data.autoencoder import load_vae, vae_fingerprint
from latentfuse.data.datasets import load_cifar10
from latentfuse.data.latents import cached_latents
from latentfuse.deploy.config import DeployConfig
from latentfuse.deploy.server.service import implausible_releases
from latentfuse.method.split import DiffusionSplit
from latentfuse.paths import DEFAULT_VAE_DIR, cache_dir

CUTS = (1, 50, 100, 200, 500, 700, 900, 999)


def poisons(
    z: torch.Tensor, max_abs: float, noise: float, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """In-range poisons shaped like `z` (n, c, h, w); `noise`: the level's noise std."""
    n, dim = len(z), z[0].numel()
    rms = z.flatten(1).pow(2).mean(1).sqrt().mean()
    spikes = torch.zeros_like(z).flatten(1)
    picks = torch.stack([torch.randperm(dim, generator=generator)[:58] for _ in range(n)])
    spikes.scatter_(1, picks, 0.99 * max_abs)
    one_channel = z.clone()
    one_channel[:, 1] = 0.0
    return {
        "all-zero": torch.zeros_like(z),
        "constant at 4x rms": torch.full_like(z, float(4 * rms)),
        "58 spikes under the element bound": spikes.view_as(z),
        "one channel zeroed": one_channel,
        "58 spikes on the level's noise": spikes.view_as(z)
        + noise * torch.randn(z.shape, generator=generator, dtype=z.dtype),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--out", type=Path, default=None, help="write the counts as JSON")
    args = parser.parse_args()
    deploy = DeployConfig(class_names=("x",))
    vae = load_vae(str(DEFAULT_VAE_DIR))
    test = load_cifar10("test")
    indices = list(range(min(args.images, len(test))))
    folder = cache_dir() / "latents" / f"bench-release-checks-{len(indices)}"
    z0 = cached_latents(vae, test, indices, folder, 32, vae_hash=vae_fingerprint(vae)).latents
    z0 = z0.double()
    alphas = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for cut in CUTS:
        split = DiffusionSplit(alphas, cut)
        eps = torch.randn(z0.shape, generator=generator, dtype=torch.float64)
        honest = split.release(z0.flatten(1), eps.flatten(1)).view_as(z0)
        row = {"t_cut": cut, "honest": len(honest)}
        for name, sent in (("honest_refused", honest), ("honest_fp16_refused", honest.half())):
            row[name] = len(
                implausible_releases(
                    split, sent.double(), deploy.max_latent_abs, deploy.max_latent_rms
                )
            )
        noise = (1 - split.abar_release) ** 0.5
        for name, poison in poisons(honest[:300], deploy.max_latent_abs, noise, generator).items():
            found = implausible_releases(
                split, poison, deploy.max_latent_abs, deploy.max_latent_rms
            )
            row[name] = f"{len(found)}/{len(poison)}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out is not None:
        record = {
            "command": f"OMP_NUM_THREADS=1 python bench/bench_release_checks.py --out {args.out}",
            "what": "the server's release plausibility check (latentfuse.deploy.server.service."
            "implausible_releases) under the deployment defaults, on the first "
            f"{len(indices):,} CIFAR-10 test images encoded by the shipped autoencoder, "
            "released at each cut with fresh noise (sent as float32 and as float16); poisons: "
            "300 each",
            "rows": rows,
        }
        args.out.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
