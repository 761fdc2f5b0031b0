"""Sample a client's images for evaluation: one seed per image, so image i never depends on
the batch it was drawn in (NVlabs/edm's convention)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm


def sample_seed(seed: int, client_id: int, index: int) -> int:
    """A 63-bit seed for evaluation image `index` of `client_id`.

    Hashed with its own tag, so it never coincides with a training release's noise seed.
    """
    digest = hashlib.sha256(f"latentfuse-eval|{seed}|{client_id}|{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def sample_labels(real_labels: Sequence[int], count: int, seed: int) -> list[int]:
    """`count` class labels that follow the real images' class mix: a seeded shuffle, cycled."""
    if count and not len(real_labels):
        raise ValueError("cannot choose class labels: the client has no real images")
    order = np.random.default_rng(seed).permutation(len(real_labels))
    return [int(real_labels[order[i % len(order)]]) for i in range(count)]


@torch.no_grad()
def generate_images(
    pipe,
    client_id: int,
    labels: Sequence[int],
    seed: int = 0,
    num_inference_steps: int = 50,
    batch_size: int = 64,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """uint8 images (n, 3, h, w) sampled by `pipe` for `client_id`, one per label."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    chunks = []
    for start in tqdm(range(0, len(labels), batch_size), desc=f"sample client {client_id}"):
        stop = min(start + batch_size, len(labels))
        generators = [
            torch.Generator().manual_seed(sample_seed(seed, client_id, i))
            for i in range(start, stop)
        ]
        images = pipe(
            client_id=client_id,
            class_labels=list(labels[start:stop]),
            batch_size=stop - start,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=generators,
            output_type="pt",
        ).images  # (b, 3, h, w) in [0, 1]
        chunks.append((images.float().cpu().clamp(0, 1) * 255).round().to(torch.uint8))
    if not chunks:
        raise ValueError("no labels given: nothing to sample")
    return torch.cat(chunks)
