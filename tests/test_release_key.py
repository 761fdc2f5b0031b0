"""The release key: CSPRNG-made, owner-only on disk, and the keyed noise it derives."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from scipy import stats

from latentfuse.release_key import (
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
    whole = release_noise(KEY, 0, range(10), 0, SHAPE)
    some = release_noise(KEY, 0, [7, 2], 0, SHAPE)
    torch.testing.assert_close(some, whole[[7, 2]], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("client_id", "epoch", "key"), [(1, 0, KEY), (0, 1, KEY), (0, 0, bytes(KEY_BYTES))]
)
def test_noise_changes_with_client_epoch_and_key(client_id, epoch, key):
    base = release_noise(KEY, 0, range(4), 0, SHAPE)
    other = release_noise(key, client_id, range(4), epoch, SHAPE)
    assert (base - other).flatten(1).abs().amax(1).min() > 0.1


def test_noise_is_standard_normal_and_uncorrelated():
    noise = release_noise(KEY, 0, range(64), 0, SHAPE).flatten()  # 16,384 values
    assert stats.kstest(noise.numpy(), "norm").pvalue > 1e-3
    assert abs(float(noise.mean())) < 0.05 and abs(float(noise.std()) - 1) < 0.05
    lag = torch.corrcoef(torch.stack([noise[:-1], noise[1:]]))[0, 1]
    assert abs(float(lag)) < 0.05  # Box-Muller pairs are independent
