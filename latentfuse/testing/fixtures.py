"""Data sets in the exact CelebA and AwA2 on-disk formats, drawn procedurally: the settings of
configs/celeba.toml and configs/awa2.toml run end to end on them here, where the real files
cannot be downloaded (`python -m latentfuse.testing.fixtures celeba DIR` writes one).

The CelebA fixture draws a cartoon face whose look follows its attributes (hair colour,
smile, eyeglasses, hat, beard, pale skin, ...), so an attribute-conditioned model has
something to learn; the AwA2 fixture draws an animal-like blob whose colours and stripes
follow its class's predicates.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from PIL import Image, ImageDraw

CELEBA_ATTRIBUTES = [
    "5_o_Clock_Shadow",
    "Arched_Eyebrows",
    "Attractive",
    "Bags_Under_Eyes",
    "Bald",
    "Bangs",
    "Big_Lips",
    "Big_Nose",
    "Black_Hair",
    "Blond_Hair",
    "Blurry",
    "Brown_Hair",
    "Bushy_Eyebrows",
    "Chubby",
    "Double_Chin",
    "Eyeglasses",
    "Goatee",
    "Gray_Hair",
    "Heavy_Makeup",
    "High_Cheekbones",
    "Male",
    "Mouth_Slightly_Open",
    "Mustache",
    "Narrow_Eyes",
    "No_Beard",
    "Oval_Face",
    "Pale_Skin",
    "Pointy_Nose",
    "Receding_Hairline",
    "Rosy_Cheeks",
    "Sideburns",
    "Smiling",
    "Straight_Hair",
    "Wavy_Hair",
    "Wearing_Earrings",
    "Wearing_Hat",
    "Wearing_Lipstick",
    "Wearing_Necklace",
    "Wearing_Necktie",
    "Young",
]
HAIR = {"Black_Hair": (30, 25, 20), "Blond_Hair": (230, 200, 110), "Brown_Hair": (120, 70, 30)}
HAIR["Gray_Hair"] = (160, 160, 160)
AWA2_CLASSES = ("zebra", "antelope", "killer+whale", "dalmatian", "polar+bear")
AWA2_PREDICATES = ("black", "white", "blue", "brown", "stripes", "spots", "big", "water")
AWA2_MATRIX = (
    (1, 1, 0, 0, 1, 0, 1, 0),
    (0, 1, 0, 1, 0, 0, 1, 0),
    (1, 1, 1, 0, 0, 0, 1, 1),
    (1, 1, 0, 0, 0, 1, 0, 0),
    (0, 1, 0, 0, 0, 0, 1, 1),
)


def celeba_attributes(rng: random.Random) -> dict[str, int]:
    """One face's 0/1 attributes, with CelebA's exclusions (one hair colour at most; a beard
    only on a man)."""
    values = {name: int(rng.random() < 0.3) for name in CELEBA_ATTRIBUTES}
    hair = rng.choice([*HAIR, None])
    for name in HAIR:
        values[name] = int(name == hair)
    values["Male"] = int(rng.random() < 0.45)
    values["Smiling"] = int(rng.random() < 0.5)
    values["Young"] = int(rng.random() < 0.75)
    beard = values["Male"] and rng.random() < 0.4
    values["No_Beard"] = int(not beard)
    for name in ("Goatee", "Mustache", "5_o_Clock_Shadow", "Sideburns"):
        values[name] = int(beard and values[name])
    values["Wearing_Lipstick"] = int(not values["Male"] and values["Wearing_Lipstick"])
    return values


def draw_face(values: dict[str, int], size: int, rng: random.Random) -> Image.Image:
    """A cartoon face drawn from its attributes."""
    s = size / 64
    image = Image.new("RGB", (size, size), tuple(rng.randrange(60, 200) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    skin = (250, 225, 205) if values["Pale_Skin"] else (215, 170, 130)
    hair = next((HAIR[n] for n in HAIR if values[n]), (90, 60, 40))
    if not values["Bald"]:
        draw.ellipse((14 * s, 8 * s, 50 * s, 44 * s), fill=hair)
    draw.ellipse((18 * s, 14 * s, 46 * s, 52 * s), fill=skin)
    if values["Bangs"] and not values["Bald"]:
        draw.rectangle((18 * s, 14 * s, 46 * s, 22 * s), fill=hair)
    for x in (25, 39):
        draw.ellipse(((x - 2) * s, 28 * s, (x + 2) * s, 32 * s), fill=(20, 20, 20))
    if values["Eyeglasses"]:
        for x in (25, 39):
            draw.rectangle(((x - 5) * s, 26 * s, (x + 5) * s, 34 * s), outline=(0, 0, 0), width=2)
    lips = (200, 30, 60) if values["Wearing_Lipstick"] else (150, 60, 60)
    if values["Smiling"]:
        draw.arc((25 * s, 36 * s, 39 * s, 46 * s), 20, 160, fill=lips, width=max(1, int(2 * s)))
    else:
        draw.line((27 * s, 42 * s, 37 * s, 42 * s), fill=lips, width=max(1, int(2 * s)))
    if not values["No_Beard"]:
        draw.chord((20 * s, 38 * s, 44 * s, 54 * s), 0, 180, fill=hair)
    if values["Wearing_Hat"]:
        draw.rectangle((12 * s, 6 * s, 52 * s, 16 * s), fill=(40, 40, 140))
    if values["Wearing_Necktie"]:
        draw.polygon([(32 * s, 54 * s), (28 * s, 64 * s), (36 * s, 64 * s)], fill=(150, 0, 0))
    return image


def make_celeba_fixture(root: str | Path, num_images: int = 200, size: int = 64, seed: int = 0):
    """Write `root/img_align_celeba/000001.jpg ...` and `root/list_attr_celeba.txt` (the
    image count, the 40 names, then one row of -1/1 per image, as CelebA ships it)."""
    root = Path(root)
    folder = root / "img_align_celeba"
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    lines = [str(num_images), " ".join(CELEBA_ATTRIBUTES)]
    for index in range(num_images):
        name = f"{index + 1:06d}.jpg"
        values = celeba_attributes(rng)
        draw_face(values, size, rng).save(folder / name, quality=95)
        lines.append(name + " " + " ".join(f"{2 * values[a] - 1:2d}" for a in CELEBA_ATTRIBUTES))
    (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    return root


def draw_animal(predicates: dict[str, int], size: int, rng: random.Random) -> Image.Image:
    """An animal-like blob whose colours and markings follow its class's predicates."""
    s = size / 64
    ground = (60, 110, 200) if predicates["water"] else (110, 160, 70)
    image = Image.new("RGB", (size, size), ground)
    draw = ImageDraw.Draw(image)
    body = (
        (120, 80, 40)
        if predicates["brown"]
        else (235, 235, 235)
        if predicates["white"]
        else (30, 30, 30)
    )
    scale = 1.0 if predicates["big"] else 0.7
    cx, cy = 32 + rng.uniform(-4, 4), 34 + rng.uniform(-4, 4)
    w, h = 22 * scale, 13 * scale
    box = ((cx - w) * s, (cy - h) * s, (cx + w) * s, (cy + h) * s)
    draw.ellipse(box, fill=body)
    mark = (20, 20, 20) if predicates["black"] and body != (30, 30, 30) else (240, 240, 240)
    if predicates["stripes"]:
        for k in range(-3, 4):
            x = (cx + 6 * k * scale) * s
            draw.line(
                (x, (cy - h + 2) * s, x, (cy + h - 2) * s), fill=mark, width=max(1, int(2 * s))
            )
    if predicates["spots"]:
        for _ in range(6):
            x, y = cx + rng.uniform(-w + 4, w - 4), cy + rng.uniform(-h + 3, h - 3)
            draw.ellipse(((x - 2) * s, (y - 2) * s, (x + 2) * s, (y + 2) * s), fill=mark)
    if predicates["blue"]:
        draw.rectangle((0, 56 * s, size, size), fill=(30, 60, 160))
    return image


def make_awa2_fixture(
    root: str | Path, images_per_class: int = 40, size: int = 64, seed: int = 0
) -> Path:
    """Write the AwA2 layout: `JPEGImages/<class>/<class>_10001.jpg ...`, `classes.txt`,
    `predicates.txt` (numbered, tab separated) and `predicate-matrix-binary.txt`."""
    root = Path(root)
    rng = random.Random(seed)
    for label, name in enumerate(AWA2_CLASSES):
        folder = root / "JPEGImages" / name
        folder.mkdir(parents=True, exist_ok=True)
        predicates = dict(zip(AWA2_PREDICATES, AWA2_MATRIX[label], strict=True))
        for k in range(images_per_class):
            draw_animal(predicates, size, rng).save(folder / f"{name}_{10001 + k}.jpg", quality=95)
    numbered = lambda names: "".join(f"{i}\t{n}\n" for i, n in enumerate(names, start=1))  # noqa: E731
    (root / "classes.txt").write_text(numbered(AWA2_CLASSES))
    (root / "predicates.txt").write_text(numbered(AWA2_PREDICATES))
    matrix = "".join(" ".join(map(str, row)) + "\n" for row in AWA2_MATRIX)
    (root / "predicate-matrix-binary.txt").write_text(matrix)
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("format", choices=("celeba", "awa2"))
    parser.add_argument("out", type=Path)
    parser.add_argument("--images", type=int, default=200, help="CelebA: images; AwA2: a class")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.format == "celeba":
        make_celeba_fixture(args.out, args.images, args.size, args.seed)
    else:
        make_awa2_fixture(args.out, args.images, args.size, args.seed)
    print(f"wrote a {args.format} fixture in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
