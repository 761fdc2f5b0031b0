"""A procedurally drawn ImageFolder of coloured shapes: a data set that is not CIFAR-10, made on
the fly (tests, `bench/bench_train_shapes.py`, a first try of `latentfuse train`).

Each class is one shape (circle, square, triangle, cross, ...) drawn at a random size, place
and colour on a random plain background; nothing but the shape tells the classes apart.
`palette="grey"` draws grey levels only (stored as RGB): the setting of a user's small
grayscale data set; "colour" draws any RGB colours, which leaves a latent model much more to
learn that is not the shape.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross", "ring", "bar")
PALETTES = ("colour", "grey")


def _colour(
    rng: random.Random, palette: str, avoid: tuple[int, ...] | None = None
) -> tuple[int, int, int]:
    while True:
        if palette == "grey":
            colour = (rng.randrange(256),) * 3
        else:
            colour = tuple(rng.randrange(256) for _ in range(3))
        if avoid is None or sum(abs(a - b) for a, b in zip(colour, avoid, strict=True)) > 200:
            return colour


def draw_shape(shape: str, size: int, rng: random.Random, palette: str = "colour") -> Image.Image:
    """One `size` x `size` RGB image of `shape` in `palette` ("colour" or "grey")."""
    if palette not in PALETTES:
        raise ValueError(f"palette must be one of {PALETTES}, got {palette!r}")
    background = _colour(rng, palette)
    image = Image.new("RGB", (size, size), background)
    draw, fill = ImageDraw.Draw(image), _colour(rng, palette, background)
    r = rng.uniform(0.22, 0.38) * size
    cx, cy = (rng.uniform(r + 1, size - r - 1) for _ in range(2))
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    elif shape == "cross":
        w = r / 3
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    elif shape == "ring":
        draw.ellipse(box, outline=fill, width=max(2, int(r / 3)))
    elif shape == "bar":
        angle = rng.uniform(0, math.pi)
        dx, dy = r * math.cos(angle), r * math.sin(angle)
        draw.line((cx - dx, cy - dy, cx + dx, cy + dy), fill=fill, width=max(2, int(r / 2.5)))
    else:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    return image


def make_shapes(
    out: str | Path,
    classes: int = 4,
    per_class: int = 200,
    size: int = 32,
    seed: int = 0,
    palette: str = "colour",
) -> Path:
    """Write `out/<shape>/<k>.png` for the first `classes` shapes; returns `out`."""
    if not 1 <= classes <= len(SHAPES):
        raise ValueError(f"classes must be in [1, {len(SHAPES)}], got {classes}")
    out = Path(out)
    for c, shape in enumerate(SHAPES[:classes]):
        folder = out / shape
        folder.mkdir(parents=True, exist_ok=True)
        rng = random.Random(seed * 1000 + c)
        for k in range(per_class):
            draw_shape(shape, size, rng, palette).save(folder / f"{k:05d}.png")
    return out
