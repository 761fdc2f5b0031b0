"""The release key: CSPRNG-made, owner-only on disk, and the keyed noise it derives."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from scipy import stats

from latentfuse.method.release_key import (
    KEY_BYTES,
    client_key_path,
    load_or_create_release_key,
    load_release_key,
    new_release_key,
    release_noise,
)

SHAPE = (4, 8, 8)
KEY = bytes(range(KEY_BYTES))


def test_new_keys_are_256_bits_and_never_repeat():
    keys = {new_release_key() for _ in range(64)}
    assert len(keys) == 64
    assert all(len(k) == KEY_BYTES for k in keys)


def test_key_file_is_owner_only_and_reloads(tmp_path):
    path = client_key_path(tmp_path / "run", 3)
    key = load_or_create_release_key(path)
    assert path == tmp_path / "run" / "clients" / "client-3" / "release.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_release_key(path) == key == load_release_key(path)
    assert [p.name for p in path.parent.iterdir()] == ["release.key"]  # no temporary left
    assert load_or_create_release_key(tmp_path / "other.key") != key


def test_a_key_others_may_read_is_refused(tmp_path):
    path = tmp_path / "release.key"
    load_or_create_release_key(path)
    os.chmod(path, 0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        load_release_key(path)


@pytest.mark.parametrize("text", ["not hex", "00" * 16])
def test_a_malformed_key_file_is_refused(tmp_path, text):
    path = tmp_path / "release.key"
    path.write_text(text)
    os.chmod(path, 0o600)
    with pytest.raises(ValueError, match="release"):
        load_release_key(path)


def test_noise_of_an_image_does_not_depend_on_batching():
    whole = release_noise(KEY, 0, range(10), 0, SHAPE, 100)
    some = release_noise(KEY, 0, [7, 2], 0, SHAPE, 100)
    torch.testing.assert_close(some, whole[[7, 2]], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("client_id", "epoch", "key", "t_cut", "clip"),
    [
        (1, 0, KEY, 100, 0.0),
        (0, 1, KEY, 100, 0.0),
        (0, 0, bytes(KEY_BYTES), 100, 0.0),
        (0, 0, KEY, 101, 0.0),  # another cut: never the same eps_c (else z0 from two releases)
        (0, 0, KEY, 100, 30.0),  # clipping switched on
    ],
)
def test_noise_changes_with_client_epoch_key_and_release_settings(
    client_id, epoch, key, t_cut, clip
):
    base = release_noise(KEY, 0, range(4), 0, SHAPE, 100)
    other = release_noise(key, client_id, range(4), epoch, SHAPE, t_cut, clip)
    assert (base - other).flatten(1).abs().amax(1).min() > 0.1


def test_noise_is_standard_normal_and_independent():
    """Normal marginals; no correlation between neighbours, between Box-Muller partners (which
    sit half an image apart), between their squares, or across images, epochs and clients."""
    noise = release_noise(KEY, 0, range(64), 0, SHAPE, 100).flatten(1)  # (64, 256)
    flat = noise.flatten()
    assert stats.kstest(flat.numpy(), "norm").pvalue > 1e-3
    assert abs(float(flat.mean())) < 0.05 and abs(float(flat.std()) - 1) < 0.05
    half = noise.shape[1] // 2
    pairs = {
        "neighbours": (flat[:-1], flat[1:]),
        "partners": (noise[:, :half].flatten(), noise[:, half:].flatten()),
        "partner squares": (noise[:, :half].flatten() ** 2, noise[:, half:].flatten() ** 2),
        "images": (noise[:-1].flatten(), noise[1:].flatten()),
        "epochs": (flat, release_noise(KEY, 0, range(64), 1, SHAPE, 100).flatten()),
        "clients": (flat, release_noise(KEY, 1, range(64), 0, SHAPE, 100).flatten()),
    }
    for name, (a, b) in pairs.items():  # |r| < 5 / sqrt(n): about 5 standard errors
        r = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
        assert abs(r) < 5 / len(a) ** 0.5, name
