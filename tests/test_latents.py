"""The latent cache: encode once, reuse while autoencoder, data and partition match, never stale."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import write_image

import latentfuse.data.latents
from latentfuse.data.autoencoder import Autoencoder, load_vae, vae_fingerprint
from latentfuse.data.datasets import ImageDataset, load_image_folder
from latentfuse.data.latents import cached_latents, encode_images

INDICES = (0, 3, 7, 12, 23)


class EncodeSpy:
    """Stands in for `encode_images`: counts the calls, or raises to prove the cache was read."""

    def __init__(self, fail: bool = False) -> None:
        self.calls = 0
        self.fail = fail

    def __call__(self, *args: object, **kwargs: object) -> torch.Tensor:
        self.calls += 1
        if self.fail:
            raise AssertionError("encode_images called although the cache should have been read")
        return encode_images(*args, **kwargs)


@pytest.fixture
def vae(tiny_vae_dir: Path) -> Autoencoder:
    return load_vae(tiny_vae_dir)


@pytest.fixture
def dataset(image_folder: Path) -> ImageDataset:
    return load_image_folder(image_folder)


def _spy(monkeypatch: pytest.MonkeyPatch, fail: bool = False) -> EncodeSpy:
    spy = EncodeSpy(fail)
    monkeypatch.setattr(latentfuse.data.latents, "encode_images", spy)
    return spy


def test_first_call_encodes_and_writes_the_cache(
    vae: Autoencoder, dataset: ImageDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "latents" / "client-0"
    spy = _spy(monkeypatch)
    result = cached_latents(vae, dataset, list(INDICES), cache)
    assert spy.calls == 1
    assert sorted(p.name for p in cache.iterdir()) == ["latents.safetensors", "manifest.json"]
    assert result.indices == INDICES
    assert len(result) == len(INDICES)
    assert result.latents.shape == (len(INDICES), 4, 16, 16)
    assert result.labels.tolist() == [dataset.records[i].label for i in INDICES]
    torch.testing.assert_close(result.latents, encode_images(vae, dataset, INDICES, 32))
    assert [p.name for p in cache.parent.iterdir()] == ["client-0"]  # no temporary folder left


def test_manifest_records_the_vae_and_the_indices(
    vae: Autoencoder, dataset: ImageDataset, tmp_path: Path
) -> None:
    cached_latents(vae, dataset, INDICES, tmp_path / "cache")
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["vae_sha256"] == vae_fingerprint(vae)
    assert manifest["indices"] == list(INDICES)
    assert manifest["num_images"] == len(INDICES)


def test_second_call_reads_the_cache(
    vae: Autoencoder, dataset: ImageDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = cached_latents(vae, dataset, INDICES, tmp_path / "cache")
    _spy(monkeypatch, fail=True)
    second = cached_latents(vae, dataset, INDICES, tmp_path / "cache")
    assert torch.equal(second.latents, first.latents)
    assert torch.equal(second.labels, first.labels)
    assert second.indices == first.indices


def _perturb_vae(vae: Autoencoder, dataset: ImageDataset, root: Path) -> tuple:
    with torch.no_grad():
        vae.encoder.conv_in.weight.mul_(1.5)
    return vae, dataset, INDICES


def _change_partition(vae: Autoencoder, dataset: ImageDataset, root: Path) -> tuple:
    return vae, dataset, INDICES[:-1] + (INDICES[-1] - 1,)


def _change_dataset(vae: Autoencoder, dataset: ImageDataset, root: Path) -> tuple:
    # A new class sorted last: the indexed images and their labels stay, the data set does not.
    write_image(root / "zebra" / "0000.jpg", (1, 2, 3))
    changed = load_image_folder(root)
    assert [changed.records[i] for i in INDICES] == [dataset.records[i] for i in INDICES]
    return vae, changed, INDICES


@pytest.mark.parametrize("change", [_perturb_vae, _change_partition, _change_dataset])
def test_cache_is_reencoded_when_its_inputs_change(
    change,
    vae: Autoencoder,
    dataset: ImageDataset,
    image_folder: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cache = tmp_path / "cache"
    cached_latents(vae, dataset, INDICES, cache)
    old_manifest = json.loads((cache / "manifest.json").read_text())
    vae, dataset, indices = change(vae, dataset, image_folder)
    spy = _spy(monkeypatch)
    result = cached_latents(vae, dataset, indices, cache)
    assert spy.calls == 1
    torch.testing.assert_close(result.latents, encode_images(vae, dataset, indices, 32))
    new_manifest = json.loads((cache / "manifest.json").read_text())
    assert new_manifest != old_manifest
    assert new_manifest["vae_sha256"] == vae_fingerprint(vae)
    assert new_manifest["indices"] == list(indices)
    # The rewritten cache is the one read next time.
    _spy(monkeypatch, fail=True)
    assert torch.equal(cached_latents(vae, dataset, indices, cache).latents, result.latents)


@pytest.mark.parametrize("indices", [(), []])
def test_empty_indices_are_rejected(
    indices, vae: Autoencoder, dataset: ImageDataset, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="no images"):
        cached_latents(vae, dataset, indices, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("stale_cache", [False, True])
def test_failed_write_leaves_no_half_written_cache(
    stale_cache: bool,
    vae: Autoencoder,
    dataset: ImageDataset,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cache = tmp_path / "latents" / "client-0"
    if stale_cache:
        cached_latents(vae, dataset, INDICES[:2], cache)
    before = {p.name: p.read_bytes() for p in cache.iterdir()} if stale_cache else None

    def broken_save_file(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(latentfuse.data.latents, "save_file", broken_save_file)
    with pytest.raises(OSError, match="disk full"):
        cached_latents(vae, dataset, INDICES, cache)
    if stale_cache:
        # The previous cache is untouched (and, being stale, will not be served).
        assert {p.name: p.read_bytes() for p in cache.iterdir()} == before
        assert [p.name for p in cache.parent.iterdir()] == ["client-0"]
    else:
        assert not cache.exists()
        assert list(cache.parent.iterdir()) == []
