"""Server training throughput: latentfuse's Trainer against a plain diffusers-style loop.

Same UNet (the server of the chosen config), batch, AdamW and EMA, measured in one process
in alternating rounds; prints steps/s of both and the ratio (target >= 0.95).

    python bench/bench_train.py --config configs/cifar10.toml --steps 20 --rounds 3
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel

from latentfuse.config import load_config
from latentfuse.data.datasets import ImageDataset
from latentfuse.method.client import Client
from latentfuse.method.release_key import new_release_key
from latentfuse.method.schedule import make_scheduler
from latentfuse.method.server import Server
from latentfuse.method.split import DiffusionSplit
from latentfuse.models import build_unet, count_parameters
from latentfuse.training.engine import make_accelerator
from latentfuse.training.setup import Run
from latentfuse.training.trainer import Trainer


def plain_loop(
    unet,
    latents,
    labels,
    scheduler: DDPMScheduler,
    batch: int,
    lr: float,
    steps: int,
    ema_decay: float,
    t_min: int,
):
    """A step function in the style of diffusers' train_unconditional.py (with EMA)."""
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    ema = EMAModel(unet.parameters(), decay=ema_decay)
    generator = torch.Generator().manual_seed(0)

    def step() -> None:
        index = torch.randint(len(latents), (batch,), generator=generator)
        z0, y = latents[index], labels[index]
        noise = torch.randn(z0.shape, generator=generator)
        t = torch.randint(
            t_min, scheduler.config.num_train_timesteps, (batch,), generator=generator
        )
        noisy = scheduler.add_noise(z0, noise, t)
        loss = torch.nn.functional.mse_loss(unet(noisy, t, class_labels=y).sample, noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(unet.parameters())

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/cifar10.toml")
    parser.add_argument("--steps", type=int, default=20, help="steps per round and side")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--num-latents", type=int, default=2048)
    args = parser.parse_args()
    config = load_config(args.config, ["train.label_dropout=0.0"])
    cfg = config.train
    torch.manual_seed(0)
    latents = torch.randn(args.num_latents, 4, 16, 16)
    labels = torch.randint(0, 10, (args.num_latents,))
    scheduler = make_scheduler(config)
    split = DiffusionSplit.from_scheduler(scheduler, config.split.t_cut)
    client = Client(
        0, latents, labels, split, config.split.release_policy, release_key=new_release_key()
    )
    server = Server({0: split}, config.split.objective, config.split.weighting, "class")
    unet = build_unet(config.server_unet, 16, 4, 11)
    baseline_unet = copy.deepcopy(unet)
    dataset = ImageDataset((), tuple(str(i) for i in range(10)))
    run = Run(config, dataset, [], None, "", scheduler, [client], server, unet, {})
    trainer = Trainer(
        run,
        make_accelerator(config.train),
        Path("/tmp/latentfuse-bench"),
    )
    baseline = plain_loop(
        baseline_unet,
        latents,
        labels,
        scheduler,
        cfg.server_batch_size,
        cfg.learning_rate,
        args.steps,
        cfg.ema_decay,
        config.split.t_cut,
    )
    trainer.train_step(), baseline()  # warm-up
    timings = {"latentfuse": 0.0, "plain": 0.0}
    for _ in range(args.rounds):
        for name, step in (("latentfuse", trainer.train_step), ("plain", baseline)):
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            timings[name] += time.perf_counter() - start
    total = args.steps * args.rounds
    ours, plain = total / timings["latentfuse"], total / timings["plain"]
    print(
        f"server UNet {count_parameters(unet) / 1e6:.2f}M params, batch "
        f"{cfg.server_batch_size}, {total} steps per side, torch threads "
        f"{torch.get_num_threads()}"
    )
    print(f"plain diffusers-style loop  {plain:.3f} steps/s")
    print(f"latentfuse server trainer   {ours:.3f} steps/s")
    print(f"ratio latentfuse / plain    {ours / plain:.3f}  (target >= 0.95)")


if __name__ == "__main__":
    main()
