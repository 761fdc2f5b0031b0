"""The privacy sweep: the attacker suite (attacks.py) at each cut, with secret release noise,
plus the formal-privacy mode's points (latents clipped, cut chosen for a target epsilon).

Each point is a training run in `<out-dir>/<name>/` (its own client keys under `clients/`)
scored into `<name>/privacy.json`; a point whose file matches the settings is skipped and an
unfinished run continues from its checkpoint, so the sweep resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from experiments.grid import grid_folder, keyed, walk
from experiments.sweep import SweepPoint, _jsonable, latent_clip_norm, point_config, train_point
from latentfuse.config import RunConfig
from latentfuse.data.latents import cached_latents, dataset_fingerprint
from latentfuse.evaluation.attacks import (
    likelihood_reidentification,
    model_membership,
    reconstruction,
    release_membership,
)
from latentfuse.evaluation.evaluate import EvaluationSettings, evaluate_model
from latentfuse.evaluation.reference import load_real_images
from latentfuse.evaluation.statistics import binomial_summary
from latentfuse.method.privacy import release_guarantee
from latentfuse.paths import cache_dir
from latentfuse.pipelines.folder import load_unet
from latentfuse.training.setup import Run, build_run

logger = logging.getLogger(__name__)

FORMAT = 1
ATTACKS_VERSION = 3  # in each point's key: a changed attacker re-attacks every point
THREAT_MODEL = (
    "honest-but-curious server: it holds every release (with image ids and epochs), the run "
    "config (cut, schedule, clip norm), collafuse.json and its own trained model, never a "
    "client's release key; 'with candidates' it also holds candidate images and the public "
    "autoencoder"
)


@dataclass(frozen=True)
class PrivacySweepSettings:
    """Which points to run and how many images each attacker gets per client."""

    cuts: tuple[int, ...] = (0, 20, 50, 100, 200, 500, 700, 900)
    epsilons: tuple[float, ...] = (1.0, 8.0, 64.0)  # formal-mode points (clipped latents)
    epsilon_base_cut: int = 100  # the cut a formal-mode point starts from (then raised)
    delta: float = 1e-5
    clip_percentile: float = 99.0  # clip norm C of the formal-mode points
    num_queries: int = 500  # releases re-identified per client
    gallery_size: int = 32
    num_members: int = 1000  # members and non-members of the release membership attack
    num_model_members: int = 500  # ... of the attack on the server's model
    num_draws: int = 4  # (s, eps) draws per candidate of the model attack
    num_reconstructions: int = 200
    num_mean_images: int = 1000  # training images averaged into the trivial attacker's guess
    quality_samples: int = 0  # per client, FID/KID of the formal points and their baseline
    num_inference_steps: int = 25
    scheduler: str = "ddpm"
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if not self.cuts or len(set(self.cuts)) != len(self.cuts) or min(self.cuts) < 0:
            raise ValueError(f"cuts must be unique non-negative integers, got {self.cuts}")
        if any(e <= 0 for e in self.epsilons):
            raise ValueError(f"epsilons must be > 0, got {self.epsilons}")
        for name in ("num_queries", "gallery_size", "num_members", "num_model_members"):
            if getattr(self, name) < 2:
                raise ValueError(f"{name} must be >= 2, got {getattr(self, name)}")


def privacy_points(settings: PrivacySweepSettings, clip_norm: float) -> list[SweepPoint]:
    """The formal-mode points first, then the cuts (each at the base config)."""
    formal = [
        SweepPoint(
            settings.epsilon_base_cut,
            f"epsilon-{eps:g}",
            (
                f"privacy.clip_norm={clip_norm}",
                f"privacy.target_epsilon={eps}",
                f"privacy.delta={settings.delta}",
            ),
        )
        for eps in settings.epsilons
    ]
    return [SweepPoint(c) for c in sorted(settings.cuts)] + formal


def _labels_for(run: Run, cid: int, labels: torch.Tensor) -> torch.Tensor | None:
    """What the server's model conditions on for a candidate: its class, the client, or none."""
    mode = run.config.server_labels
    if mode == "class":
        return labels
    return torch.full_like(labels, cid) if mode == "client" else None


def _model_attacks(
    run: Run, index: int, server_unet, settings: PrivacySweepSettings, pick, inputs: tuple
) -> dict:
    """The attackers that use the server's trained denoiser: membership and reconstruction.
    `inputs`: the client's latents, labels, held-out latent set and first releases."""
    client, share = run.clients[index], run.shares[index]
    cid, t_cut = client.client_id, client.split.handoff_t
    alphas = run.scheduler.alphas_cumprod.double()
    z0, labels, held_out, first = inputs
    m = pick(len(z0), settings.num_model_members)
    o = pick(len(held_out.latents), settings.num_model_members)
    out = {}
    out["model_membership"] = model_membership(
        server_unet,
        alphas,
        z0[m],
        held_out.latents[o],
        t_cut,
        _labels_for(run, cid, labels[m]),
        _labels_for(run, cid, held_out.labels[o]),
        settings.num_draws,
        settings.seed,
    )
    sources = pick(len(z0), settings.num_reconstructions)
    resolution = run.config.data.resolution
    originals = load_real_images(run.dataset, [share.train_indices[i] for i in sources], resolution)
    sample = pick(len(z0), settings.num_mean_images)
    mean_image = load_real_images(run.dataset, [share.train_indices[i] for i in sample], resolution)
    mean_image = (mean_image.float() / 127.5 - 1).mean(0, keepdim=True)
    recon = reconstruction(
        server_unet,
        alphas,
        run.vae,
        first[sources],  # one release: the posterior mean assumes level r
        originals.float() / 127.5 - 1,
        mean_image,
        t_cut,
        _labels_for(run, cid, labels[sources]),
        seed=settings.seed,
    )
    recon.pop("images")
    out["reconstruction"] = recon
    return out


def _release_attacks(
    run: Run, index: int, settings: PrivacySweepSettings, num_releases: int, pick
) -> tuple[dict, tuple]:
    """The attackers that use only the releases (and candidates): re-identification and
    release membership. Returns their figures and what the model attackers reuse."""
    client, share = run.clients[index], run.shares[index]
    cid, abar_r, clip = client.client_id, client.split.abar_release, client.clip_norm
    z0, labels = client.z0, client.labels  # the truth, and what E(x) gives an attacker
    first = client.make_release(0).latents
    if client.release_policy == "fresh" and num_releases > 1:
        releases = torch.stack([client.make_release(e).latents for e in range(num_releases)])
        releases = releases.mean(0)
    else:
        releases = first
    held_out = cached_latents(
        run.vae,
        run.dataset,
        share.eval_indices,
        cache_dir() / "latents" / f"{dataset_fingerprint(run.dataset)[:12]}-eval-client{cid}",
        run.config.data.resolution,
        vae_hash=run.vae_hash,
    )
    queries = pick(len(z0), settings.num_queries)
    reid = {
        "gallery_32": likelihood_reidentification(
            releases[queries], queries, z0, abar_r, settings.gallery_size, clip, settings.seed
        ),
        "gallery_all": likelihood_reidentification(
            releases[queries], queries, z0, abar_r, None, clip
        ),
    }
    members, outsiders = (
        pick(len(z0), settings.num_members),
        pick(len(held_out.latents), settings.num_members),
    )
    release_mia = release_membership(
        releases, z0[members], held_out.latents[outsiders], abar_r, clip
    )
    result = {
        "t_cut": client.split.handoff_t,
        "reidentification": reid,
        "release_membership": release_mia,
        "releases_per_image": num_releases if client.release_policy == "fresh" else 1,
    }
    return result, (z0, labels, held_out, first)


def _picker(settings: PrivacySweepSettings, cid: int):
    """Draws of image indices, the same images at every cut for one client."""
    rng = np.random.default_rng(settings.seed * 1_000_003 + cid)
    return lambda n, size: torch.from_numpy(np.sort(rng.choice(n, min(size, n), replace=False)))


def client_attacks(
    run: Run, index: int, server_unet, settings: PrivacySweepSettings, num_releases: int = 1
) -> dict:
    """Every attacker against one client, each figure with its uncertainty and baseline.

    Under `fresh` the server holds `num_releases` releases of each image (linked by image id)
    and the likelihood attackers use their mean, whose noise is 1/sqrt(k) as strong."""
    client = run.clients[index]
    pick = _picker(settings, client.client_id)
    result, model_inputs = _release_attacks(run, index, settings, num_releases, pick)
    if server_unet is not None:
        result.update(_model_attacks(run, index, server_unet, settings, pick, model_inputs))
    privacy = run.config.privacy
    result["formal"] = release_guarantee(
        run.scheduler.alphas_cumprod.double(),
        client.split.release_cut,
        privacy.clip_norm,
        privacy.delta,
        run.config.split.release_policy,
        privacy.max_releases,
    )
    return result


def reattack_releases(
    config: RunConfig, out_dir: str | Path, settings: PrivacySweepSettings, summary: dict
) -> dict:
    """`summary` with the release attackers of every row re-run at ATTACKS_VERSION, without
    training: each point's clients are rebuilt in `out_dir/<name>/` with fresh release keys.
    A release's distribution does not depend on training or on which key drew its noise, so
    the figures answer the same question; the model attackers' figures are kept as they were
    (they came from the trained point's own releases)."""
    out_dir = Path(out_dir)
    clip_norm = round(summary["clip"]["clip_norm"], 4)
    points = {p.name: p for p in privacy_points(settings, clip_norm)}
    for row in tqdm(summary["rows"], desc="release attacks"):
        if row["name"] not in points:
            raise ValueError(
                f"row {row['name']} is not a point of these settings (--cuts, --epsilons)"
            )
        run = build_run(point_config(config, points[row["name"]]), out_dir / row["name"])
        for i, client in enumerate(run.clients):
            old = row["clients"].get(str(client.client_id))
            if old is None:  # independent (t_cut = T): nothing released
                continue
            new, _ = _release_attacks(
                run, i, settings, old["releases_per_image"], _picker(settings, client.client_id)
            )
            if new["t_cut"] != old["t_cut"]:
                raise ValueError(f"{row['name']}: client {client.client_id} cut changed")
            old.update(_jsonable(new))
        row.update(pooled(row["clients"]))
        row["release_attacks"] = {
            "version": ATTACKS_VERSION,
            "note": "re-run without training, on fresh release keys",
        }
    return summary


def refresh_binomials(node):
    """`node` with every binomial summary (a dict holding hits, n and chance) recomputed from
    its counts: a report written before a fix to the interval is re-derived, not re-run."""
    if isinstance(node, list):
        return [refresh_binomials(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: refresh_binomials(v) for k, v in node.items()}
    if {"hits", "n", "chance", "ci"} <= out.keys():
        out.update(binomial_summary(out["hits"], out["n"], out["chance"]))
    return out


def pooled(clients: dict[str, dict]) -> dict:
    """Pooled figures over clients: re-identification hits summed (one binomial), the others
    as the mean and range over clients."""
    if not clients:  # every client at t_cut = T: nothing was released, nothing to attack
        return {"epsilon": 0.0, "epsilon_status": "t_cut = T: nothing is released"}
    out = {}
    for gallery in ("gallery_32", "gallery_all"):
        parts = [c["reidentification"][gallery] for c in clients.values()]
        hits, n = sum(p["hits"] for p in parts), sum(p["n"] for p in parts)
        chance = float(np.mean([p["chance"] for p in parts]))
        out[f"reid_{gallery}"] = binomial_summary(hits, n, chance)
    for attack in ("release_membership", "model_membership"):
        for name in ("auc", "tpr@0.01", "tpr@0.001"):
            values = [c[attack][name]["value"] for c in clients.values() if attack in c]
            values = [v for v in values if v is not None]
            if values:
                out[f"{attack}_{name}"] = {
                    "mean": float(np.mean(values)),
                    "min": float(np.min(values)),
                    "max": float(np.max(values)),
                    "chance": next(iter(clients.values()))[attack][name]["chance"],
                }
    for name in ("psnr", "ssim", "mean_image_psnr", "mean_image_ssim", "psnr_gain_over_mean_image"):
        values = [
            c["reconstruction"][name]["value"] for c in clients.values() if "reconstruction" in c
        ]
        if values:
            out[f"reconstruction_{name}"] = {
                "mean": float(np.mean(values)),
                "min": float(np.min(values)),
                "max": float(np.max(values)),
            }
    eps = [c["formal"]["epsilon"] for c in clients.values()]
    out["epsilon"] = None if any(e is None for e in eps) else max(eps)
    out["epsilon_status"] = next(iter(clients.values()))["formal"]["status"]
    return out


def evaluate_privacy_point(config: RunConfig, folder: Path, settings: PrivacySweepSettings) -> dict:
    """The attacker suite against every client of one trained point."""
    start = time.time()
    run = build_run(config, folder)  # the point's own client keys: the releases it made
    run.vae.to(settings.device)
    server = load_unet(folder / "model" / "server_unet")
    server = None if server is None else server.to(settings.device).eval()
    state = json.loads((folder / "checkpoint" / "state.json").read_text())["extra"]["clients"]
    clients = {}
    for i in tqdm(range(len(run.clients)), desc=f"{folder.name} attacks", leave=False):
        if run.clients[i].split.is_independent:
            continue
        cid = str(run.clients[i].client_id)
        k = max(1, state[cid]["released_epoch"] + 1)
        clients[cid] = client_attacks(run, i, server, settings, k)
    return {"clients": clients, "pooled": pooled(clients), "eval_seconds": time.time() - start}


def point_quality(folder: Path, settings: PrivacySweepSettings) -> dict:
    """Pooled and per-client FID/KID of a trained point (`evaluate_model`), kept in
    `quality.json` and reused while the sampling settings are unchanged."""
    evaluation = EvaluationSettings(
        num_samples=settings.quality_samples,
        num_inference_steps=settings.num_inference_steps,
        scheduler=settings.scheduler,
        seed=settings.seed,
        device=settings.device,
    )

    def compute() -> dict:
        result = evaluate_model(folder / "model", evaluation)
        keep = ("fid", "kid", "kid_std", "num_generated", "num_real")
        return _jsonable(
            {
                "scheduler": settings.scheduler,
                "num_inference_steps": settings.num_inference_steps,
                "pooled": {k: result["pooled"][k] for k in keep},
                "clients": {c: {k: v[k] for k in keep} for c, v in result["clients"].items()},
            }
        )

    return keyed(folder / "quality.json", _jsonable(asdict(evaluation)), compute)


def run_privacy_sweep(
    config: RunConfig, out_dir: str | Path, settings: PrivacySweepSettings, resume: bool = False
) -> dict:
    """Train and attack every point (skipping finished ones); returns the summary."""
    out_dir = grid_folder(out_dir, resume, "sweep")
    clip_norm, clip_info = latent_clip_norm(
        build_run(point_config(config, SweepPoint(0))), settings.clip_percentile
    )
    points = privacy_points(settings, round(clip_norm, 4))
    key = _jsonable(
        {"settings": asdict(settings), "clip_norm": round(clip_norm, 4), "attacks": ATTACKS_VERSION}
    )
    for name in ("device", "cuts", "epsilons", "quality_samples"):  # no effect on a point
        key["settings"].pop(name)
    rows: dict[str, dict] = {}

    def work(point: SweepPoint) -> None:
        point_cfg = point_config(config, point)
        folder = out_dir / point.name
        _, train_seconds = train_point(point_cfg, folder)
        saved = keyed(
            folder / "privacy.json",
            key,
            lambda: _jsonable(evaluate_privacy_point(point_cfg, folder, settings)),
        )
        # Quality where it answers the formal mode's question: its points and their baseline.
        scored = point.variant != "base" or point.t_cut == settings.epsilon_base_cut
        quality = point_quality(folder, settings) if settings.quality_samples and scored else None
        cuts = sorted({c["t_cut"] for c in saved["clients"].values()})
        cuts = cuts or [point_cfg.split.num_train_timesteps]  # ICM: no client released
        rows[point.name] = {
            "name": point.name,
            "variant": point.variant,
            "t_cut": cuts[0] if len(cuts) == 1 else cuts,
            "clip_norm": point_cfg.privacy.clip_norm,
            "target_epsilon": point_cfg.privacy.target_epsilon or None,
            "train_seconds": train_seconds,
            **saved["pooled"],
            "quality": quality,
            "clients": saved["clients"],
        }

    walk(points, lambda p: out_dir / p.name, work, wait=True, desc="privacy sweep")
    return {
        "format": FORMAT,
        "threat_model": THREAT_MODEL,
        "release_noise": "secret: HMAC-SHA256 of (client, image, epoch) under each client's "
        "256-bit key",
        "release_policy": config.split.release_policy,
        "steps": config.train.max_steps,
        "clip": clip_info,
        "settings": key["settings"],
        "rows": [rows[p.name] for p in points],
    }
