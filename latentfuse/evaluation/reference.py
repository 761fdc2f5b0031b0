"""Reference statistics of real images, cached per client split as safetensors plus JSON.

The cache key covers the data set, the exact image indices (the split), the resolution and
the feature extractor's fingerprint, so a new partition or a new network never reads stale
statistics.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from tqdm.auto import tqdm

from latentfuse.checkpointing import atomic_write_dir
from latentfuse.data.datasets import ImageDataset, load_image
from latentfuse.data.latents import dataset_fingerprint
from latentfuse.evaluation.features import FeatureExtractor, extract_features, to_uint8
from latentfuse.evaluation.metrics import FeatureStats
from latentfuse.paths import cache_dir

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
CACHE_FOLDER = "reference-stats"


def load_real_images(
    dataset: ImageDataset, indices: Sequence[int], resolution: int, desc: str = "load images"
) -> torch.Tensor:
    """uint8 images (n, 3, resolution, resolution) of `dataset[indices]`."""
    if not indices:
        return torch.zeros(0, 3, resolution, resolution, dtype=torch.uint8)
    images = [
        to_uint8(load_image(dataset.records[i].path, resolution)[None])
        for i in tqdm(indices, desc=desc, leave=False)
    ]
    return torch.cat(images)


def reference_manifest(
    dataset: ImageDataset, indices: Sequence[int], resolution: int, extractor: FeatureExtractor
) -> dict:
    """What identifies a reference set: data set, indices hash, resolution, extractor."""
    indices = [int(i) for i in indices]
    return {
        "format": CACHE_FORMAT,
        "extractor": extractor.fingerprint,
        "dataset_sha256": dataset_fingerprint(dataset),
        "indices_sha256": hashlib.sha256(json.dumps(indices).encode()).hexdigest(),
        "num_images": len(indices),
        "resolution": resolution,
    }


def reference_cache_path(manifest: dict) -> Path:
    """The cache folder of one reference set."""
    key = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:24]
    return cache_dir() / CACHE_FOLDER / f"{manifest['extractor']}-{key}"


def reference_is_cached(
    extractor: FeatureExtractor, dataset: ImageDataset, indices: Sequence[int], resolution: int
) -> bool:
    """Whether `cached_reference_stats` would read these statistics rather than compute them."""
    manifest = reference_manifest(dataset, indices, resolution, extractor)
    manifest_file = reference_cache_path(manifest) / "manifest.json"
    return manifest_file.is_file() and json.loads(manifest_file.read_text()) == manifest


def cached_reference_stats(
    extractor: FeatureExtractor,
    dataset: ImageDataset,
    indices: Sequence[int],
    resolution: int,
    batch_size: int = 64,
    desc: str = "reference",
) -> FeatureStats:
    """Features, mean and covariance of `dataset[indices]`: from the cache, else computed."""
    manifest = reference_manifest(dataset, indices, resolution, extractor)
    folder = reference_cache_path(manifest)
    manifest_file = folder / "manifest.json"
    if manifest_file.is_file() and json.loads(manifest_file.read_text()) == manifest:
        tensors = load_file(folder / "stats.safetensors")
        return FeatureStats(tensors["features"], tensors["mu"], tensors["sigma"])
    images = load_real_images(dataset, indices, resolution, desc=f"{desc}: load")
    features = extract_features(extractor, images, batch_size, desc=f"{desc}: features")
    stats = FeatureStats.from_features(features)

    def write(tmp: Path) -> None:
        tensors = {"features": stats.features, "mu": stats.mu, "sigma": stats.sigma}
        save_file(
            {k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp / "stats.safetensors"
        )
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))

    atomic_write_dir(folder, write)
    logger.info("cached reference statistics of %d images in %s", len(indices), folder)
    return stats
