"""Train the shipped 32x32 AutoencoderKL (resumable); writes a diffusers folder and model card.

python scripts/train_autoencoder.py --config configs/autoencoder.toml [--max-steps N]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import tomllib
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from tqdm.auto import tqdm

from latentfuse.checkpointing import atomic_write_dir, load_state, save_state
from latentfuse.data.datasets import load_cifar10, load_image
from latentfuse.training.autoencoder import (
    AutoencoderLoss,
    augment,
    autoencoder_loss,
    cosine_learning_rate,
    reconstruction_metrics,
)

logger = logging.getLogger("train_autoencoder")


def load_split(split: str, limit: int | None = None, seed: int = 0) -> torch.Tensor:
    """All images of a CIFAR-10 split (or a seeded subset of `limit`) as (n, 3, 32, 32)."""
    dataset = load_cifar10(split)
    indices = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    indices = indices[:limit] if limit else torch.arange(len(dataset))
    return torch.stack([load_image(dataset.records[i].path) for i in indices.tolist()])


def build_vae(cfg: dict) -> AutoencoderKL:
    """The autoencoder architecture named by the config (no attention: 32x32 needs none)."""
    depth = len(cfg["block_out_channels"])
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * depth,
        up_block_types=("UpDecoderBlock2D",) * depth,
        block_out_channels=tuple(cfg["block_out_channels"]),
        layers_per_block=cfg["layers_per_block"],
        latent_channels=cfg["latent_channels"],
        norm_num_groups=32,
        sample_size=32,
        mid_block_add_attention=False,
    )


def learning_rate(cfg: dict, step: int) -> float:
    """Linear warm-up, then cosine decay to `min_learning_rate`."""
    return cosine_learning_rate(
        step, cfg["max_steps"], cfg["learning_rate"], cfg["min_learning_rate"], cfg["warmup_steps"]
    )


def write_release(vae: AutoencoderKL, cfg: dict, metrics: dict, wall: float, step: int) -> None:
    """Save the fp16 diffusers folder with scaling_factor = 1/std and a model card."""
    vae.register_to_config(scaling_factor=1.0 / metrics["latent_std"])
    card = (
        (Path(__file__).parent / "vae_model_card.md")
        .read_text()
        .format(
            steps=step,
            wall_min=wall / 60,
            batch=cfg["batch_size"],
            psnr=metrics["psnr"],
            scaling=1.0 / metrics["latent_std"],
            n_eval=cfg["num_eval_images"],
            channels=cfg["block_out_channels"],
            latent_channels=cfg["latent_channels"],
            metrics=json.dumps(metrics, indent=2),
        )
    )

    def write(tmp: Path) -> None:
        vae.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
        vae.to(torch.float32)
        (tmp / "README.md").write_text(card)
        (tmp / "training_config.json").write_text(json.dumps(cfg, indent=2))

    atomic_write_dir(cfg["output_dir"], write)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/autoencoder.toml")
    parser.add_argument("--max-steps", type=int)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = tomllib.loads(Path(args.config).read_text())
    if args.max_steps:
        cfg["max_steps"] = args.max_steps
    torch.manual_seed(cfg["seed"])
    train = load_split(cfg["split"])
    held_out = load_split(cfg["eval_split"], cfg["num_eval_images"], seed=cfg["seed"])
    vae = build_vae(cfg)
    weights = AutoencoderLoss(cfg["l1_weight"], cfg["mse_weight"], cfg["kl_weight"])
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg["learning_rate"], weight_decay=0.0)
    work = Path(cfg["work_dir"])
    step, wall = 0, 0.0
    if (work / "state" / "state.json").exists():
        extra, _ = load_state(work / "state", {"vae": vae}, {"opt": optimizer})
        step, wall = extra["step"], extra["wall"]
        logger.info("resumed at step %d", step)
    generator = torch.Generator().manual_seed(cfg["seed"] + step)
    progress = tqdm(total=cfg["max_steps"], initial=step, desc="vae")
    start = time.time() - wall
    while step < cfg["max_steps"]:
        batch = train[torch.randint(len(train), (cfg["batch_size"],), generator=generator)]
        batch = augment(batch, generator)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(cfg, step)
        loss = autoencoder_loss(vae, batch, generator, weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        progress.update(1)
        progress.set_postfix(loss=f"{loss.item():.4f}")
        if step % cfg["eval_every"] == 0 or step == cfg["max_steps"]:
            metrics = reconstruction_metrics(vae, held_out[:250])
            logger.info(
                "step %d loss %.4f held-out psnr %.2f dB", step, loss.item(), metrics["psnr"]
            )
        if step % cfg["checkpoint_every"] == 0 or step == cfg["max_steps"]:
            save_state(
                work / "state",
                {"vae": vae},
                {"opt": optimizer},
                {"step": step, "wall": time.time() - start},
            )
    wall = time.time() - start
    metrics = reconstruction_metrics(vae, held_out)
    logger.info("final: %s", metrics)
    write_release(vae, cfg, metrics, wall, step)


if __name__ == "__main__":
    main()
