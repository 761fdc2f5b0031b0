"""A client: what it releases (z_r only; once or fresh), its local batches, its resumable state."""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
import torch

from latentfuse.method.client import Client, EpochSampler
from latentfuse.method.release_key import KEY_BYTES
from latentfuse.method.split import DiffusionSplit
from latentfuse.method.transport import InProcessTransport, ReleaseBatch

T = 1000
NUM_IMAGES = 10
LATENT_SHAPE = (4, 4, 4)
NUM_CLASSES = 3
NULL_LABEL = NUM_CLASSES
RELEASE_FIELDS = {
    "client_id",
    "image_ids",
    "latents",
    "labels",
    "handoff_t",
    "epoch",
    "schema_version",
}


def make_split(t_cut: int) -> DiffusionSplit:
    """The DDPM linear schedule (betas 1e-4 .. 0.02 over T steps) cut at `t_cut`."""
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    return DiffusionSplit(torch.cumprod(1 - betas, 0), t_cut)


def make_latents(seed: int = 0) -> torch.Tensor:
    """Ten random latents (n, c, h, w)."""
    return torch.randn(NUM_IMAGES, *LATENT_SHAPE, generator=torch.Generator().manual_seed(seed))


def make_labels() -> torch.Tensor:
    """Class labels (n,)."""
    return torch.arange(NUM_IMAGES) % NUM_CLASSES


def fixed_key(n: int = 0) -> bytes:
    """A fixed 256-bit release key (tests only: real keys come from the CSPRNG)."""
    return bytes([n]) * KEY_BYTES


def make_client(t_cut: int = 100, latents: torch.Tensor | None = None, **kwargs) -> Client:
    """A tiny client over `latents` (default: `make_latents()`), key `fixed_key(0)` by default."""
    latents = make_latents() if latents is None else latents
    kwargs.setdefault("release_key", fixed_key(0))
    return Client(0, latents, make_labels(), make_split(t_cut), **kwargs)


def rows_differ(a: torch.Tensor, b: torch.Tensor, margin: float = 1e-3) -> bool:
    """Whether every image (row) of `a` differs from the same row of `b` by more than `margin`."""
    return bool(torch.all((a - b).flatten(1).abs().amax(1) > margin))


def send_due(client: Client, transport: InProcessTransport) -> None:
    """What the training loop does after each client step: send any due release."""
    for message in client.due_releases():
        transport.send(message)


@pytest.mark.parametrize("t_cut", [1, 20, 100, 500, T - 1])
def test_transport_log_holds_only_the_release(t_cut):
    """What crosses is z_r = release(z0, eps_c): neither z0 nor eps_c, image by image."""
    z0 = make_latents()
    client, transport = make_client(t_cut, z0), InProcessTransport(keep_log=True)
    send_due(client, transport)
    assert len(transport.log) == 1
    sent = transport.log[0].latents
    eps_c = client.release_noise(0)
    torch.testing.assert_close(sent, client.split.release(z0, eps_c))
    assert rows_differ(sent, z0)
    assert rows_differ(sent, eps_c)


@pytest.mark.parametrize("t_cut", [1, 500, T - 1])
@pytest.mark.parametrize("release_policy", ["once", "fresh"])
def test_no_release_field_holds_z0_or_eps_c(t_cut, release_policy):
    """The message has only the expected fields, and none of its tensors is z0 or eps_c."""
    z0 = make_latents()
    client = make_client(t_cut, z0, release_policy=release_policy)
    batch = client.make_release(epoch=2)
    secrets = {"z0": z0, "eps_c": client.release_noise(2)}
    assert {f.name for f in dataclasses.fields(ReleaseBatch)} == RELEASE_FIELDS
    tensors = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    tensors = {name: v for name, v in tensors.items() if isinstance(v, torch.Tensor)}
    assert set(tensors) == {"latents", "labels"}
    assert tensors["labels"].shape == (NUM_IMAGES,)
    assert all(rows_differ(tensors["latents"], secret) for secret in secrets.values())


def test_global_model_release_is_the_clean_latent():
    """t_cut = 0 (GM) releases z0 itself: documented, no privacy, and nothing local to train."""
    z0 = make_latents()
    client = make_client(0, z0)
    assert not client.trains_locally
    assert torch.equal(client.make_release(0).latents, z0)


def test_independent_client_releases_nothing():
    """t_cut = T (ICM): nothing is ever due."""
    client = make_client(T)
    assert client.trains_locally
    assert client.due_releases() == []
    with pytest.raises(ValueError, match="releases nothing"):
        client.make_release(0)


def test_once_release_is_identical_across_epochs():
    """Under `once` every epoch's release is the same z_r (no averaging of noisy copies)."""
    client = make_client(100, release_policy="once")
    first, later = client.make_release(0), client.make_release(3)
    assert torch.equal(first.latents, later.latents)
    assert (first.epoch, later.epoch) == (0, 3)


def test_fresh_release_changes_every_epoch():
    """Under `fresh` each epoch draws new noise for every image, reproducibly per epoch."""
    client = make_client(100, release_policy="fresh")
    assert rows_differ(client.make_release(0).latents, client.make_release(1).latents)
    assert torch.equal(client.make_release(1).latents, client.make_release(1).latents)


def test_release_noise_depends_on_the_key_not_the_public_seed():
    """eps_c changes with the key (and the client id), never with the public seed; a client
    rebuilt with the same key draws it again."""
    z0 = make_latents()
    noise = make_client(100, z0).release_noise(0)
    other_id = Client(1, z0, make_labels(), make_split(100), release_key=fixed_key(0))
    other_key = make_client(100, z0, release_key=fixed_key(1)).release_noise(0)
    assert rows_differ(noise, other_id.release_noise(0)) and rows_differ(noise, other_key)
    assert torch.equal(noise, make_client(100, z0, seed=1).release_noise(0))
    assert torch.equal(noise, make_client(100, z0).release_noise(0))


@pytest.mark.parametrize("key", [b"", b"short", "00" * 32, None])
def test_client_refuses_a_weak_or_missing_key(key):
    """A key under 256 bits (or not bytes) is refused, naming the argument."""
    with pytest.raises(ValueError, match="release_key"):
        make_client(100, release_key=key)


def run_epochs(client: Client, transport: InProcessTransport, batch_size: int, steps: int) -> None:
    """Alternate local steps and sends, as the training loop does."""
    send_due(client, transport)
    for _ in range(steps):
        client.draw_batch(batch_size, label_dropout=0.0, null_label=NULL_LABEL)
        send_due(client, transport)


@pytest.mark.parametrize("batch_size", [3, 4, NUM_IMAGES])
def test_once_sends_each_image_exactly_once(batch_size):
    """Under `once`, several epochs of training send every image once and only once."""
    client, transport = make_client(100, release_policy="once"), InProcessTransport(keep_log=True)
    run_epochs(client, transport, batch_size, steps=4 * NUM_IMAGES // batch_size)
    assert client.sampler.epoch >= 3
    sent = Counter(i for message in transport.log for i in message.image_ids)
    assert sent == Counter(range(NUM_IMAGES))


@pytest.mark.parametrize("batch_size", [3, 4, NUM_IMAGES])
def test_fresh_sends_a_new_release_each_epoch(batch_size):
    """Under `fresh`, one release per epoch reached, each image in each, each new."""
    client, transport = make_client(100, release_policy="fresh"), InProcessTransport(keep_log=True)
    run_epochs(client, transport, batch_size, steps=4 * NUM_IMAGES // batch_size)
    epochs = [message.epoch for message in transport.log]
    assert epochs == list(range(client.sampler.epoch + 1))
    assert len(epochs) >= 4
    assert all(message.image_ids == tuple(range(NUM_IMAGES)) for message in transport.log)
    latents = [message.latents for message in transport.log]
    assert all(rows_differ(a, b) for a, b in zip(latents[:-1], latents[1:], strict=True))


@pytest.mark.parametrize("share_labels", [True, False])
def test_label_sharing(share_labels):
    """Labels cross only when the client shares them."""
    batch = make_client(100, share_labels=share_labels).make_release(0)
    if share_labels:
        assert torch.equal(batch.labels, make_labels())
    else:
        assert batch.labels is None


def test_unknown_release_policy_is_rejected():
    """Only `once` and `fresh` exist."""
    with pytest.raises(ValueError, match="release_policy"):
        make_client(100, release_policy="sometimes")


def indexed_client(t_cut: int, seed: int = 0) -> Client:
    """A client whose image i is the constant latent i + 1, so a noised sample reveals its index."""
    latents = (torch.arange(NUM_IMAGES, dtype=torch.float32) + 1).view(-1, 1, 1, 1)
    return make_client(t_cut, latents.expand(-1, *LATENT_SHAPE).clone(), seed=seed)


def recover_images(client: Client, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The image index behind each sample: z0 = (z_t - sqrt(1 - abar) eps) / sqrt(abar)."""
    abar = client.split.alphas_cumprod[batch["timestep"]].view(-1, 1, 1, 1)
    z0 = (batch["sample"].double() - (1 - abar).sqrt() * batch["target"].double()) / abar.sqrt()
    index = z0.flatten(1).mean(1).round().long() - 1
    torch.testing.assert_close(
        z0, (index + 1).double().view(-1, 1, 1, 1).expand_as(z0), atol=0.02, rtol=0
    )
    return index


@pytest.mark.parametrize("t_cut", [1, 100, 500, T - 1])
def test_local_batch_is_forward_process_below_cut(t_cut):
    """t < t_cut; sample = sqrt(abar_t) z0 + sqrt(1 - abar_t) target; one epoch = each image."""
    client = indexed_client(t_cut)
    batch = client.draw_batch(NUM_IMAGES, label_dropout=0.0, null_label=NULL_LABEL)
    assert torch.all(batch["timestep"] >= 0) and torch.all(batch["timestep"] < t_cut)
    index = recover_images(client, batch)
    assert sorted(index.tolist()) == list(range(NUM_IMAGES))
    assert torch.equal(batch["class_labels"], make_labels()[index])
    assert torch.equal(batch["weight"], torch.ones(NUM_IMAGES))


def test_a_client_started_above_the_cut_trains_on_every_level_it_runs():
    """train_cut 190 over a cut of 100 (the compensated entry): t covers 0..189 and no more;
    the release stays at the cut."""
    client = make_client(100, train_cut=190)
    t = torch.cat([client.draw_batch(64, 0.0, NULL_LABEL)["timestep"] for _ in range(20)])
    assert int(t.max()) == 189 and int(t.min()) == 0 and bool((t >= 100).any())
    assert client.make_release(0).handoff_t == 100
    with pytest.raises(ValueError, match="train_cut"):
        make_client(100, train_cut=50)


def test_local_batch_is_deterministic_for_a_seed():
    """Same seed, same batches; another seed, other batches."""
    draws = [
        indexed_client(100, seed).draw_batch(6, label_dropout=0.5, null_label=NULL_LABEL)
        for seed in (0, 0, 1)
    ]
    assert all(torch.equal(draws[0][key], draws[1][key]) for key in draws[0])
    assert not torch.equal(draws[0]["target"], draws[2]["target"])


def test_global_model_client_has_no_local_batches():
    """t_cut = 0: the client owns no timestep."""
    with pytest.raises(ValueError, match="train_cut = 0"):
        make_client(0).draw_batch(2, label_dropout=0.0, null_label=NULL_LABEL)


@pytest.mark.parametrize("label_dropout", [0.1, 0.5])
def test_local_label_dropout_rate(label_dropout):
    """About `label_dropout` of the labels become the null label; the rest stay true."""
    client = indexed_client(100)
    n = 20_000
    batch = client.draw_batch(n, label_dropout=label_dropout, null_label=NULL_LABEL)
    dropped = batch["class_labels"] == NULL_LABEL
    tolerance = 5 * (label_dropout * (1 - label_dropout) / n) ** 0.5
    assert abs(dropped.double().mean().item() - label_dropout) < tolerance
    kept = ~dropped
    index = recover_images(client, batch)
    assert torch.equal(batch["class_labels"][kept], make_labels()[index[kept]])


@pytest.mark.parametrize("batch_size", [1, 3, 7, NUM_IMAGES, 25])
def test_epoch_sampler_visits_every_index_once_per_epoch(batch_size):
    """However the draws are sized, each block of n consecutive indices is a permutation."""
    sampler = EpochSampler(NUM_IMAGES, seed=5)
    draws = -(-3 * NUM_IMAGES // batch_size)
    order = torch.cat([sampler.take(batch_size) for _ in range(draws)])[: 3 * NUM_IMAGES]
    epochs = order.view(3, NUM_IMAGES)
    assert torch.equal(epochs.sort(1).values, torch.arange(NUM_IMAGES).expand(3, -1))
    assert len({tuple(epoch.tolist()) for epoch in epochs}) > 1  # reshuffled between epochs


@pytest.mark.parametrize(
    ("batch_size", "draws_before"),
    [(3, 0), (3, 2), (5, 2), (4, 7), (NUM_IMAGES, 3), (25, 1)],
    ids=["start", "mid_epoch", "epoch_boundary", "later_epoch", "whole_epochs", "multi_epoch"],
)
def test_epoch_sampler_resumes_exactly(batch_size, draws_before):
    """A sampler restored from (epoch, position) continues the uninterrupted sequence."""
    sampler = EpochSampler(NUM_IMAGES, seed=5)
    for _ in range(draws_before):
        sampler.take(batch_size)
    restored = EpochSampler(NUM_IMAGES, seed=5)
    restored.set_state(sampler.epoch, sampler.position)
    expected = torch.cat([sampler.take(batch_size) for _ in range(4)])
    assert torch.equal(torch.cat([restored.take(batch_size) for _ in range(4)]), expected)


def test_epoch_sampler_needs_an_image():
    """An empty client cannot train."""
    with pytest.raises(ValueError, match="at least one"):
        EpochSampler(0, seed=0)


@pytest.mark.parametrize("release_policy", ["once", "fresh"])
def test_client_state_round_trip(release_policy):
    """state()/load_state on a fresh client reproduces the next batch and the send bookkeeping."""
    client, transport = (
        make_client(100, release_policy=release_policy),
        InProcessTransport(keep_log=True),
    )
    run_epochs(client, transport, batch_size=4, steps=4)
    state, generator_state = client.state(), client.generator_state()
    restored = make_client(100, release_policy=release_policy)
    restored.load_state(state, generator_state)
    expected = client.draw_batch(4, label_dropout=0.3, null_label=NULL_LABEL)
    batch = restored.draw_batch(4, label_dropout=0.3, null_label=NULL_LABEL)
    assert set(batch) == set(expected)
    assert all(torch.equal(batch[key], expected[key]) for key in expected)
    assert [m.epoch for m in restored.due_releases()] == [m.epoch for m in client.due_releases()]


def test_clipped_release_is_the_release_of_the_clipped_latent():
    """With clip_norm set the release carries sqrt(abar_r) clip(z0): no latent's signal exceeds
    the norm the guarantee assumes."""
    from latentfuse.method.privacy import clip_latent_norm

    z0 = make_latents() * 10
    client = make_client(100, z0, clip_norm=2.0)
    expected = client.split.release(clip_latent_norm(z0, 2.0), client.release_noise(0))
    torch.testing.assert_close(client.make_release(0).latents, expected)


def test_max_releases_caps_fresh_releases():
    client, transport = (
        make_client(100, release_policy="fresh", max_releases=2),
        InProcessTransport(keep_log=True),
    )
    run_epochs(client, transport, batch_size=NUM_IMAGES, steps=6)  # six epochs
    assert [m.epoch for m in transport.log] == [0, 1]
