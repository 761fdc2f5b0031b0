"""What a release z_r discloses: how image-like it decodes, how well an attacker's denoiser
reconstructs the source image from it, and whether the reconstruction re-identifies it."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from latentfuse.data.autoencoder import Autoencoder, decode
from latentfuse.data.autoencoder import psnr as psnr_db
from latentfuse.evaluation.features import FeatureExtractor, extract_features, to_uint8
from latentfuse.evaluation.metrics import FeatureStats, distribution_scores

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def decode_latents(vae: Autoencoder, latents: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Scaled latents (n, c, h, w) -> images in [-1, 1], (n, 3, H, W), in batches."""
    chunks = [
        decode(vae, latents[i : i + batch_size]).float().cpu()
        for i in range(0, len(latents), batch_size)
    ]
    return torch.cat(chunks)


def release_fid(
    vae: Autoencoder,
    releases: torch.Tensor,
    real: FeatureStats | torch.Tensor,
    inception: FeatureExtractor,
    clip: FeatureExtractor | None = None,
    real_clip: FeatureStats | torch.Tensor | None = None,
    batch_size: int = 64,
) -> dict:
    """FID and KID (and FCD when a CLIP extractor is given) of decoded releases z_r against the
    client's real images (uint8 images or their precomputed features)."""
    images = to_uint8(decode_latents(vae, releases, batch_size))
    scores = _scores(inception, images, real, batch_size, "releases")
    result = {
        "fid": scores["fd"],
        "fid_status": scores["fd_status"],
        "kid": scores["kid"],
        "kid_std": scores["kid_std"],
        "num_releases": scores["num_generated"],
        "num_real": scores["num_real"],
        "fcd": None,
        "fcd_status": "unavailable: no CLIP extractor given",
    }
    if clip is not None:
        if real_clip is None:
            raise ValueError("a CLIP extractor needs real_clip (real images or CLIP features)")
        clip_scores = _scores(clip, images, real_clip, batch_size, "releases clip", kid=False)
        result["fcd"], result["fcd_status"] = clip_scores["fd"], clip_scores["fd_status"]
    return result


def _scores(
    extractor: FeatureExtractor,
    images: torch.Tensor,
    real: FeatureStats | torch.Tensor,
    batch_size: int,
    desc: str,
    kid: bool = True,
) -> dict:
    generated = FeatureStats.from_features(extract_features(extractor, images, batch_size, desc))
    if isinstance(real, torch.Tensor):
        real = FeatureStats.from_features(extract_features(extractor, real, batch_size, "real"))
    return distribution_scores(generated, real, kid=kid)


def attack_timesteps(t_cut: int, num_steps: int) -> list[int]:
    """DDIM timesteps from the release level r = t_cut - 1 down to 0, descending, unique."""
    if t_cut < 1:
        return []
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    levels = torch.linspace(t_cut - 1, 0, min(num_steps, t_cut), dtype=torch.float64)
    return sorted({int(round(float(t))) for t in levels}, reverse=True)


@torch.no_grad()
def ddim_reconstruct(
    unet: torch.nn.Module,
    alphas_cumprod: torch.Tensor,
    releases: torch.Tensor,
    t_cut: int,
    num_steps: int = 10,
    class_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) from z_r at level r = t_cut - 1 to a clean latent estimate.

    Each step (Song et al. 2021, eq. 12, sigma = 0): z0_hat = (z_t - sqrt(1-abar_t) eps) /
    sqrt(abar_t), then z_t' = sqrt(abar_t') z0_hat + sqrt(1-abar_t') eps; after t = 0, z0_hat.
    """
    latents = releases.float()
    labels = _attacker_labels(unet, class_labels, len(latents), latents.device)
    timesteps = attack_timesteps(t_cut, num_steps)
    abar = alphas_cumprod.to(torch.float64)
    dtype = getattr(unet, "dtype", latents.dtype)  # e.g. an fp16 attacker denoiser
    for i, t in enumerate(timesteps):
        eps = unet(latents.to(dtype), t, class_labels=labels).sample.double()
        a_t = abar[t]
        z0_hat = (latents.double() - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        a_next = abar[timesteps[i + 1]] if i + 1 < len(timesteps) else torch.tensor(1.0).double()
        latents = (a_next.sqrt() * z0_hat + (1 - a_next).sqrt() * eps).to(releases.dtype)
    return latents


def _attacker_labels(unet, class_labels, batch: int, device) -> torch.Tensor | None:
    """The given labels, else the null label (the last class index) of a conditional UNet."""
    if class_labels is not None:
        return class_labels.to(device)
    num_embeds = getattr(getattr(unet, "config", None), "num_class_embeds", None)
    return None if not num_embeds else torch.full((batch,), num_embeds - 1, device=device)


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(
    images: torch.Tensor,
    reference: torch.Tensor,
    data_range: float = 1.0,
    window_size: int = SSIM_WINDOW,
    sigma: float = SSIM_SIGMA,
) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004), shape (b,), of images (b, c, h, w) in [0, data_range].

    Gaussian window 11, sigma 1.5, K1 = 0.01, K2 = 0.03, valid (unpadded) filtering, the mean
    over channels and positions. SSIM's luminance term assumes non-negative intensities: map
    images in [-1, 1] to [0, 1] first.
    """
    if images.shape != reference.shape or images.ndim != 4:
        raise ValueError(
            f"images and reference must share a (b, c, h, w) shape, got "
            f"{tuple(images.shape)} and {tuple(reference.shape)}"
        )
    if min(images.shape[-2:]) < window_size:
        raise ValueError(f"images must be at least {window_size} pixels on each side")
    x, y = images.double(), reference.double()
    channels = x.shape[1]
    g = _gaussian_window(window_size, sigma).to(x.device)
    kernel = (g[:, None] * g[None, :]).expand(channels, 1, window_size, window_size)

    def blur(z: torch.Tensor) -> torch.Tensor:
        return F.conv2d(z, kernel, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    )
    return ssim_map.flatten(1).mean(1).float()


def reconstruction_attack(
    unet: torch.nn.Module,
    alphas_cumprod: torch.Tensor,
    vae: Autoencoder,
    releases: torch.Tensor,
    originals: torch.Tensor,
    t_cut: int,
    num_steps: int = 10,
    class_labels: torch.Tensor | None = None,
    batch_size: int = 64,
) -> dict:
    """Denoise each release with an attacker's denoiser, decode, and score it against its
    original image (in [-1, 1]): mean PSNR (dB) and SSIM, and the reconstructions."""
    if len(releases) != len(originals):
        raise ValueError(f"{len(releases)} releases but {len(originals)} originals")
    chunks = []
    for start in range(0, len(releases), batch_size):
        labels = None if class_labels is None else class_labels[start : start + batch_size]
        batch = releases[start : start + batch_size]
        chunks.append(ddim_reconstruct(unet, alphas_cumprod, batch, t_cut, num_steps, labels))
    latents = torch.cat(chunks)
    images = decode_latents(vae, latents, batch_size)
    psnr = psnr_db(originals, images)
    structural = ssim((images + 1) / 2, (originals.float().clamp(-1, 1) + 1) / 2)
    return {
        "psnr": float(psnr.mean()),
        "ssim": float(structural.mean()),
        "psnr_per_image": psnr,
        "ssim_per_image": structural,
        "num_steps": len(attack_timesteps(t_cut, num_steps)),
        "latents": latents,
        "images": images,
    }


def reidentification(
    extractor: FeatureExtractor,
    reconstructions: torch.Tensor,
    training_images: torch.Tensor,
    source_indices: torch.Tensor,
    batch_size: int = 64,
) -> dict:
    """Share of reconstructions whose nearest training image (feature space, L2) is their own
    source; images in [-1, 1], `source_indices` (n,) index into `training_images`.

    `training_images` may also be their features, (m, extractor.dim), from `extract_features`:
    a gallery that stays the same across attacks is then embedded once."""
    if len(reconstructions) != len(source_indices):
        raise ValueError(
            f"{len(reconstructions)} reconstructions but {len(source_indices)} source indices"
        )
    queries = extract_features(extractor, to_uint8(reconstructions), batch_size, "reid queries")
    if training_images.ndim == 2:
        if training_images.shape[1] != queries.shape[1]:
            raise ValueError(
                f"training_images as features must have {queries.shape[1]} columns (the "
                f"extractor's dim), got {tuple(training_images.shape)}"
            )
        gallery = training_images
    else:
        gallery = extract_features(extractor, to_uint8(training_images), batch_size, "reid gallery")
    nearest = torch.cdist(queries.double(), torch.as_tensor(gallery).double()).argmin(dim=1)
    hits = nearest == source_indices.to(nearest.device)
    return {
        "rate": float(hits.double().mean()) if len(hits) else math.nan,
        "chance": 1.0 / len(training_images),
        "num_queries": len(hits),
        "num_candidates": len(training_images),
        "nearest": nearest,
    }
