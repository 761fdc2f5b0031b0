"""The attacker suite: what an honest-but-curious server learns of a client's images from its
releases z_r and from the model it trains on them (method.md §2, threat model).

Each attacker is stated by what it knows. The server always holds every release (image ids
and epochs included), the run config (so the cut, the schedule and any clip norm) and its
own model; "with candidates" it also holds candidate images and the public autoencoder, so
it can compute E(x) for any x. No attacker holds a client's release key (release_key.py): a
release is then z_r = sqrt(abar_r) z0 + sqrt(1 - abar_r) eps with eps unknown. Every figure
comes with its uncertainty and the chance or trivial baseline it must beat.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from latentfuse.data.autoencoder import Autoencoder
from latentfuse.data.autoencoder import psnr as psnr_db
from latentfuse.evaluation.disclosure import decode_latents, ssim
from latentfuse.evaluation.statistics import binomial_summary, bootstrap_mean, roc_summary
from latentfuse.method.privacy import clip_latent_norm


def expected_release(latents: torch.Tensor, abar_r: float, clip_norm: float = 0.0) -> torch.Tensor:
    """The mean sqrt(abar_r) clip(z0) of a release of latents z0 (the clip norm is public)."""
    z0 = clip_latent_norm(latents, clip_norm) if clip_norm else latents
    return math.sqrt(abar_r) * z0.double()


def release_distances(
    releases: torch.Tensor, candidates: torch.Tensor, abar_r: float, clip_norm: float = 0.0
) -> torch.Tensor:
    """||z_r_i - sqrt(abar_r) E(x_j)||^2, (n_releases, n_candidates): minus twice the Gaussian
    log-likelihood of candidate j having made release i, up to a constant (the likelihood
    ratio test's statistic)."""
    mean = expected_release(candidates, abar_r, clip_norm).flatten(1)
    return torch.cdist(releases.double().flatten(1), mean).pow(2)


def likelihood_reidentification(
    releases: torch.Tensor,
    sources: torch.Tensor,
    gallery: torch.Tensor,
    abar_r: float,
    gallery_size: int | None = None,
    clip_norm: float = 0.0,
    seed: int = 0,
) -> dict:
    """Closed-set re-identification. Knows: the releases and a gallery of candidate images
    that holds each release's source (`sources` (n,) index into `gallery` latents (m, ...)).

    Each release is matched to the candidate of highest likelihood. With `gallery_size` k,
    each release competes against its source and k - 1 other gallery images drawn at random;
    otherwise against the whole gallery. Chance is 1/k."""
    distances = release_distances(releases, gallery, abar_r, clip_norm)  # (n, m)
    m, n = distances.shape[1], len(releases)
    k = m if gallery_size is None else min(gallery_size, m)
    if k < m:
        rng = np.random.default_rng(seed)
        others = [rng.choice(np.delete(np.arange(m), s), k - 1, replace=False) for s in sources]
        columns = torch.as_tensor(
            np.stack([np.r_[s, o] for s, o in zip(sources, others, strict=True)])
        )
        hits = distances.gather(1, columns).argmin(1) == 0
    else:
        hits = distances.argmin(1) == sources
    return {**binomial_summary(int(hits.sum()), n, 1.0 / k), "gallery_size": k}


def _posterior_logits(log_likelihoods: torch.Tensor) -> torch.Tensor:
    """log p_ij / (1 - p_ij) for the posterior p_ij = softmax_j L_ij of each row: candidate j
    against every other candidate as the source of release i. Stable where p_ij is near 1
    (the row's best candidate, computed without the softmax) and where it is tiny."""
    log_post = log_likelihoods - log_likelihoods.logsumexp(1, keepdim=True)
    top = log_likelihoods.argmax(1, keepdim=True)
    others = log_likelihoods.scatter(1, top, -math.inf).logsumexp(1, keepdim=True)
    # Every candidate but the top has p <= 1/2, so log(1 - p) = log1p(-exp(log p)) is exact.
    logits = log_post - torch.log1p(-log_post.clamp_max(math.log(0.5)).exp())
    return logits.scatter(1, top, log_likelihoods.gather(1, top) - others)


def release_membership(
    releases: torch.Tensor,
    members: torch.Tensor,
    non_members: torch.Tensor,
    abar_r: float,
    clip_norm: float = 0.0,
    seed: int = 0,
) -> dict:
    """Membership inference on releases. Knows: every release of the client and a set of
    candidate images (here members and held-out non-members); asks of each candidate whether
    it is among the client's training images.

    Two scores, each maximised over the releases; the report keeps the stronger (by AUC) and
    the other's AUC, as a server would run both:
    - `posterior`: the log-likelihood ratio of "candidate j made release i" against "one of
      the other candidates did" (the logit of j's posterior over the pool). It removes each
      release's own noise energy, common to every candidate, and is the stronger at high cuts.
    - `distance`: minus the distance to the nearest release, ||z_r - sqrt(abar_r) E(x)||^2.
      It needs no pool and is the stronger at low cuts, where a release whose source is not
      among the candidates makes some non-member the pool's best guess.
    A member stands out at its own release; a non-member only by chance."""
    candidates = torch.cat([members, non_members])
    distances = release_distances(releases, candidates, abar_r, clip_norm)  # (releases, cands)
    n = len(members)
    scores = {
        # At t_cut = 0 (abar_r = 1) a release is its latent: a tiny variance keeps it finite.
        "posterior": _posterior_logits(-distances / (2 * max(1 - abar_r, 1e-12))).max(0).values,
        "distance": -distances.min(0).values,
    }
    results = {k: roc_summary(v[:n], v[n:], seed=seed) for k, v in scores.items()}
    best = max(results, key=lambda k: results[k]["auc"]["value"])
    auc = {k: v["auc"]["value"] for k, v in results.items()}
    return {**results[best], "score": best, "auc_by_score": auc}


@torch.no_grad()
def denoising_losses(
    unet: torch.nn.Module,
    alphas_cumprod: torch.Tensor,
    latents: torch.Tensor,
    t_cut: int,
    class_labels: torch.Tensor | None = None,
    num_draws: int = 4,
    batch_size: int = 128,
    seed: int = 0,
) -> torch.Tensor:
    """Each latent's eps-prediction error at server timesteps s >= t_cut, (n,), averaged over
    `num_draws` draws of (s, eps): the same draws for every latent (a paired comparison)."""
    T, (c, h, w) = len(alphas_cumprod), latents.shape[1:]
    g = torch.Generator().manual_seed(seed)
    steps = torch.randint(t_cut, T, (num_draws,), generator=g)
    noise = torch.randn(num_draws, c, h, w, generator=g)
    device = next(unet.parameters()).device
    losses = torch.zeros(len(latents), dtype=torch.float64)
    for s, eps in zip(steps.tolist(), noise, strict=True):
        a = float(alphas_cumprod[s])
        for i in range(0, len(latents), batch_size):
            z0 = latents[i : i + batch_size].to(device)
            z_s = (math.sqrt(a) * z0 + math.sqrt(1 - a) * eps.to(device)).float()
            labels = None if class_labels is None else class_labels[i : i + batch_size].to(device)
            timestep = torch.full((len(z0),), s, device=device)
            prediction = unet(z_s, timestep, class_labels=labels).sample
            error = (prediction.double() - eps.to(device).double()).pow(2).flatten(1).mean(1)
            losses[i : i + batch_size] += error.cpu() / num_draws
    return losses


def model_membership(
    unet: torch.nn.Module,
    alphas_cumprod: torch.Tensor,
    members: torch.Tensor,
    non_members: torch.Tensor,
    t_cut: int,
    member_labels: torch.Tensor | None = None,
    non_member_labels: torch.Tensor | None = None,
    num_draws: int = 4,
    seed: int = 0,
) -> dict:
    """Loss-based membership inference against the server's model (Yeom et al. 2018). Knows:
    its own denoiser and a candidate image (with its label where the server is conditioned
    on labels); a lower denoising error at s >= t_cut means "member". Uncalibrated: no
    shadow models."""
    kwargs = {"num_draws": num_draws, "seed": seed}
    member = denoising_losses(unet, alphas_cumprod, members, t_cut, member_labels, **kwargs)
    other = denoising_losses(unet, alphas_cumprod, non_members, t_cut, non_member_labels, **kwargs)
    return {**roc_summary(-member, -other, seed=seed), "num_draws": num_draws}


@torch.no_grad()
def posterior_mean(
    unet: torch.nn.Module,
    alphas_cumprod: torch.Tensor,
    releases: torch.Tensor,
    t_cut: int,
    class_labels: torch.Tensor | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """The server's estimate of z0 from z_r with its own denoiser (trained for s >= t_cut):
    noise z_r to s = t_cut with the exact kernel (method.md §2: a = abar_s / abar_r), then Tweedie,
    z0_hat = (z_s - sqrt(1 - abar_s) eps_theta(z_s, s)) / sqrt(abar_s). At t_cut = 0 the
    release is the clean latent."""
    if t_cut == 0:
        return releases.float()
    abar_r, abar_s = float(alphas_cumprod[t_cut - 1]), float(alphas_cumprod[t_cut])
    a = abar_s / abar_r
    device = next(unet.parameters()).device
    g = torch.Generator().manual_seed(seed)
    eps_s = torch.randn(releases.shape, generator=g).to(device)
    z_s = (math.sqrt(a) * releases.to(device).double() + math.sqrt(1 - a) * eps_s).float()
    labels = None if class_labels is None else class_labels.to(device)
    timestep = torch.full((len(z_s),), t_cut, device=device)
    eps = unet(z_s, timestep, class_labels=labels).sample.double()
    return ((z_s.double() - math.sqrt(1 - abar_s) * eps) / math.sqrt(abar_s)).float().cpu()


def image_scores(images: torch.Tensor, originals: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-image PSNR (dB) and SSIM of images against originals, both in [-1, 1]."""
    images, originals = images.float().clamp(-1, 1), originals.float().clamp(-1, 1)
    return psnr_db(originals, images), ssim((images + 1) / 2, (originals + 1) / 2)


def reconstruction(
    unet: torch.nn.Module,
    alphas_cumprod: torch.Tensor,
    vae: Autoencoder,
    releases: torch.Tensor,
    originals: torch.Tensor,
    client_mean_image: torch.Tensor,
    t_cut: int,
    class_labels: torch.Tensor | None = None,
    batch_size: int = 64,
    seed: int = 0,
) -> dict:
    """Reconstruction from releases. Knows: the releases, its own denoiser, the public
    decoder. Its best estimate (the posterior mean, decoded) is scored by PSNR/SSIM against
    the originals, beside the trivial attacker that outputs the client's mean image."""
    chunks = []
    for i in range(0, len(releases), batch_size):
        labels = None if class_labels is None else class_labels[i : i + batch_size]
        chunks.append(
            posterior_mean(unet, alphas_cumprod, releases[i : i + batch_size], t_cut, labels, seed)
        )
    images = decode_latents(vae, torch.cat(chunks), batch_size)
    psnr, structural = image_scores(images, originals)
    mean = client_mean_image.expand_as(originals)
    base_psnr, base_ssim = image_scores(mean, originals)
    return {
        "psnr": bootstrap_mean(psnr, seed),
        "ssim": bootstrap_mean(structural, seed),
        "mean_image_psnr": bootstrap_mean(base_psnr, seed),
        "mean_image_ssim": bootstrap_mean(base_ssim, seed),
        "psnr_gain_over_mean_image": bootstrap_mean(psnr - base_psnr, seed),
        "num_images": len(originals),
        "images": images,
    }
