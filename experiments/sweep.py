"""The cut-point sweep: one run per t_cut (same steps and batch), scored for what it samples and
what its releases disclose, as in the paper's Figure 3; plus the objective and release-policy
ablations at a few cuts.

Each (cut, variant) point is a folder `cut-0100-base/` holding its training run (checkpoint,
`model/`, `timing.json`) and `evaluation.json`. A point whose evaluation matches the current
settings is skipped and an unfinished run continues from its checkpoint, so a sweep resumes
where it stopped. The GM run (t_cut = 0) is always trained first: its server_unet, trained on
clean latents, is the attacker that denoises every other cut's releases.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from experiments.grid import grid_folder, walk
from latentfuse.checkpointing import atomic_write_json
from latentfuse.config import RELEASE_POLICIES, RunConfig, apply_overrides, config_from_dict
from latentfuse.evaluation.burden import client_burden
from latentfuse.evaluation.disclosure import reconstruction_attack, reidentification, release_fid
from latentfuse.evaluation.evaluate import EvaluationSettings, evaluate_model
from latentfuse.evaluation.features import InceptionExtractor, extract_features, to_uint8
from latentfuse.evaluation.reference import cached_reference_stats, load_real_images
from latentfuse.method.privacy import release_guarantee
from latentfuse.method.split import OBJECTIVES
from latentfuse.pipelines.folder import load_unet
from latentfuse.training.runner import train
from latentfuse.training.setup import Run, build_run

logger = logging.getLogger(__name__)

FORMAT = 1
ATTACKER_CUT = 0
BURDEN_INFERENCE_STEPS = 50  # the client's FLOP share of a 50-step chain (any sampler)
ABLATIONS = ("objective", "release")  # the other server objective; the other release policy
DISCLOSURE_KEYS = ("release_fid", "attack_psnr", "attack_ssim", "reid_rate")


@dataclass(frozen=True)
class SweepSettings:
    """Which cuts to run and how each point is scored."""

    cuts: tuple[int, ...] = (0, 20, 50, 100, 200, 500, 1000)
    ablation_cuts: tuple[int, ...] = (100, 500)
    ablations: tuple[str, ...] = ABLATIONS  # which of the two ablations to run at ablation_cuts
    num_samples: int = 1000  # generated images per client
    num_releases: int | None = None  # releases attacked per client; None: num_samples
    num_inference_steps: int = 50  # sampler steps of the evaluation samples
    scheduler: str = "ddpm"  # the evaluation sampler (ddpm: ancestral, as the figures ran)
    attack_steps: int = 50  # the attacker's DDIM (eta 0) steps from the release level down to 0
    seed: int = 0
    batch_size: int = 64
    clip: str | None = None  # CLIP model for FCD; None: FCD reported unavailable
    inception: str | None = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        if not self.cuts or any(c < 0 for c in self.cuts) or len(set(self.cuts)) != len(self.cuts):
            raise ValueError(f"cuts must be unique non-negative integers, got {self.cuts}")
        unknown = sorted(set(self.ablations) - set(ABLATIONS))
        if unknown or not self.ablations:
            raise ValueError(
                f"ablations must be a non-empty subset of {', '.join(ABLATIONS)}, "
                f"got {', '.join(self.ablations) or 'none'}"
            )
        if any(c < 1 for c in self.ablation_cuts):
            raise ValueError(f"ablation_cuts must be >= 1, got {self.ablation_cuts}")
        for name, low in (("num_samples", 2), ("num_releases", 2), ("attack_steps", 1)):
            value = getattr(self, name)  # FID needs two samples
            if value is not None and value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")

    def evaluation(self) -> EvaluationSettings:
        """The sample-quality settings of `evaluate_model`."""
        names = ("num_samples", "num_inference_steps", "scheduler", "seed", "batch_size")
        names += ("clip", "inception")
        return EvaluationSettings(**{n: getattr(self, n) for n in names}, device=self.device)


@dataclass(frozen=True)
class SweepPoint:
    """One run of the sweep: a cut and a variant ("base" or an ablation) with its overrides."""

    t_cut: int
    variant: str = "base"
    overrides: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """The point's folder name, e.g. `cut-0100-base`."""
        return f"cut-{self.t_cut:04d}-{self.variant}"


@dataclass
class _Shared:
    """What every point's evaluation shares: the attacker and Inception."""

    attacker: torch.nn.Module
    attacker_labels: str  # the GM server's conditioning: "class", "client" or "none"
    inception: InceptionExtractor
    galleries: dict = field(default_factory=dict)  # (client, sources) -> their features


def model_role(t_cut: int, num_train_timesteps: int) -> str:
    """The row's model mark: GM at t_cut = 0, ICM at t_cut = T, else split."""
    return "GM" if t_cut == 0 else "ICM" if t_cut == num_train_timesteps else "split"


def ablation_variants(
    config: RunConfig, ablations: tuple[str, ...] = ABLATIONS
) -> dict[str, tuple[str, ...]]:
    """The ablations asked for: the other server objective and/or the other release policy."""
    objective = next(o for o in OBJECTIVES if o != config.split.objective)
    policy = next(p for p in RELEASE_POLICIES if p != config.split.release_policy)
    variants = {
        "objective": {f"objective-{objective}": (f'split.objective="{objective}"',)},
        "release": {f"release-{policy}": (f'split.release_policy="{policy}"',)},
    }
    return {k: v for a in ABLATIONS if a in ablations for k, v in variants[a].items()}


def sweep_points(config: RunConfig, settings: SweepSettings) -> list[SweepPoint]:
    """Every point to run, the GM attacker first, then base cuts, then the ablations."""
    T = config.split.num_train_timesteps
    if any(c.t_cut is not None for c in config.clients):
        raise ValueError("clients[].t_cut overrides the swept split.t_cut: remove them")
    if any(c > T for c in settings.cuts):
        raise ValueError(f"cuts must lie in [0, {T}], got {settings.cuts}")
    if any(c >= T for c in settings.ablation_cuts):
        raise ValueError(f"ablation_cuts must lie in [1, {T - 1}], got {settings.ablation_cuts}")
    base = sorted({ATTACKER_CUT, *settings.cuts, *settings.ablation_cuts})
    points = [SweepPoint(c) for c in base]
    variants = ablation_variants(config, settings.ablations)
    for cut in sorted(set(settings.ablation_cuts)):
        points += [SweepPoint(cut, v, o) for v, o in variants.items()]
    return points


def point_config(config: RunConfig, point: SweepPoint) -> RunConfig:
    """The base config with the point's cut and overrides."""
    values = copy.deepcopy(config.to_dict())
    apply_overrides(values, [f"split.t_cut={point.t_cut}", *point.overrides])
    return config_from_dict(values)


def same_config(saved: dict, config: RunConfig) -> bool:
    """Whether a saved config.json describes `config`: read through the current defaults, so
    a field added since (at its default) does not make an old run look different."""
    try:
        return _jsonable(config_from_dict(saved).to_dict()) == _jsonable(config.to_dict())
    except ValueError:  # a field that no longer exists, or a value no longer valid
        return False


def train_point(config: RunConfig, folder: Path) -> tuple[Path, float]:
    """Train (or finish training) one point; returns its model folder and training seconds."""
    timing = folder / "timing.json"
    saved = folder / "config.json"
    if saved.is_file() and not same_config(json.loads(saved.read_text()), config):
        raise ValueError(f"{folder} was trained with another config: choose another --out-dir")
    if timing.is_file() and (folder / "model" / "collafuse.json").is_file():
        return folder / "model", json.loads(timing.read_text())["train_seconds"]
    start = time.time()
    model = train(config, folder, resume=True)  # continues a checkpoint if one is there
    seconds = time.time() - start
    atomic_write_json(timing, {"train_seconds": seconds, "note": "the session that finished it"})
    return model, seconds


def latent_clip_norm(run: Run, percentile: float) -> tuple[float, dict]:
    """The clip norm C: `percentile` of the L2 norms of every client's training latents."""
    norms = torch.cat([c.z0.flatten(1).norm(dim=1) for c in run.clients])
    clip_norm = float(np.percentile(norms.double().numpy(), percentile))
    return clip_norm, {
        "clip_norm": clip_norm,
        "rule": f"{percentile:g}th percentile of the L2 norms of all clients' training latents",
        "num_latents": len(norms),
        "share_above": float((norms > clip_norm).double().mean()),
        "max_norm": float(norms.max()),
    }


def _attacker_labels(
    mode: str, release_labels: torch.Tensor | None, client_id: int, n: int
) -> torch.Tensor | None:
    """What the attacker conditions on: the released labels, the client id, or the null label."""
    if mode == "class":
        return release_labels  # None (labels withheld): the attacker falls back to the null label
    return torch.full((n,), client_id) if mode == "client" else None


def client_disclosure(
    run: Run, client_index: int, shared: _Shared, settings: SweepSettings
) -> dict:
    """Disclosure a-c of one client's releases: release FID, the attack, re-identification."""
    client, share = run.clients[client_index], run.shares[client_index]
    cid, resolution, bs = client.client_id, run.config.data.resolution, settings.batch_size
    release = client.make_release(0)  # fresh: the first epoch's release
    wanted = settings.num_releases if settings.num_releases is not None else settings.num_samples
    n = min(wanted, client.num_images)
    rng = np.random.default_rng(settings.seed * 1_000_003 + cid)  # the same images at every cut
    index = torch.from_numpy(np.sort(rng.choice(client.num_images, n, replace=False)))
    latents = release.latents[index].to(settings.device)
    labels = None if release.labels is None else release.labels[index]
    sources = [share.train_indices[i] for i in index.tolist()]
    originals = load_real_images(run.dataset, sources, resolution).float() / 127.5 - 1
    real = cached_reference_stats(
        shared.inception, run.dataset, share.eval_indices, resolution, bs, "inception"
    )
    fid = release_fid(run.vae, latents, real, shared.inception, batch_size=bs)
    labels = _attacker_labels(shared.attacker_labels, labels, cid, n)
    alphas, t_cut = run.scheduler.alphas_cumprod, client.split.handoff_t
    steps = settings.attack_steps
    attack = reconstruction_attack(
        shared.attacker, alphas, run.vae, latents, originals, t_cut, steps, labels, bs
    )
    key = (cid, tuple(sources))  # the same images at every cut: their features once
    if key not in shared.galleries:
        shared.galleries[key] = extract_features(
            shared.inception, to_uint8(originals), bs, f"client {cid} re-id gallery"
        )
    reid = reidentification(
        shared.inception, attack["images"], shared.galleries[key], torch.arange(n), bs
    )
    return {
        **{f"release_{k}": fid[k] for k in ("fid", "fid_status", "kid", "num_real")},
        **{f"attack_{k}": attack[k] for k in ("psnr", "ssim", "num_steps")},
        **{f"reid_{k}": reid[k] for k in ("rate", "chance")},
        "num_releases": n,
    }


def point_privacy(run: Run, folder: Path) -> dict:
    """Disclosure d: the (epsilon, delta) each client's releases guarantee where the run
    enforced clipping (privacy.clip_norm), else "not applicable"; `fresh` composes over the
    epochs each client actually released."""
    cfg, alphas = run.config, run.scheduler.alphas_cumprod.double()
    state = json.loads((folder / "checkpoint" / "state.json").read_text())["extra"]["clients"]
    clients = {}
    for client in run.clients:  # k: releases of each image, epochs 0..released_epoch
        k = max(1, state[str(client.client_id)]["released_epoch"] + 1)
        k = 1 if cfg.split.release_policy == "once" else k
        report = release_guarantee(
            alphas,
            client.split.release_cut,
            cfg.privacy.clip_norm,
            cfg.privacy.delta,
            cfg.split.release_policy,
            k,
        )
        clients[str(client.client_id)] = {**report, "releases_per_image": k}
    epsilons = [c["epsilon"] for c in clients.values()]
    worst = next((c for c in clients.values() if c["epsilon"] is None), None)
    worst = worst or max(clients.values(), key=lambda c: c["epsilon"])
    return {
        "epsilon": None if None in epsilons else max(epsilons),
        "epsilon_status": worst["status"],
        "delta": cfg.privacy.delta,
        "releases_per_image": max(c["releases_per_image"] for c in clients.values()),
        "clients": clients,
    }


def point_burden(run: Run, model_dir: Path, repeats: int = 3) -> dict[str, dict]:
    """Each client's burden at its cut (`client_burden`): FLOPs and seconds per image on each
    side, in training and in sampling (a 50-step chain and the decoder), and bytes per image."""
    load = lambda path: None if (unet := load_unet(path)) is None else unet.to(run.vae.device)
    server, burden = load(model_dir / "server_unet"), {}
    for client in run.clients:
        unet = load(model_dir / "clients" / str(client.client_id))
        burden[str(client.client_id)] = client_burden(
            unet,
            server,
            run.vae,
            run.scheduler,
            client.split.handoff_t,
            BURDEN_INFERENCE_STEPS,
            repeats=repeats,
        )
    return burden


def cached_burden(folder: Path, point_run: Callable[[], Run]) -> dict[str, dict]:
    """`point_burden` of a trained point, kept in its `burden.json` (it depends only on the
    model, so a re-evaluation keeps it and a sweep evaluated before it existed gains it)."""
    path = folder / "burden.json"
    if path.is_file():
        return json.loads(path.read_text())
    burden = _jsonable(point_burden(point_run(), folder / "model"))
    atomic_write_json(path, burden)
    return burden


def evaluate_point(
    point: SweepPoint,
    config: RunConfig,
    folder: Path,
    shared: _Shared,
    settings: SweepSettings,
    point_run: Callable[[], Run],
) -> dict:
    """Sample quality, disclosure a-d and client burden of one trained point."""
    start = time.time()
    model_dir = folder / "model"
    quality = evaluate_model(model_dir, settings.evaluation())
    run = point_run()
    T = config.split.num_train_timesteps
    disclosure = {}
    if point.t_cut < T:  # at t_cut = T nothing is released: nothing to attack
        for i in tqdm(range(len(run.clients)), desc=f"{point.name} disclosure", leave=False):
            disclosure[str(run.clients[i].client_id)] = client_disclosure(run, i, shared, settings)
    privacy = point_privacy(run, folder)
    return {
        "quality": quality,
        "disclosure": disclosure,
        "privacy": privacy,
        "eval_seconds": time.time() - start,
    }


def burden_summary(burden: dict[str, dict]) -> dict[str, float | None]:
    """The row's burden columns: shares and per-image costs, as means over clients."""
    mean = lambda phase, key: _mean([b[phase].get(key) for b in burden.values()])
    seconds = [
        (b["sampling"]["client_seconds_per_image"], b["sampling"]["server_seconds_per_image"])
        for b in burden.values()
    ]
    return {
        "client_flop_share": mean("sampling", "client_share"),
        "client_seconds_share": _mean([c / (c + s) if c + s > 0 else None for c, s in seconds]),
        "client_train_flop_share": mean("training", "client_share"),
        "client_sampling_gflops": _giga(mean("sampling", "client_flops_per_image")),
        "server_sampling_gflops": _giga(mean("sampling", "server_flops_per_image")),
        "client_train_gflops": _giga(mean("training", "client_flops_per_image")),
        "server_train_gflops": _giga(mean("training", "server_flops_per_image")),
        "client_sampling_seconds": mean("sampling", "client_seconds_per_image"),
        "server_sampling_seconds": mean("sampling", "server_seconds_per_image"),
        "upload_bytes_per_release": mean("bytes_per_image", "training_upload_per_release"),
        "download_bytes_per_sample": mean("bytes_per_image", "sampling_download"),
    }


def point_row(
    point: SweepPoint, config: RunConfig, result: dict, train_seconds: float, burden: dict
) -> dict:
    """The summary row of one evaluated point."""
    quality, disclosure, privacy = result["quality"], result["disclosure"], result["privacy"]
    pooled = quality["pooled"]
    weights = {cid: d["num_releases"] for cid, d in disclosure.items()}
    row = {
        "t_cut": point.t_cut,
        "model": model_role(point.t_cut, config.split.num_train_timesteps),
        "variant": point.variant,
        "objective": config.split.objective,
        "release_policy": config.split.release_policy,
        **{k: pooled[k] for k in ("fid", "fid_status", "kid", "kid_std", "fcd", "fcd_status")},
        # release FID/KID: the mean over clients; the attack and re-identification: per image
        **{k: _mean([d[k] for d in disclosure.values()]) for k in ("release_fid", "release_kid")},
        **{k: _weighted(disclosure, k, weights) for k in ("attack_psnr", "attack_ssim")},
        "reid_rate": _weighted(disclosure, "reid_rate", weights),
        "reid_chance": _mean([d["reid_chance"] for d in disclosure.values()]),
        "disclosure_status": "ok" if disclosure else "t_cut = T: nothing is released",
        **{k: privacy[k] for k in ("epsilon", "epsilon_status", "releases_per_image")},
        **burden_summary(burden),
        "num_samples": quality["num_samples"],
        "num_generated_pooled": pooled["num_generated"],
        "num_releases": sum(weights.values()),
        "steps": config.train.max_steps,
        "train_seconds": train_seconds,
        "eval_seconds": result["eval_seconds"],
        "wall_seconds": train_seconds + result["eval_seconds"],
        "folder": point.name,
    }
    row["clients"] = {
        cid: {
            "fid": entry["fid"],
            "kid": entry["kid"],
            **{k: disclosure.get(cid, {}).get(k) for k in DISCLOSURE_KEYS},
            "epsilon": privacy["clients"][cid]["epsilon"],
            "client_flop_share": burden[cid]["sampling"]["client_share"],
            "burden": burden[cid],
        }
        for cid, entry in quality["clients"].items()
    }
    return row


def run_sweep(
    config: RunConfig, out_dir: str | Path, settings: SweepSettings, resume: bool = False
) -> dict:
    """Train and evaluate every point (skipping finished ones); returns the summary."""
    out_dir = grid_folder(out_dir, resume, "sweep")
    points = sweep_points(config, settings)
    configs = {p: point_config(config, p) for p in points}
    attacker_point = points[0]  # the GM, t_cut = 0
    attacker_model, _ = train_point(configs[attacker_point], out_dir / attacker_point.name)
    shared = _Shared(
        load_unet(attacker_model / "server_unet").to(settings.device),
        configs[attacker_point].server_labels,
        InceptionExtractor(settings.inception, settings.device),
    )
    rows: dict[SweepPoint, dict] = {}

    def work(point: SweepPoint) -> None:
        rows[point] = _point(point, configs[point], out_dir, shared, settings)

    walk(points, lambda p: out_dir / p.name, work, wait=True, desc="sweep")
    base = [rows[p] for p in points if p.variant == "base" and p.t_cut in settings.cuts]
    ablation = [rows[p] for p in points if p.t_cut in settings.ablation_cuts]
    ablation.sort(key=lambda row: row["t_cut"])  # stable: base first, then the variants
    return {
        "format": FORMAT,
        "num_train_timesteps": config.split.num_train_timesteps,
        "num_clients": config.data.num_clients,
        "num_samples": settings.num_samples,
        "num_generated_pooled": settings.num_samples * config.data.num_clients,
        "steps": config.train.max_steps,
        "server_batch_size": config.train.server_batch_size,
        "client_batch_size": config.train.client_batch_size,
        "attacker": {"t_cut": ATTACKER_CUT, "model": f"{attacker_point.name}/model/server_unet"},
        "privacy": {
            "delta": config.privacy.delta,
            "clip_norm": config.privacy.clip_norm or None,
            "note": "epsilon only where privacy.clip_norm enforces clipping; see the privacy "
            "sweep (experiments/run_privacy_sweep.py) for the attacker suite",
        },
        "settings": _jsonable(asdict(settings)),
        "rows": base,
        "ablations": ablation,
    }


def _point(
    point: SweepPoint, config: RunConfig, out_dir: Path, shared: _Shared, settings: SweepSettings
) -> dict:
    """Train one point unless trained, evaluate it unless its `evaluation.json` is up to date."""
    folder, path = out_dir / point.name, out_dir / point.name / "evaluation.json"
    _, train_seconds = train_point(config, folder)
    key = _jsonable({"settings": asdict(settings), "privacy": config.privacy.__dict__})
    for name in ("cuts", "ablation_cuts", "ablations", "device", "batch_size"):  # no effect
        key["settings"].pop(name)
    saved, result = json.loads(path.read_text()) if path.is_file() else {}, None
    if saved.get("key") == key:
        logger.info("%s: evaluated already, skipped", point.name)
        result = {k: saved[k] for k in ("quality", "disclosure", "privacy", "eval_seconds")}
    elif saved:
        logger.info("%s: evaluation settings changed, evaluating again", point.name)
    point_run = functools.cache(lambda: _built_run(config, folder, settings.device))
    if result is None:
        result = evaluate_point(point, config, folder, shared, settings, point_run)
    burden = cached_burden(folder, point_run)
    row = _jsonable(point_row(point, config, result, train_seconds, burden))
    if saved.get("key") != key or saved.get("row") != row:
        atomic_write_json(path, _jsonable({"key": key, "row": row, **result}))
    return json.loads(json.dumps(row))


def _built_run(config: RunConfig, folder: Path, device: str) -> Run:
    """A point's run, built once for its evaluation and its burden: the point's own client keys
    (the releases it made), the autoencoder on `device`."""
    run = build_run(config, folder)
    run.vae.to(device)
    return run


def _finite_or_none(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _giga(value: float | None) -> float | None:
    return None if value is None else value / 1e9


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(values)) if values else None


def _weighted(disclosure: dict, key: str, weights: dict) -> float | None:
    pairs = [(d[key], weights[c]) for c, d in disclosure.items() if d[key] is not None]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else None


def _jsonable(value):
    """Tuples as lists and inf/nan as None: what the value reads back as from strict JSON."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return _finite_or_none(value) if isinstance(value, float) else value
