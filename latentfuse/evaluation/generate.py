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


def sample_labels(real_labels: Sequence, count: int, seed: int) -> list:
    """`count` conditionings that follow the real images' mix (class labels, or 0/1 attribute
    rows for attribute- and text-conditioned models): a seeded shuffle, cycled."""
    if count and not len(real_labels):
        raise ValueError("cannot choose class labels: the client has no real images")
    order = np.random.default_rng(seed).permutation(len(real_labels))
    picks = [real_labels[order[i % len(order)]] for i in range(count)]
    return [[int(v) for v in p] if isinstance(p, Sequence | np.ndarray) else int(p) for p in picks]


@torch.no_grad()
def generate_images(
    pipe,
    client_id: int,
    labels: Sequence,
    seed: int = 0,
    num_inference_steps: int = 50,
    batch_size: int = 64,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """uint8 images (n, 3, h, w) sampled by `pipe` for `client_id`, one per label (a class
    index, or a 0/1 attribute row for attribute- and text-conditioned models)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    chunks = []
    for start in tqdm(range(0, len(labels), batch_size), desc=f"sample client {client_id}"):
        stop = min(start + batch_size, len(labels))
        generators = [
            torch.Generator().manual_seed(sample_seed(seed, client_id, i))
            for i in range(start, stop)
        ]
        chunk = list(labels[start:stop])
        by_rows = isinstance(chunk[0], Sequence)
        images = pipe(
            client_id=client_id,
            class_labels=None if by_rows else chunk,
            attributes=chunk if by_rows else None,
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
