"""Which server loss weighting learns E[eps | z_s] best? (method.md §2, §4)

Trains the same small server UNet from `once` releases at `t_cut` with each weighting of the
exact objective, the authors' original objective, and a central reference trained directly on
z0 (what a global model sees), then scores each on held-out latents with the ordinary
denoising error E||eps_theta(z_s, s) - eps||^2, z_s ~ q(z_s | z0), s >= t_cut (lower is better).

    python bench/weighting_experiment.py --t-cut 100 --steps 600 --out results/weighting.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from latentfuse.config import UNetConfig, load_config
from latentfuse.data.autoencoder import load_vae, vae_fingerprint
from latentfuse.data.datasets import load_cifar10
from latentfuse.data.latents import cached_latents
from latentfuse.method.client import Client
from latentfuse.method.release_key import new_release_key
from latentfuse.method.schedule import make_scheduler
from latentfuse.method.server import Server
from latentfuse.method.split import DiffusionSplit
from latentfuse.models import build_unet
from latentfuse.paths import DEFAULT_VAE_DIR, cache_dir
from latentfuse.training.engine import denoising_loss

VARIANTS = [
    ("exact", "none"),
    ("exact", "inverse_lambda"),
    ("exact", "inverse_lambda2"),
    ("original", "none"),
    ("central", "none"),
]


def central_batch(
    split: DiffusionSplit, z0: torch.Tensor, labels: torch.Tensor, batch: int, g: torch.Generator
) -> dict:
    """The ordinary objective on clean latents at s >= t_cut (the upper bound)."""
    index = torch.randint(len(z0), (batch,), generator=g)
    s = torch.randint(split.handoff_t, split.num_train_timesteps, (batch,), generator=g)
    eps = torch.randn(z0[index].shape, generator=g)
    abar = split.alphas_cumprod[s].float().view(-1, 1, 1, 1)
    z_s = abar.sqrt() * z0[index] + (1 - abar).sqrt() * eps
    return {
        "sample": z_s,
        "timestep": s,
        "class_labels": labels[index],
        "target": eps,
        "weight": torch.ones(batch),
    }


@torch.no_grad()
def evaluate(unet, split: DiffusionSplit, z0, labels, bands: list[tuple[int, int]]) -> dict:
    """Mean ||eps_theta - eps||^2 per timestep band on held-out latents (fixed noise)."""
    g = torch.Generator().manual_seed(1234)
    out = {}
    for low, high in bands:
        s = torch.randint(low, high, (len(z0),), generator=g)
        eps = torch.randn(z0.shape, generator=g)
        abar = split.alphas_cumprod[s].float().view(-1, 1, 1, 1)
        pred = unet(abar.sqrt() * z0 + (1 - abar).sqrt() * eps, s, class_labels=labels).sample
        out[f"{low}-{high}"] = (pred - eps).pow(2).mean().item()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--t-cut", type=int, default=100)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--num-train", type=int, default=5000)
    parser.add_argument("--num-eval", type=int, default=1000)
    parser.add_argument("--out", default="results/weighting.json")
    args = parser.parse_args()
    config = load_config(None, [f"split.t_cut={args.t_cut}"])
    scheduler = make_scheduler(config)
    split = DiffusionSplit.from_scheduler(scheduler, args.t_cut)
    dataset = load_cifar10("train")
    vae = load_vae(DEFAULT_VAE_DIR)
    picks = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))
    train_idx, eval_idx = picks[: args.num_train].tolist(), picks[-args.num_eval :].tolist()
    vae_hash = vae_fingerprint(vae)
    train = cached_latents(
        vae, dataset, train_idx, cache_dir() / "latents" / "weighting-train", vae_hash=vae_hash
    )
    held = cached_latents(
        vae, dataset, eval_idx, cache_dir() / "latents" / "weighting-eval", vae_hash=vae_hash
    )
    torch.manual_seed(0)
    template = build_unet(UNetConfig((32, 64), norm_num_groups=8), 16, 4, 11)
    high = config.split.num_train_timesteps
    mid = args.t_cut + (high - args.t_cut) // 5
    bands = [(args.t_cut, mid), (mid, high), (args.t_cut, high)]
    results = {
        "t_cut": args.t_cut,
        "steps": args.steps,
        "batch": args.batch,
        "num_train": args.num_train,
        "num_eval": args.num_eval,
        "variants": {},
    }
    for objective, weighting in VARIANTS:
        unet = copy.deepcopy(template)
        optimizer = torch.optim.AdamW(unet.parameters(), lr=3e-4)
        client = Client(
            0, train.latents, train.labels, split, "once", release_key=new_release_key()
        )
        server = Server({0: split}, objective if objective != "central" else "exact", weighting)
        server.receive(client.make_release(0))
        g = torch.Generator().manual_seed(0)
        start = time.time()
        for _ in range(args.steps):
            if objective == "central":
                batch = central_batch(split, train.latents, train.labels, args.batch, g)
            else:
                batch = server.draw_batch(args.batch, 0.0, 10)
            loss = denoising_loss(unet, batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        scores = evaluate(unet.eval(), split, held.latents, held.labels, bands)
        name = f"{objective}/{weighting}"
        results["variants"][name] = {**scores, "train_seconds": time.time() - start}
        print(f"{name:26s} " + "  ".join(f"{k}: {v:.4f}" for k, v in scores.items()), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
