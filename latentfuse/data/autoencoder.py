"""The frozen pretrained autoencoder: load, encode to normalised latents, decode, fingerprint.

Latent normalisation follows diffusers' pipelines exactly, read from the autoencoder's config:
- `latents_mean` and `latents_std` set (SDXL-type configs): z = (raw - mean) * scaling_factor / std
- else `shift_factor` set (SD3, FLUX.1): z = (raw - shift_factor) * scaling_factor
- else: z = raw * scaling_factor (Stable Diffusion 1.x/2.x; AutoencoderTiny and AutoencoderDC
  with their own factors).
Decoding inverts it. Every path (encoding, the latent cache, sampling, evaluation) goes through
`encode`/`decode` here, so a new convention is one change.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderDC, AutoencoderKL, AutoencoderTiny

from latentfuse.paths import DEFAULT_VAE_DIR

logger = logging.getLogger(__name__)

Autoencoder = AutoencoderKL | AutoencoderTiny | AutoencoderDC
AUTOENCODERS = {cls.__name__: cls for cls in (AutoencoderKL, AutoencoderTiny, AutoencoderDC)}


def load_vae(
    path_or_id: str | os.PathLike | None = None,
    subfolder: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Autoencoder:
    """Load a frozen diffusers autoencoder (KL, Tiny or DC) from a local folder or a hub id."""
    source = str(path_or_id) if path_or_id is not None else str(DEFAULT_VAE_DIR)
    config_dir = Path(source) / (subfolder or "")
    kwargs = {"subfolder": subfolder} if subfolder else {}
    looks_local = Path(source).is_absolute() or source.startswith(".") or source.count("/") > 1
    if looks_local and not Path(source).exists():
        raise FileNotFoundError(f"autoencoder folder not found: {source}")
    if config_dir.exists() and not (config_dir / "config.json").is_file():
        raise FileNotFoundError(f"autoencoder folder {config_dir} has no config.json")
    class_name = _class_name(config_dir) if config_dir.exists() else "AutoencoderKL"
    if class_name not in AUTOENCODERS:
        raise ValueError(
            f"autoencoder {config_dir}: {class_name} is not supported (expected one of "
            f"{sorted(AUTOENCODERS)})"
        )
    cls = AUTOENCODERS[class_name]
    vae = cls.from_pretrained(source, torch_dtype=dtype, **kwargs).to(device)
    vae.requires_grad_(False).eval()
    return vae


def _class_name(folder: Path) -> str:
    import json

    return json.loads((folder / "config.json").read_text()).get("_class_name", "AutoencoderKL")


def latent_geometry(vae_config: Mapping[str, Any]) -> tuple[int, int]:
    """(latent channels, downsampling factor) from an autoencoder's config alone (the server
    reads nothing else): each encoder block after the first halves the resolution."""
    blocks = vae_config.get("encoder_block_out_channels") or vae_config.get("block_out_channels")
    if not blocks or "latent_channels" not in vae_config:
        raise ValueError(
            "autoencoder config: expected latent_channels and (encoder_)block_out_channels, "
            f"got keys {sorted(vae_config)}"
        )
    return int(vae_config["latent_channels"]), 2 ** (len(blocks) - 1)


def _normalisation(vae: Autoencoder, like: torch.Tensor) -> tuple[Any, Any, Any]:
    """(offset, scale, spread) such that z = (raw - offset) * scale / spread."""
    config = vae.config
    scale = float(getattr(config, "scaling_factor", None) or 1.0)
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is not None and std is not None:
        shape = (1, -1) + (1,) * (like.dim() - 2)
        as_tensor = lambda v: torch.tensor(v, dtype=like.dtype, device=like.device).view(shape)  # noqa: E731
        return as_tensor(mean), scale, as_tensor(std)
    return float(getattr(config, "shift_factor", None) or 0.0), scale, 1.0


def normalise(vae: Autoencoder, raw: torch.Tensor) -> torch.Tensor:
    """The autoencoder's raw latents -> the diffusion model's latents (diffusers' convention)."""
    offset, scale, spread = _normalisation(vae, raw)
    return (raw - offset) * scale / spread


def denormalise(vae: Autoencoder, latents: torch.Tensor) -> torch.Tensor:
    """The inverse of `normalise`: what the decoder takes."""
    offset, scale, spread = _normalisation(vae, latents)
    return latents * spread / scale + offset


@torch.no_grad()
def encode(
    vae: Autoencoder,
    images: torch.Tensor,
    sample: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Images in [-1, 1], shape (b, 3, h, w) -> normalised latents (b, c, h/f, w/f)."""
    images = images.to(device=vae.device, dtype=vae.dtype)
    if isinstance(vae, AutoencoderTiny):
        raw = vae.encode(images).latents
    elif isinstance(vae, AutoencoderDC):
        raw = vae.encode(images).latent
    else:
        dist = vae.encode(images).latent_dist
        raw = dist.sample(generator) if sample else dist.mode()
    return normalise(vae, raw)


@torch.no_grad()
def decode(vae: Autoencoder, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents -> images in [-1, 1], shape (b, 3, h, w)."""
    raw = denormalise(vae, latents.to(device=vae.device, dtype=vae.dtype))
    return vae.decode(raw).sample.clamp(-1, 1)


def vae_fingerprint(vae: Autoencoder) -> str:
    """A sha256 over the autoencoder's config and weights: changes whenever either does, and
    not with the folder it was loaded from (diffusers records that as `_name_or_path`)."""
    config = {k: v for k, v in dict(vae.config).items() if k != "_name_or_path"}
    digest = hashlib.sha256(repr(sorted(config.items())).encode())
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
