"""Encode a client's images once and cache the latents (safetensors plus a JSON manifest).

The manifest records the autoencoder's fingerprint, the data set and the exact image indices
(the partition), so a changed autoencoder or partition invalidates the cache instead of
silently serving stale latents.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from latentfuse.checkpointing import atomic_write_dir
from latentfuse.data.autoencoder import Autoencoder, encode, vae_fingerprint
from latentfuse.data.datasets import ImageDataset, load_image

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1


@dataclass(frozen=True)
class LatentSet:
    """Scaled latents (n, c, h, w) of some images, with their labels (n,) and dataset indices."""

    latents: torch.Tensor
    labels: torch.Tensor
    indices: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.indices)


def dataset_fingerprint(dataset: ImageDataset) -> str:
    """sha256 over the relative image paths and labels: changes when the data set does."""
    digest = hashlib.sha256(repr(dataset.class_names).encode())
    root = dataset.root
    for record in dataset.records:
        name = record.path.relative_to(root) if root else record.path
        digest.update(f"{name}|{record.label}|{record.attributes}\n".encode())
    return digest.hexdigest()


def _manifest(vae_hash: str, data_hash: str, indices: tuple[int, ...], resolution: int) -> dict:
    return {
        "format": CACHE_FORMAT,
        "vae_sha256": vae_hash,
        "dataset_sha256": data_hash,
        "resolution": resolution,
        "num_images": len(indices),
        "indices_sha256": hashlib.sha256(json.dumps(list(indices)).encode()).hexdigest(),
        "indices": list(indices),
    }


@torch.no_grad()
def encode_images(
    vae: Autoencoder,
    dataset: ImageDataset,
    indices: tuple[int, ...],
    resolution: int,
    batch_size: int = 256,
    desc: str = "encode",
) -> torch.Tensor:
    """Encode the images at `indices` to scaled latents (posterior mode), (n, c, h, w)."""
    chunks = []
    for start in tqdm(range(0, len(indices), batch_size), desc=desc, leave=False):
        batch = [
            load_image(dataset.records[i].path, resolution)
            for i in indices[start : start + batch_size]
        ]
        chunks.append(encode(vae, torch.stack(batch)).float().cpu())
    return torch.cat(chunks)


def cached_latents(
    vae: Autoencoder,
    dataset: ImageDataset,
    indices: tuple[int, ...] | list[int],
    cache_path: str | os.PathLike,
    resolution: int = 32,
    vae_hash: str | None = None,
    batch_size: int = 256,
    desc: str | None = None,
) -> LatentSet:
    """Latents of `dataset[indices]`: read from `cache_path` when its manifest matches, else
    encoded now and written there atomically (`desc` names the progress bar; default: how
    many images)."""
    indices = tuple(int(i) for i in indices)
    if not indices:
        raise ValueError(f"no images to encode for cache {cache_path}")
    cache_path = Path(cache_path)
    expected = _manifest(
        vae_hash or vae_fingerprint(vae), dataset_fingerprint(dataset), indices, resolution
    )
    manifest_file = cache_path / "manifest.json"
    if manifest_file.is_file() and json.loads(manifest_file.read_text()) == expected:
        tensors = load_file(cache_path / "latents.safetensors")
        return LatentSet(tensors["latents"], tensors["labels"], indices)
    if manifest_file.is_file():
        logger.info("latent cache %s is stale (autoencoder, data or partition changed)", cache_path)
    desc = desc or f"encoding {len(indices)} images"
    latents = encode_images(vae, dataset, indices, resolution, batch_size, desc=desc)
    labels = torch.tensor([dataset.records[i].label for i in indices], dtype=torch.long)

    def write(tmp: Path) -> None:
        save_file({"latents": latents.contiguous(), "labels": labels}, tmp / "latents.safetensors")
        (tmp / "manifest.json").write_text(json.dumps(expected))

    atomic_write_dir(cache_path, write)
    return LatentSet(latents, labels, indices)
