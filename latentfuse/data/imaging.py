"""Image tensors to PIL images and grids."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1], (b, 3, h, w) -> uint8 array (b, h, w, 3)."""
    array = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round()
    return array.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def make_grid(images: torch.Tensor, columns: int | None = None, pad: int = 2) -> Image.Image:
    """Tile images in [-1, 1], (b, 3, h, w), into one PIL image with `pad` pixels between."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (b, 3, h, w), got {tuple(images.shape)}")
    count, _, height, width = images.shape
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    canvas = np.full(
        (rows * (height + pad) + pad, columns * (width + pad) + pad, 3), 255, dtype=np.uint8
    )
    for i, tile in enumerate(to_uint8(images)):
        top, left = pad + (i // columns) * (height + pad), pad + (i % columns) * (width + pad)
        canvas[top : top + height, left : left + width] = tile
    return Image.fromarray(canvas)


def save_image(image: Image.Image, path: str | os.PathLike) -> Path:
    """Save atomically: write a temporary file, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    image.save(tmp)
    os.replace(tmp, path)
    return path
