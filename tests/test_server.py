"""The server: accepting releases, the release store, and batches for the shared denoiser."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load, save

from latentfuse.method.client import Client
from latentfuse.method.server import ReleaseStore, Server
from latentfuse.method.split import DiffusionSplit
from latentfuse.method.transport import InProcessTransport, ReleaseBatch

T = 1000
LATENT_SHAPE = (4, 4, 4)
NUM_CLASSES = 3
NULL_LABEL = NUM_CLASSES


def make_split(t_cut: int) -> DiffusionSplit:
    """The DDPM linear schedule (betas 1e-4 .. 0.02 over T steps) cut at `t_cut`."""
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    return DiffusionSplit(torch.cumprod(1 - betas, 0), t_cut)


def make_client(client_id: int, t_cut: int, num_images: int = 10, **kwargs) -> Client:
    """A tiny client with random latents and labels 0..NUM_CLASSES-1."""
    g = torch.Generator().manual_seed(100 + client_id)
    latents = torch.randn(num_images, *LATENT_SHAPE, generator=g)
    labels = torch.arange(num_images) % NUM_CLASSES
    kwargs.setdefault("release_key", bytes([client_id]) * 32)
    return Client(client_id, latents, labels, make_split(t_cut), **kwargs)


def federation(cuts: dict[int, int], sizes: dict[int, int] | None = None, **server_kwargs):
    """Clients with the given cuts, each having sent its release through the transport."""
    sizes = sizes or {}
    clients = {cid: make_client(cid, cut, sizes.get(cid, 10)) for cid, cut in cuts.items()}
    server = Server({cid: c.split for cid, c in clients.items()}, **server_kwargs)
    transport = InProcessTransport(keep_log=True)
    for client in clients.values():
        for message in client.due_releases():
            transport.send(message)
    for message in transport.receive():
        server.receive(message)
    return clients, server


def release(client_id: int, image_ids: tuple[int, ...], value: float, handoff_t: int = 100):
    """A release whose image i holds the constant `value + i`, labelled i."""
    ids = torch.tensor(image_ids, dtype=torch.float32).view(-1, 1, 1, 1)
    latents = (value + ids).expand(-1, *LATENT_SHAPE).clone()
    return ReleaseBatch(client_id, image_ids, latents, torch.tensor(image_ids), handoff_t, epoch=0)


def test_receive_from_unknown_client_is_rejected():
    """A client the server was not configured with cannot send."""
    _, server = federation({0: 100})
    with pytest.raises(ValueError, match="unknown client id 7"):
        server.receive(release(7, (0, 1), 0.0))


def test_receive_at_wrong_cut_is_rejected():
    """A release at another cut would be noised with the wrong a and lam_s."""
    _, server = federation({0: 100})
    with pytest.raises(ValueError, match="t_cut=50"):
        server.receive(release(0, (0, 1), 0.0, handoff_t=50))


def test_store_replaces_repeated_images():
    """A resent image replaces its earlier release: the count stays, the value is the new one."""
    store = ReleaseStore()
    store.add(release(0, (0, 1, 2, 3, 4), 0.0))
    store.add(release(0, (3, 1), 100.0))
    assert store.counts() == {0: 5} and len(store) == 5
    first_value = store.flat()["latents"].flatten(1)[:, 0]
    torch.testing.assert_close(first_value, torch.tensor([0.0, 101.0, 2.0, 103.0, 4.0]))
    assert torch.equal(store.flat()["labels"], torch.arange(5))


def test_store_grows_for_new_images_and_keeps_clients_apart():
    """New image ids extend a client's entry; the same id of another client is another image."""
    store = ReleaseStore()
    store.add(release(0, (0, 1), 0.0))
    store.add(release(0, (5,), 50.0))
    store.add(release(1, (0,), -10.0, handoff_t=20))
    assert store.counts() == {0: 3, 1: 1}
    flat = store.flat()
    torch.testing.assert_close(flat["latents"].flatten(1)[:, 0], torch.tensor([0, 1, 55, -10.0]))
    assert torch.equal(flat["client_ids"], torch.tensor([0, 0, 0, 1]))
    assert torch.equal(flat["handoff_t"], torch.tensor([100, 100, 100, 20]))


def test_store_round_trips_through_safetensors():
    """state_tensors -> safetensors bytes -> load_tensors gives back the same store."""
    store = ReleaseStore()
    store.add(release(0, (0, 2, 3), 0.0))
    store.add(release(4, (1,), 7.0, handoff_t=20))
    unlabeled = release(1, (0, 1), 3.0, handoff_t=0)
    store.add(ReleaseBatch(1, (0, 1), unlabeled.latents, None, 0, epoch=0))
    restored = ReleaseStore()
    restored.load_tensors(load(save(store.state_tensors())))
    assert restored.counts() == store.counts()
    flat, expected = restored.flat(), store.flat()
    assert set(flat) == set(expected)
    assert all(torch.equal(flat[key], expected[key]) for key in expected)
    restored.add(release(0, (2,), 9.0))  # a restored store still accepts releases
    assert restored.counts() == store.counts()


def test_draw_batch_needs_releases():
    """Nothing to train on before any client has released."""
    server = Server({0: make_split(100)})
    with pytest.raises(RuntimeError, match="no releases"):
        server.draw_batch(4, label_dropout=0.0, null_label=NULL_LABEL)


CUTS = {0: 0, 1: 100, 2: 900}


def test_server_timesteps_respect_each_clients_cut():
    """Every sample's s is at or above its own client's cut, and every client is drawn."""
    _, server = federation(CUTS, label_mode="client")
    batch = server.draw_batch(3_000, label_dropout=0.0, null_label=-1)
    cut = torch.tensor([CUTS[cid] for cid in batch["class_labels"].tolist()])
    assert torch.all(batch["timestep"] >= cut) and torch.all(batch["timestep"] < T)
    assert set(batch["class_labels"].tolist()) == set(CUTS)
    assert batch["timestep"][cut == 0].min() < 100  # the GM client reaches below the others


@pytest.mark.parametrize("objective", ["exact", "original"])
def test_each_sample_is_noised_at_its_own_clients_cut(objective):
    """z_s = sqrt(a) z_r + sqrt(1-a) eps_s and target = lam_s eps_s with a and lam_s of the
    sample's own client (one image per client, so z_r is known from the client id)."""
    clients, server = federation(
        CUTS,
        sizes=dict.fromkeys(CUTS, 1),
        objective=objective,
        weighting="inverse_lambda2",
        label_mode="client",
    )
    batch = server.draw_batch(300, label_dropout=0.0, null_label=-1)
    client_ids, s = batch["class_labels"], batch["timestep"]
    z_r = torch.stack([clients[cid].make_release(0).latents[0] for cid in client_ids.tolist()])
    abar_s = make_split(0).alphas_cumprod[s]
    abar_r = torch.tensor([clients[cid].split.abar_release for cid in client_ids.tolist()])
    a = abar_s / abar_r if objective == "exact" else abar_s
    lam = ((1 - abar_s) / (1 - a)).sqrt() if objective == "exact" else torch.ones_like(a)
    # The weight is one per timestep: the largest lam_s of the clients whose range holds s.
    common = lam.clone()
    if objective == "exact":
        for client in clients.values():
            split = client.split
            lam_c = ((1 - abar_s) / (1 - abar_s / split.abar_release)).sqrt()
            common = torch.where(s >= split.handoff_t, torch.maximum(common, lam_c), common)
    torch.testing.assert_close(batch["weight"], (1 / common**2).float())
    eps_s = batch["target"].double() / lam.view(-1, 1, 1, 1)
    expected = a.sqrt().view(-1, 1, 1, 1) * z_r.double() + (1 - a).sqrt().view(-1, 1, 1, 1) * eps_s
    torch.testing.assert_close(batch["sample"].double(), expected, atol=1e-5, rtol=1e-5)


def test_draws_are_uniform_over_held_releases():
    """A client holding three times the images supplies about three quarters of the samples."""
    _, server = federation({0: 100, 1: 100}, sizes={0: 10, 1: 30}, label_mode="client")
    n = 20_000
    share = server.draw_batch(n, label_dropout=0.0, null_label=-1)["class_labels"].double().mean()
    assert abs(share.item() - 0.75) < 5 * (0.75 * 0.25 / n) ** 0.5


def draw_labels(label_mode: str) -> torch.Tensor | None:
    """Labels of a batch from client 3 (one image, class 0) and client 5 (one image, class 1)."""
    server = Server({3: make_split(100), 5: make_split(100)}, label_mode=label_mode)
    server.receive(release(3, (0,), 0.0))
    server.receive(release(5, (1,), 0.0))
    return server.draw_batch(200, label_dropout=0.0, null_label=NULL_LABEL)["class_labels"]


def test_label_modes():
    """class: the released class labels; client: the sender's id; none: no labels at all.

    All three servers share a seed, so they draw the same rows and the labels line up."""
    client_ids, class_labels = draw_labels("client"), draw_labels("class")
    assert set(client_ids.tolist()) == {3, 5}
    assert torch.equal(class_labels, (client_ids == 5).long())
    assert draw_labels("none") is None


def test_class_labels_need_clients_that_share_them():
    """label_mode 'class' cannot train on releases sent without labels."""
    client = make_client(0, 100, share_labels=False)
    server = Server({0: client.split}, label_mode="class")
    server.receive(client.make_release(0))
    with pytest.raises(RuntimeError, match="no labels"):
        server.draw_batch(4, label_dropout=0.0, null_label=NULL_LABEL)


@pytest.mark.parametrize("label_mode", ["class", "client"])
@pytest.mark.parametrize("label_dropout", [0.1, 0.5])
def test_label_dropout_rate(label_mode, label_dropout):
    """About `label_dropout` of the labels become the null label."""
    _, server = federation({0: 100, 1: 100}, label_mode=label_mode)
    n = 20_000
    labels = server.draw_batch(n, label_dropout=label_dropout, null_label=-5)["class_labels"]
    tolerance = 5 * (label_dropout * (1 - label_dropout) / n) ** 0.5
    assert abs((labels == -5).double().mean().item() - label_dropout) < tolerance


def test_draw_batch_is_deterministic_for_a_seed():
    """Same seed and releases, same batches; another seed, other batches."""
    draws = [
        federation(CUTS, seed=seed)[1].draw_batch(16, label_dropout=0.2, null_label=NULL_LABEL)
        for seed in (0, 0, 1)
    ]
    assert all(torch.equal(draws[0][key], draws[1][key]) for key in draws[0])
    assert not torch.equal(draws[0]["target"], draws[2]["target"])


def test_weighting_is_one_per_timestep_so_it_does_not_reweight_clients():
    """With per-client cuts, rows of different clients at the same s get the same weight (a
    weight that differed would tilt the server's fit towards one client's data); with one cut
    for every client each row keeps its own lam's weight."""
    _, server = federation({0: 100, 1: 500}, weighting="inverse_lambda", label_mode="client")
    batch = server.draw_batch(4_000, label_dropout=0.0, null_label=-1)
    s, cid, w = batch["timestep"], batch["class_labels"], batch["weight"]
    shared = 0
    for t in s[(s >= 500)].unique().tolist():
        rows = s == t
        if len(set(cid[rows].tolist())) == 2:
            shared += 1
            assert torch.allclose(w[rows], w[rows][0].expand(int(rows.sum())))
    assert shared > 100  # timesteps that both clients' rows reached
    _, same = federation({0: 100, 1: 100}, weighting="inverse_lambda", label_mode="client")
    batch = same.draw_batch(500, label_dropout=0.0, null_label=-1)
    abar_s = make_split(0).alphas_cumprod[batch["timestep"]]
    abar_r = make_split(100).abar_release
    lam = ((1 - abar_s) / (1 - abar_s / abar_r)).sqrt()
    torch.testing.assert_close(batch["weight"], (1 / lam).float())
