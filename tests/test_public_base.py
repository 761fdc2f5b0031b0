"""The shipped public bases saw no image a benchmark client holds or holds out: they were
trained on the CIFAR-10 test split, the clients draw from the train split, and no image of
the one is byte-identical to an image of the other."""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path

import pytest

from latentfuse.paths import CIFAR10_ARCHIVE

ROOT = Path(__file__).resolve().parents[1]
BASES = ("cifar10-public-base", "cifar10-public-base-classes0-4")
BENCHMARKS = (
    "collaboration-cifar10-cpu.toml",
    "frontier-cifar10-cpu.toml",
    "pretrained-cifar10-cpu.toml",
    "sweep-cifar10-cpu.toml",
)

pytestmark = pytest.mark.skipif(
    not CIFAR10_ARCHIVE.exists(), reason=f"the CIFAR-10 archive is not at {CIFAR10_ARCHIVE}"
)


def hashes(split: str, classes: set[str] | None = None) -> set[str]:
    from latentfuse.data.datasets import load_cifar10

    data = load_cifar10(split)
    return {
        hashlib.sha256(r.path.read_bytes()).hexdigest()
        for r in data.records
        if classes is None or data.class_names[r.label] in classes
    }


@pytest.mark.parametrize("name", BASES)
def test_a_public_base_saw_only_test_images_none_of_which_a_client_holds(name):
    record = json.loads((ROOT / "checkpoints" / name / "base.json").read_text())
    assert record["trained_on"]["split"] == "test"
    seen = hashes("test", set(record["class_names"]))
    assert len(seen) == record["trained_on"]["images"]
    assert not seen & hashes("train")  # every train image, held out ones included


@pytest.mark.parametrize("config", BENCHMARKS)
def test_the_benchmark_clients_draw_from_the_train_split(config):
    data = tomllib.loads((ROOT / "configs" / config).read_text())["data"]
    assert (data["source"], data.get("subfolder", "train")) == ("cifar10", "train")
