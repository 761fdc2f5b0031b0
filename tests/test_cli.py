"""The `latentfuse` command line: reconstruct writes a grid PNG; bad input exits 2, says why."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from PIL import Image

from latentfuse.cli import main

RESOLUTION = 32
PAD = 2  # make_grid's padding between tiles
COLUMNS = 8  # reconstruct puts at most 8 images on a row


def _reconstruct_args(vae_dir: Path, data: Path, out: Path, num_images: int) -> list[str]:
    return [
        "reconstruct",
        "--vae",
        str(vae_dir),
        "--data",
        str(data),
        "--split",
        "",  # the ImageFolder fixture has no train/test sub-folders
        "--num-images",
        str(num_images),
        "--resolution",
        str(RESOLUTION),
        "--out",
        str(out),
    ]


def _expected_size(num_images: int) -> tuple[int, int]:
    """(width, height) of a grid with one original row over one reconstruction row per chunk."""
    columns = min(num_images, COLUMNS)
    rows = 2 * math.ceil(num_images / columns)
    return columns * (RESOLUTION + PAD) + PAD, rows * (RESOLUTION + PAD) + PAD


@pytest.mark.parametrize(
    "num_images",
    [
        1,
        5,
        16,
        10,
    ],
)
def test_reconstruct_writes_a_grid(
    tiny_vae_dir: Path,
    image_folder: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    num_images: int,
) -> None:
    out = tmp_path / "out" / "reconstruction.png"
    assert main(_reconstruct_args(tiny_vae_dir, image_folder, out, num_images)) == 0
    with Image.open(out) as image:
        assert image.mode == "RGB"
        assert image.size == _expected_size(num_images)
    assert str(out) in capsys.readouterr().out
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary file left


@pytest.mark.parametrize(
    ("num_images", "data", "message"),
    [
        (0, "fixture", "--num-images must be >= 1, got 0"),
        (-3, "fixture", "--num-images must be >= 1, got -3"),
        (4, "missing", "data source not found"),
    ],
)
def test_reconstruct_rejects_bad_input(
    tiny_vae_dir: Path,
    image_folder: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    num_images: int,
    data: str,
    message: str,
) -> None:
    source = image_folder if data == "fixture" else tmp_path / "no-such-data"
    out = tmp_path / "reconstruction.png"
    assert main(_reconstruct_args(tiny_vae_dir, source, out, num_images)) == 2
    stderr = capsys.readouterr().err
    assert "latentfuse reconstruct: error:" in stderr
    assert message in stderr
    if data == "missing":
        assert str(source) in stderr
    assert not out.exists()


def test_reconstruct_split_must_exist(
    tiny_vae_dir: Path, image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _reconstruct_args(tiny_vae_dir, image_folder, tmp_path / "r.png", 4)
    args[args.index("--split") + 1] = "train"  # the fixture has no train/ folder
    assert main(args) == 2
    assert "train" in capsys.readouterr().err
