"""A non-editable install runs `latentfuse train` and `sample` with no source checkout beside it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.subprocess
def test_a_wheel_install_trains_and_samples_from_its_own_shipped_files(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "wheel", "setuptools"], check=True)
    subprocess.run([*pip, "--no-deps", "--no-build-isolation", str(ROOT)], check=True)
    work = tmp_path / "elsewhere"  # no checkout, no ../shared beside it
    work.mkdir()
    env = {**os.environ, "LATENTFUSE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "2"}
    env.pop("PYTHONPATH", None)
    python = str(venv / "bin" / "python")

    def run(*args: str) -> str:
        done = subprocess.run(
            args, cwd=work, env=env, capture_output=True, text=True, check=False, timeout=600
        )
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        return done.stdout

    where = run(
        python,
        "-c",
        "import latentfuse, latentfuse.paths as p; "
        "print(latentfuse.__file__); print(p.DEFAULT_VAE_DIR)",
    )
    package, vae = where.split()
    assert package.startswith(str(venv)) and vae.startswith(str(venv))
    run(
        python,
        "-c",
        "from latentfuse.testing.shapes import make_shapes; "
        "make_shapes('shapes', classes=3, per_class=12, size=32)",
    )
    tiny = ["server_unet.block_out_channels=[32]", "client_unet.block_out_channels=[32]"]
    latentfuse = str(venv / "bin" / "latentfuse")
    run(
        latentfuse,
        "train",
        "--data",
        "shapes",
        "--output-dir",
        "out",
        "--max-steps",
        "2",
        "--fit-vae",
        "never",
        *tiny,
        "train.num_preview_images=1",
        "train.preview_inference_steps=2",
    )
    run(
        latentfuse,
        "sample",
        "--model",
        "out/model",
        "--client",
        "all",
        "--num-images",
        "2",
        "--num-inference-steps",
        "4",
        "--out",
        "grid.png",
    )
    assert (work / "grid.png").stat().st_size > 0
