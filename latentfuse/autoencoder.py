"""The frozen pretrained autoencoder: load, encode to scaled latents, decode, fingerprint."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL, AutoencoderTiny

from .paths import DEFAULT_VAE_DIR

logger = logging.getLogger(__name__)

Autoencoder = AutoencoderKL | AutoencoderTiny


def load_vae(
    path_or_id: str | os.PathLike | None = None,
    subfolder: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Autoencoder:
    """Load a frozen diffusers autoencoder (KL or Tiny) from a local folder or a hub id."""
    source = str(path_or_id) if path_or_id is not None else str(DEFAULT_VAE_DIR)
    config_dir = Path(source) / (subfolder or "")
    kwargs = {"subfolder": subfolder} if subfolder else {}
    looks_local = Path(source).is_absolute() or source.startswith(".") or source.count("/") > 1
    if looks_local and not Path(source).exists():
        raise FileNotFoundError(f"autoencoder folder not found: {source}")
    if config_dir.exists() and not (config_dir / "config.json").is_file():
        raise FileNotFoundError(f"autoencoder folder {config_dir} has no config.json")
    class_name = _class_name(config_dir) if config_dir.exists() else "AutoencoderKL"
    cls = AutoencoderTiny if class_name == "AutoencoderTiny" else AutoencoderKL
    vae = cls.from_pretrained(source, torch_dtype=dtype, **kwargs).to(device)
    vae.requires_grad_(False).eval()
    return vae


def _class_name(folder: Path) -> str:
    import json

    return json.loads((folder / "config.json").read_text()).get("_class_name", "AutoencoderKL")


def scaling_factor(vae: Autoencoder) -> float:
    """The factor that brings the autoencoder's latents to unit standard deviation."""
    return float(getattr(vae.config, "scaling_factor", 1.0) or 1.0)


@torch.no_grad()
def encode(
    vae: Autoencoder,
    images: torch.Tensor,
    sample: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Images in [-1, 1], shape (b, 3, h, w) -> scaled latents (b, c, h/f, w/f)."""
    images = images.to(device=vae.device, dtype=vae.dtype)
    if isinstance(vae, AutoencoderTiny):
        latents = vae.encode(images).latents
    else:
        dist = vae.encode(images).latent_dist
        latents = dist.sample(generator) if sample else dist.mode()
    return latents * scaling_factor(vae)


@torch.no_grad()
def decode(vae: Autoencoder, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> images in [-1, 1], shape (b, 3, h, w)."""
    latents = latents.to(device=vae.device, dtype=vae.dtype) / scaling_factor(vae)
    return vae.decode(latents).sample.clamp(-1, 1)


def vae_fingerprint(vae: Autoencoder) -> str:
    """A sha256 over the autoencoder's config and weights: changes whenever either does."""
    digest = hashlib.sha256(repr(sorted(dict(vae.config).items())).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def psnr(reference: torch.Tensor, estimate: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for images in [-1, 1], shape (b,)."""
    ref = (reference.float().clamp(-1, 1) + 1) / 2
    est = (estimate.float().clamp(-1, 1) + 1) / 2
    mse = (ref - est).pow(2).flatten(1).mean(1).clamp_min(1e-12)
    return -10 * torch.log10(mse)
