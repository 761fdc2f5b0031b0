"""Tiny on-disk data sets in the exact ImageFolder, CelebA and AwA2 formats."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from latentfuse.testing.fixtures import CELEBA_ATTRIBUTES as FIXTURE_CELEBA_ATTRIBUTES

IMAGE_FOLDER_CLASSES = ("cat", "dog", "frog", "ship")
IMAGES_PER_CLASS = 6
CELEBA_ATTRIBUTES = tuple(FIXTURE_CELEBA_ATTRIBUTES)  # the 40 names, in the file order
CELEBA_IMAGES = 12
# classes.txt order is deliberately not alphabetical: labels must follow the file.
AWA2_CLASSES = ("zebra", "antelope", "killer+whale")
AWA2_PREDICATES = ("black", "white", "blue", "brown", "stripes")
AWA2_MATRIX = ((1, 1, 0, 0, 1), (0, 1, 0, 1, 0), (1, 1, 1, 0, 0))
AWA2_IMAGES_PER_CLASS = 4


def write_image(path: Path, color: tuple[int, int, int], size: int = 8) -> None:
    """Save a small solid-colour JPEG, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), color).save(path, "JPEG")


def celeba_row(index: int) -> list[int]:
    """0/1 attributes of CelebA fixture image `index` (0-based): fixed pattern plus seeded noise."""
    values = np.random.default_rng(index).integers(0, 2, size=len(CELEBA_ATTRIBUTES))
    values[CELEBA_ATTRIBUTES.index("Male")] = index % 2
    values[CELEBA_ATTRIBUTES.index("Eyeglasses")] = int(index % 3 == 0)
    values[CELEBA_ATTRIBUTES.index("Wearing_Hat")] = int(index == 4)
    return values.tolist()


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """ImageFolder: 4 classes x 6 JPEGs of 8x8."""
    root = tmp_path / "imagefolder"
    for label, name in enumerate(IMAGE_FOLDER_CLASSES):
        for i in range(IMAGES_PER_CLASS):
            write_image(root / name / f"{i:04d}.jpg", (60 * label, 40 * i, 128))
    return root


@pytest.fixture
def celeba_root(tmp_path: Path) -> Path:
    """CelebA layout: img_align_celeba/000001.jpg.. and list_attr_celeba.txt with -1/1 values."""
    root = tmp_path / "celeba"
    lines = [str(CELEBA_IMAGES), " ".join(CELEBA_ATTRIBUTES) + " "]
    for index in range(CELEBA_IMAGES):
        name = f"{index + 1:06d}.jpg"
        write_image(root / "img_align_celeba" / name, (20 * index, 100, 200))
        lines.append(name + " " + " ".join(f"{2 * v - 1:2d}" for v in celeba_row(index)))
    (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def awa2_root(tmp_path: Path) -> Path:
    """AwA2 layout: JPEGImages/<class>/, classes/predicates.txt, predicate-matrix-binary.txt."""
    root = tmp_path / "awa2"
    for label, name in enumerate(AWA2_CLASSES):
        for i in range(AWA2_IMAGES_PER_CLASS):
            write_image(root / "JPEGImages" / name / f"{name}_{10001 + i}.jpg", (80 * label, i, 9))
    numbered = lambda names: "".join(f"{i}\t{n}\n" for i, n in enumerate(names, start=1))
    (root / "classes.txt").write_text(numbered(AWA2_CLASSES))
    (root / "predicates.txt").write_text(numbered(AWA2_PREDICATES))
    matrix = "".join(" ".join(map(str, row)) + "\n" for row in AWA2_MATRIX)
    (root / "predicate-matrix-binary.txt").write_text(matrix)
    return root


@pytest.fixture
def image_archive(image_folder: Path, tmp_path: Path) -> Path:
    """The ImageFolder fixture packed as a .tar.gz under one wrapper folder."""
    archive = tmp_path / "imagefolder.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(image_folder, arcname="imagefolder")
    return archive


@pytest.fixture
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point LATENTFUSE_CACHE at a temporary folder so no test writes to the user's cache."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("LATENTFUSE_CACHE", str(cache))
    return cache


TINY_VAE_SCALING_FACTOR = 0.5


@pytest.fixture
def tiny_vae_dir(tmp_path: Path) -> Path:
    """A randomly initialised AutoencoderKL (32x32 -> 4x16x16) saved as a diffusers folder."""
    folder = tmp_path / "tiny-vae"
    tiny_autoencoder().save_pretrained(folder, safe_serialization=True)
    return folder


def tiny_autoencoder():
    """The randomly initialised AutoencoderKL of `tiny_vae_dir` (seed 0)."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=32,
        scaling_factor=TINY_VAE_SCALING_FACTOR,
        mid_block_add_attention=False,
    )


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The shared tiny world (tests/worlds.py): noise images in 4 classes and a tiny VAE."""
    from tests.worlds import make_tiny_world

    return make_tiny_world(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="session")
def tiny_model(tiny_world: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`<run>/model` of a 2-client, 2-step run at t_cut 100 on the tiny world: the one trained
    model the tests that only need *a* model share (read it, never change it)."""
    from latentfuse.training.runner import train
    from tests.worlds import tiny_config

    overrides = [
        "train.server_batch_size=4",
        "train.client_batch_size=2",
        "train.max_steps=2",
        "train.warmup_steps=1",
        "train.num_preview_images=1",
        "train.preview_inference_steps=2",
        "split.t_cut=100",
    ]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LATENTFUSE_CACHE", str(tiny_world["cache"]))
        config = tiny_config(tiny_world, *overrides)
        return train(config, tmp_path_factory.mktemp("tiny-model") / "run")
