"""The `latentfuse` command line: reconstruct writes a grid PNG; bad input exits 2, says why."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from latentfuse.cli.main import main

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
        "--subfolder",
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
    args[args.index("--subfolder") + 1] = "train"  # the fixture has no train/ folder
    assert main(args) == 2
    assert "train" in capsys.readouterr().err


@pytest.mark.parametrize(("client", "rows"), [("all", 2), ("1", 1)])
def test_sample_writes_a_grid_per_client(tiny_model, tmp_path, capsys, client, rows):
    out = tmp_path / "grid.png"
    argv = [
        "sample",
        "--model",
        str(tiny_model),
        "--client",
        client,
        "--num-images",
        "3",
        "--num-inference-steps",
        "3",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    with Image.open(out) as grid:
        width, height = grid.size
        assert height == 2 + rows * 34  # a row of 32 px tiles (2 px padding) per client
        margin = width - (2 + 3 * 34)  # the rows' names, written left of the tiles
        assert margin > 40
        left = np.asarray(grid.convert("L"))[:, :margin]
        assert (left < 128).any()  # text is drawn there
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--num-images", "0"], "--num-images"),
        (["--model", "/nonexistent/model"], "no such folder (a local path, not a hub id)"),
        (["--model", "tests/no-such-model"], "tests/no-such-model: no such folder"),
        (["--client", "7"], "--client 7: this model has clients [0, 1]"),
        (["--client", "two"], "--client must be a client id"),
        (["--out", "grid.xyz"], "unknown image extension '.xyz'"),
    ],
)
def test_sample_bad_arguments(tiny_model, tmp_path, capsys, argv, message):
    base = ["sample", "--model", str(tiny_model), "--out", str(tmp_path / "g.png")]
    assert main(base + argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.e2e
def test_sampling_defaults_to_the_guidance_the_model_records(tiny_model, tmp_path, monkeypatch):
    """A trained model records the guidance it was made for; `sample` uses it unless told."""
    import json

    import latentfuse.pipelines as pipelines

    assert json.loads((tiny_model / "collafuse.json").read_text())["guidance_scale"] == 3.0
    seen = []
    original = pipelines.CollaFusePipeline.__call__

    def spy(self, *args, **kwargs):
        seen.append(kwargs["guidance_scale"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pipelines.CollaFusePipeline, "__call__", spy)
    out = str(tmp_path / "g.png")
    base = ["sample", "--model", str(tiny_model), "--client", "0", "--num-images", "1"]
    base += ["--num-inference-steps", "2", "--out", out]
    assert main(base) == 0 and main([*base, "--guidance-scale", "1.5"]) == 0
    assert seen == [3.0, 1.5]


@pytest.mark.e2e
@pytest.mark.parametrize("command", ["sample", "evaluate", "reconstruct", "train"])
def test_every_help_shows_defaults_and_an_example(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    assert "Example: latentfuse " + command in text
    assert "(default: " in text
    assert "(default: None)" not in text  # nothing said twice, nothing empty
    undocumented = re.findall(r"^  (--[a-z-]+(?: [A-Z_{},]+)?)\s*$\n(?!\s{20,})", text, re.M)
    assert not undocumented, f"options without help: {undocumented}"
