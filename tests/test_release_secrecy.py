"""An honest-but-curious server cannot undo a release: the attacker holds everything the
server holds (the run config, collafuse.json, every wire message, the server's checkpoint and
release store) and tries to regenerate eps_c; only the client's key makes it work."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pytest
import torch

from latentfuse.deploy.wire import encode_release
from latentfuse.method.release_key import client_key_path, load_release_key, release_noise
from latentfuse.training.engine import make_accelerator
from latentfuse.training.runner import export
from latentfuse.training.setup import build_run
from latentfuse.training.trainer import Trainer
from tests.worlds import tiny_config

SMALL_SEEDS = range(512)  # the brute force: every small run seed / key the server might guess
ATTACKED_IMAGES = 4


@pytest.fixture(autouse=True)
def isolated(tiny_world: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LATENTFUSE_CACHE", str(tiny_world["cache"]))


def legacy_image_seed(seed: int, client_id: int, image_id: int, epoch: int) -> int:
    """The derivation latentfuse used before (public inputs only): the attacker knows it."""
    mix = (seed * 1_000_003 + client_id) * 1_000_033 + image_id
    return (mix * 2_654_435_761 + epoch * 97_531) % (2**63 - 1)


def noise_guesses(
    client_id: int, image_id: int, epoch: int, shape: tuple, t_cut: int
) -> torch.Tensor:
    """Every eps_c the server can derive from public values: the legacy per-image seed and the
    keyed PRF under keys made from small seeds, each over a brute force of SMALL_SEEDS."""
    guesses = []
    for seed in SMALL_SEEDS:
        legacy = legacy_image_seed(seed, client_id, image_id, epoch)
        guesses.append(torch.randn(shape, generator=torch.Generator().manual_seed(legacy)))
        guesses.append(torch.randn(shape, generator=torch.Generator().manual_seed(seed)))
        for key in (seed.to_bytes(32, "big"), hashlib.sha256(str(seed).encode()).digest()):
            noise = release_noise(key, client_id, [image_id], epoch, shape, t_cut)
            guesses.append(noise[0].float())
    return torch.stack(guesses)


def invert(z_r: torch.Tensor, eps: torch.Tensor, abar_r: float) -> torch.Tensor:
    """z0 = (z_r - sqrt(1 - abar_r) eps) / sqrt(abar_r): exact when eps is the client's."""
    return (z_r.double() - math.sqrt(1 - abar_r) * eps.double()) / math.sqrt(abar_r)


def trained_run(world, run_dir: Path, *overrides: str):
    """A short in-process run in `run_dir`: (run, trainer) after checkpoint and export."""
    config = tiny_config(world, "train.max_steps=6", *overrides)
    run = build_run(config, run_dir)
    trainer = Trainer(run, make_accelerator(config.train), run_dir, keep_transport_log=True)
    for _ in range(config.train.max_steps):
        trainer.train_step()
    trainer.save_checkpoint()
    export(run, trainer, run_dir, {"steps": trainer.step})
    return run, trainer


def server_view(run_dir: Path, trainer: Trainer) -> list[bytes]:
    """What the server holds: every file of the run but the clients' own folders (config,
    checkpoint with the release store, the model folder and its collafuse.json, logs), and
    every message that crossed, as the HTTP transport encodes it."""
    files = [
        p.read_bytes()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and "clients" not in p.relative_to(run_dir).parts[:1]
    ]
    return files + [encode_release(m) for m in trainer.transport.log]


@pytest.mark.parametrize("policy", ["once", "fresh"])
@pytest.mark.parametrize("t_cut", [100, 900])
def test_server_cannot_regenerate_the_release_noise(tiny_world, tmp_path, policy, t_cut):
    run_dir = tmp_path / "run"
    run, trainer = trained_run(
        tiny_world, run_dir, f"split.t_cut={t_cut}", f'split.release_policy="{policy}"'
    )
    keys = {
        c.client_id: load_release_key(client_key_path(run_dir, c.client_id)) for c in run.clients
    }
    view = server_view(run_dir, trainer)
    for key in keys.values():  # the key is in nothing the server holds, in any spelling
        for spelling in (key, key.hex().encode(), key.hex().upper().encode()):
            assert not any(spelling in blob for blob in view)
    clients = {c.client_id: c for c in run.clients}
    assert trainer.transport.log, "the run must have released something to attack"
    for message in trainer.transport.log:
        client = clients[message.client_id]
        abar_r, shape = client.split.abar_release, tuple(message.latents.shape[1:])
        noise_level = math.sqrt((1 - abar_r) / abar_r)  # RMS of z0_hat - z0 per unit of eps error
        for row, image_id in enumerate(message.image_ids[:ATTACKED_IMAGES]):
            z_r, z0 = message.latents[row], client._z0[image_id].double()
            guesses = noise_guesses(message.client_id, image_id, message.epoch, shape, t_cut)
            # No guess is closer to the true eps_c than independent noise would be: |corr| of
            # 2,048 independent guesses with it stays below ~4.5 / sqrt(d); 6 / sqrt(d) fails
            # any guess that shares even a fifth of the noise.
            truth = (z_r.double() - math.sqrt(abar_r) * z0) / math.sqrt(1 - abar_r)
            centred = guesses.double().flatten(1) - guesses.double().flatten(1).mean(1, True)
            target = truth.flatten() - truth.mean()
            corr = (centred @ target) / (centred.norm(dim=1) * target.norm())
            assert float(corr.abs().max()) < 6 / math.sqrt(target.numel())
            # The same attack with the client's key inverts the release exactly.
            epoch = 0 if policy == "once" else message.epoch
            eps = release_noise(
                keys[message.client_id], message.client_id, [image_id], epoch, shape, t_cut
            )
            exact = (invert(z_r, eps[0].float(), abar_r) - z0).pow(2).mean().sqrt()
            assert float(exact) < 1e-4 * max(1.0, noise_level)


def test_identical_public_config_gives_different_releases_and_weights(tiny_world, tmp_path):
    """Two runs with the same config and seed, each with its own keys: nothing in common."""
    first, trainer_a = trained_run(tiny_world, tmp_path / "a")
    second, trainer_b = trained_run(tiny_world, tmp_path / "b")
    for a, b in zip(trainer_a.transport.log, trainer_b.transport.log, strict=True):
        assert (a.latents - b.latents).flatten(1).abs().amax(1).min() > 1e-3
    weights_a = first.server_unet.state_dict()
    weights_b = second.server_unet.state_dict()
    assert any(not torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    # ...while the same run folder (a resume) draws the same releases again.
    again = build_run(first.config, tmp_path / "a")
    for client, rebuilt in zip(first.clients, again.clients, strict=True):
        torch.testing.assert_close(client.make_release(0).latents, rebuilt.make_release(0).latents)
