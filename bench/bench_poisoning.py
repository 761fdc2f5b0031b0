"""The damage one poisoning client does to the shared denoiser, with and without the bounds on a
client's influence (its share of a batch, `deploy.balance`; its gradient, `client_gradient_clip`).

    OMP_NUM_THREADS=1 python bench/bench_poisoning.py --work runs/poisoning \
        --out results/poisoning.json [--steps 1500] [--resume]

The data-scarce setting of the frontier (configs/frontier-cifar10-cpu.toml: 5 clients of
CIFAR-10 by class, 250 images each, cut 100, the benchmark's server UNet). Client 4 poisons:
besides its 250 honest releases it uploads 300 releases of 58 spikes just under the element
bound, released honestly at its level (the in-range poison that passes every per-release check
at cut 100: results/release-checks.json), labelled with the other clients' classes (what
declared classes, `serve --declare`, would refuse; here the operator declared none). Only the
server's denoiser is trained (a client's denoiser never sees another client's releases), for
`--steps` steps, in each arm of {honest, poisoned} x {balance "releases", balance "clients",
"clients" + clip 1}.

Scores, the same draws for every arm: the EMA model's eps-prediction MSE on the honest clients'
(0-3) held-out images at server timesteps s in [cut, T); and the FID of the server's hand-off,
decoded (a 25-step DDIM chain of the server down to the hand-off, its estimate of z0 there,
decoded by the autoencoder; labels drawn from clients 0-3's classes) against clients 0-3's
training images. The FID of a hand-off estimate is not a sample's FID: compare arms, not other
tables. Every arm is kept in `--work` as it finishes (`--resume` skips finished arms).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import tomllib
from pathlib import Path

import torch
from diffusers import DDIMScheduler
from tqdm import tqdm

from latentfuse.checkpointing import atomic_write_json
from latentfuse.config import apply_overrides, config_from_dict
from latentfuse.data.autoencoder import decode
from latentfuse.data.datasets import load_image
from latentfuse.deploy.config import DeployConfig
from latentfuse.deploy.server.service import implausible_releases
from latentfuse.evaluation.features import InceptionExtractor, extract_features, to_uint8
from latentfuse.evaluation.metrics import FeatureStats, distribution_scores
from latentfuse.method.server import Server
from latentfuse.method.transport import ReleaseBatch
from latentfuse.training.engine import Engine, make_accelerator
from latentfuse.training.setup import build_run

sys.path.insert(0, str(Path(__file__).parent))
from bench_release_checks import poisons  # noqa: E402  (the same poison the check bench sends)

ARMS = {  # name: (poisoned, balance, client_gradient_clip); the questions first
    "honest, balance releases": (False, "releases", 0.0),
    "poisoned, balance releases": (True, "releases", 0.0),
    "poisoned, balance clients + clip": (True, "clients", 1.0),
    "poisoned, balance clients": (True, "clients", 0.0),
    "honest, balance clients + clip": (False, "clients", 1.0),
    "honest, balance clients": (False, "clients", 0.0),
}
POISONER, NUM_POISON = 4, 300


def load_config(path: Path, steps: int):
    """The frontier's run config at 250 images per client, cut 100, seed 0."""
    values = tomllib.loads(path.read_text())
    values.pop("benchmark", None)
    apply_overrides(
        values,
        ["data.max_images_per_client=250", "split.t_cut=100", f"train.max_steps={steps}"],
    )
    return config_from_dict(values)


def poisoned_release(
    honest: ReleaseBatch, split, deploy: DeployConfig, victims: torch.Tensor
) -> ReleaseBatch:
    """NUM_POISON releases of spikes under the element bound, released at the client's level,
    labelled with the other clients' classes (`victims`: labels drawn from; a client that
    declared its classes could not: `serve --declare`)."""
    g = torch.Generator().manual_seed(4)
    like = honest.latents[:1].expand(NUM_POISON, *honest.latents.shape[1:]).double()
    noise = (1 - split.abar_release) ** 0.5
    latents = poisons(like, deploy.max_latent_abs, noise, g)["58 spikes on the level's noise"]
    labels = victims[torch.randint(len(victims), (NUM_POISON,), generator=g)]
    ids = tuple(range(100_000, 100_000 + NUM_POISON))
    return ReleaseBatch(honest.client_id, ids, latents.float(), labels, honest.handoff_t, 0)


def held_out(run, honest: list[int]) -> dict[str, torch.Tensor]:
    """Fixed (z_s, s, label, eps) on the honest clients' held-out images, s in [cut, T)."""
    from latentfuse.data.latents import cached_latents
    from latentfuse.paths import cache_dir

    indices = [i for share in run.shares if share.client_id in honest for i in share.eval_indices]
    folder = cache_dir() / "latents" / f"bench-poisoning-heldout-{len(indices)}"
    encoded = cached_latents(run.vae, run.dataset, indices, folder, 32, vae_hash=run.vae_hash)
    z0 = encoded.latents
    g = torch.Generator().manual_seed(1)
    repeats = 4  # draws per image
    z0 = z0.repeat(repeats, 1, 1, 1)
    cut, T = run.clients[0].split.handoff_t, run.config.split.num_train_timesteps
    s = torch.randint(cut, T, (len(z0),), generator=g)
    eps = torch.randn(z0.shape, generator=g)
    abar = run.scheduler.alphas_cumprod[s].view(-1, 1, 1, 1)
    return {
        "sample": abar.sqrt() * z0 + (1 - abar).sqrt() * eps,
        "timestep": s,
        "class_labels": encoded.labels.repeat(repeats),
        "target": eps,
    }


@torch.no_grad()
def heldout_mse(unet: torch.nn.Module, data: dict[str, torch.Tensor]) -> float:
    """Mean eps-prediction MSE over the held-out draws."""
    total = 0.0
    for start in range(0, len(data["sample"]), 256):
        part = {k: v[start : start + 256] for k, v in data.items()}
        out = unet(part["sample"], part["timestep"], class_labels=part["class_labels"]).sample
        total += (out - part["target"]).pow(2).flatten(1).mean(1).sum().item()
    return total / len(data["sample"])


@torch.no_grad()
def handoff_images(unet, run, labels: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """The server's hand-off, decoded: DDIM-25 from T down to the hand-off, then the scheduler's
    estimate of z0 at its last server step; (n, 3, h, w) in [-1, 1]."""
    scheduler = DDIMScheduler.from_config(run.scheduler.config)
    scheduler.set_timesteps(25)
    handoff = run.clients[0].split.handoff_t
    g = torch.Generator().manual_seed(seed)
    channels, size = unet.config.in_channels, unet.config.sample_size
    z = torch.randn((len(labels), channels, size, size), generator=g)
    estimate = z
    for t in scheduler.timesteps:
        if int(t) < handoff:
            break
        eps = unet(z, t.expand(len(z)), class_labels=labels).sample
        step = scheduler.step(eps, t, z)
        z, estimate = step.prev_sample, step.pred_original_sample
    return decode(run.vae, estimate)


def train_arm(run, releases: list[ReleaseBatch], balance: str, clip: float, steps: int):
    """The server denoiser trained `steps` steps on `releases`; its EMA model."""
    config = run.config
    server = Server(
        {c.client_id: c.split for c in run.clients},
        config.split.objective,
        config.split.weighting,
        config.server_labels,
        seed=config.train.seed,
        balance=balance,
    )
    for batch in releases:
        server.receive(batch)
    unet = copy.deepcopy(run.server_unet)  # the same initial weights in every arm
    engine = Engine(
        make_accelerator(config.train),
        {"server": unet},
        {"server": config.train.learning_rate},
        config.train,
        config.to_dict(),
        group_clip={"server": clip},
    )
    null = len(run.dataset.class_names)
    draw = lambda: {  # noqa: E731
        "server": server.draw_batch(
            config.train.server_batch_size, config.train.label_dropout, null
        )
    }
    for _ in tqdm(range(steps), desc="server", mininterval=30):
        engine.train_step(draw)
    return engine.ema_model("server")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/frontier-cifar10-cpu.toml"))
    parser.add_argument("--work", type=Path, required=True, help="one JSON per finished arm")
    parser.add_argument("--out", type=Path, default=None, help="the summary JSON")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--num-images", type=int, default=400, help="hand-off images per arm")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    if args.work.is_dir() and any(args.work.glob("*.json")) and not args.resume:
        parser.error(f"{args.work} holds finished arms: pass --resume to continue")
    args.work.mkdir(parents=True, exist_ok=True)
    config = load_config(args.config, args.steps)
    run = build_run(config, args.work / "run")
    deploy = DeployConfig(class_names=tuple(run.dataset.class_names))
    honest = [c.make_release(0) for c in run.clients]
    split = run.clients[POISONER].split
    honest_ids = [c.client_id for c in run.clients if c.client_id != POISONER]
    labels = torch.cat([honest[c].labels for c in honest_ids])
    poison = poisoned_release(honest[POISONER], split, deploy, labels)
    refused = implausible_releases(
        split, poison.latents.double(), deploy.max_latent_abs, deploy.max_latent_rms
    )
    data = held_out(run, honest_ids)
    pick = torch.randperm(len(labels), generator=torch.Generator().manual_seed(2))
    sample_labels = labels[pick[: args.num_images]]
    extractor = InceptionExtractor(None, "cpu")
    reference_indices = [i for c in honest_ids for i in run.shares[c].train_indices]
    real = torch.stack([load_image(run.dataset.records[i].path, 32) for i in reference_indices])
    reference = FeatureStats.from_features(
        extract_features(extractor, to_uint8(real), desc="real features")
    )
    rows = []
    for name, (poisoned, balance, clip) in ARMS.items():
        path = args.work / (name.replace(" ", "-").replace(",", "").replace("+", "plus") + ".json")
        if path.is_file():
            rows.append(json.loads(path.read_text()))
            continue
        start = time.perf_counter()
        releases = honest + ([poison] if poisoned else [])
        model = train_arm(run, releases, balance, clip, args.steps)
        train_seconds = time.perf_counter() - start
        images = handoff_images(model, run, sample_labels)
        features = extract_features(extractor, to_uint8(images), desc=f"{name} features")
        scores = distribution_scores(FeatureStats.from_features(features), reference)
        row = {
            "arm": name,
            "poisoned": poisoned,
            "balance": balance,
            "client_gradient_clip": clip,
            "heldout_mse": heldout_mse(model, data),
            "handoff_fid": scores["fd"],
            "handoff_kid": scores["kid"],
            "train_seconds": round(train_seconds, 1),
        }
        atomic_write_json(path, row)
        rows.append(row)
        print(json.dumps(row), flush=True)
    record = {
        "command": " ".join(["OMP_NUM_THREADS=1 python bench/bench_poisoning.py", *sys.argv[1:]]),
        "steps": args.steps,
        "poison": f"{NUM_POISON} releases from client {POISONER} (58 spikes under the element "
        f"bound on its level's noise) beside 5 x 250 honest; refused by the release check: "
        f"{len(refused)}/{NUM_POISON}",
        "rows": rows,
    }
    if args.out is not None:
        atomic_write_json(args.out, record)
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
