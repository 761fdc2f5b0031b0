"""Training an AutoencoderKL: the loss, one step, the schedule, and fitting a pretrained one to
new images (what `latentfuse train` does when the shipped autoencoder does not fit the data).

The loss is the one the shipped autoencoder was trained with (`scripts/train_autoencoder.py`):
L1 + MSE of the reconstruction from a posterior sample + a small KL weight. Fitting starts from
the given weights, so a few hundred steps move the colours and edges of a new domain where
training from scratch takes thousands.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL
from tqdm.auto import tqdm

from latentfuse.data.autoencoder import psnr
from latentfuse.training.engine import lr_at


@dataclass(frozen=True)
class AutoencoderLoss:
    """Weights of the reconstruction loss."""

    l1: float = 1.0
    mse: float = 1.0
    kl: float = 1e-6


def autoencoder_loss(
    vae: AutoencoderKL,
    images: torch.Tensor,
    generator: torch.Generator | None = None,
    weights: AutoencoderLoss = AutoencoderLoss(),
) -> torch.Tensor:
    """The training loss on a batch of images in [-1, 1]."""
    posterior = vae.encode(images).latent_dist
    recon = vae.decode(posterior.sample(generator)).sample
    return (
        weights.l1 * (recon - images).abs().mean()
        + weights.mse * (recon - images).pow(2).mean()
        + weights.kl * posterior.kl().mean()
    )


def augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flips (the only augmentation: colours and shapes stay as they are)."""
    flip = torch.rand(len(batch), generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], batch.flip(-1), batch)


@torch.no_grad()
def reconstruction_metrics(vae: AutoencoderKL, images: torch.Tensor, batch: int = 250) -> dict:
    """PSNR (dB) of 8-bit reconstructions from the posterior mode, and the raw latents' std."""
    was_training = vae.training
    vae.eval()
    scores, latents = [], []
    for chunk in images.split(batch):
        z = vae.encode(chunk).latent_dist.mode()
        recon = vae.decode(z).sample.clamp(-1, 1)
        recon = ((recon + 1) * 127.5).round() / 127.5 - 1  # as saved to an 8-bit image
        scores.append(psnr(chunk, recon))
        latents.append(z)
    vae.train(was_training)
    z = torch.cat(latents)
    return {
        "psnr": torch.cat(scores).mean().item(),
        "latent_std": z.std().item(),
        "latent_mean": z.mean().item(),
    }


def seconds_per_step(vae: AutoencoderKL, batch_size: int, resolution: int) -> float:
    """Seconds one fitting step (forward, backward) takes here, timed twice after a warm-up."""
    x = torch.zeros(batch_size, 3, resolution, resolution)
    vae.train().requires_grad_(True)
    total = 0.0
    for repeat in range(3):
        start = time.perf_counter()
        autoencoder_loss(vae, x).backward()
        if repeat:
            total += (time.perf_counter() - start) / 2
    vae.zero_grad(set_to_none=True)
    return total * 1.1  # the optimiser step


def fit_autoencoder(
    vae: AutoencoderKL,
    images: torch.Tensor,
    steps: int,
    batch_size: int = 32,
    learning_rate: float = 3e-4,
    seed: int = 0,
    progress: bool = True,
) -> AutoencoderKL:
    """Fine-tune `vae` on `images` (n, 3, h, w) in [-1, 1] for `steps` AdamW steps (warm-up,
    then cosine decay to 1/10 of the peak); returns it frozen, in eval mode. Deterministic for
    a seed on one thread."""
    if not isinstance(vae, AutoencoderKL):
        raise TypeError(f"fit_autoencoder: expected an AutoencoderKL, got {type(vae).__name__}")
    if images.dim() != 4 or images.shape[1] != 3 or len(images) == 0:
        raise ValueError(f"images: expected (n, 3, h, w) with n >= 1, got {tuple(images.shape)}")
    generator = torch.Generator().manual_seed(seed)
    vae.train().requires_grad_(True)
    optimiser = torch.optim.AdamW(vae.parameters(), lr=learning_rate, weight_decay=0.0)
    warmup = min(50, max(1, steps // 10))
    bar = tqdm(range(steps), desc="autoencoder", disable=not progress)
    for step in bar:
        for group in optimiser.param_groups:
            group["lr"] = lr_at(step, learning_rate, warmup, "cosine", steps, learning_rate / 10)
        pick = torch.randint(len(images), (min(batch_size, len(images)),), generator=generator)
        loss = autoencoder_loss(vae, augment(images[pick], generator), generator)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.requires_grad_(False).eval()
    return vae
