"""Attribute- and text-conditioned models over the deployment's transports: HTTP holds and
samples exactly what the in-process run does, and HTTP and Flower train the same weights from
the same bytes and sample; malformed conditioning is refused with a 4xx."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest
import torch

from latentfuse.deploy.client.remote import RemoteServer, read_token
from latentfuse.deploy.client.remote_sample import finish_remote, make_request, sample_remote
from latentfuse.deploy.config import DeployConfig, sampling_scheduler
from latentfuse.deploy.server.app import BackgroundServer
from latentfuse.deploy.server.auth import TokenBook, issue_tokens
from latentfuse.deploy.server.service import ServerService
from latentfuse.deploy.wire import SampleRequest, WireError, encode_release, encode_sample_request
from latentfuse.method.server import Server
from latentfuse.method.transport import ReleaseBatch
from latentfuse.pipelines import CollaFuseClientPipeline, CollaFusePipeline
from latentfuse.testing.fixtures import CELEBA_ATTRIBUTES, make_celeba_fixture
from latentfuse.training.runner import collafuse_description
from latentfuse.training.setup import build_run
from tests.test_conditioning import celeba_config, text_overrides
from tests.test_conditioning import world as conditioning_world  # noqa: F401  (fixture)
from tests.test_http_app import FAST_RETRY

STEPS = 4
KINDS = ("attributes", "text")


@pytest.fixture(scope="module")
def world(conditioning_world):  # noqa: F811  (the imported fixture, renamed)
    return conditioning_world


def kind_overrides(world, kind: str) -> list[str]:
    return text_overrides(world) if kind == "text" else []


def deploy_of(run) -> DeployConfig:
    return DeployConfig(
        class_names=run.dataset.class_names,
        attribute_names=run.dataset.attribute_names,
        upload_chunk_size=8,
        max_sample_batch=4,
        sampling_processes=0,
    )


@pytest.fixture(scope="module", params=KINDS)
def served(request, world, tmp_path_factory):
    """The CelebA-format run of one kind built in-process, and a sampling-only server holding
    every client's releases, uploaded over HTTP."""
    kind = request.param
    root = tmp_path_factory.mktemp(f"served-{kind}")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LATENTFUSE_CACHE", str(world["cache"]))
        config = celeba_config(world, f'conditioning.kind="{kind}"', *kind_overrides(world, kind))
        run = build_run(config)
        ids = [c.client_id for c in run.clients]
        issued = issue_tokens(root / "clients.json", root / "tokens", ids, iterations=1000)
        tokens = {cid: read_token(path) for cid, path in issued.items()}
        service = ServerService(
            config, deploy_of(run), TokenBook.load(root / "clients.json"), root / "state", False
        )
        with BackgroundServer(service) as url:
            for client in run.clients:
                cid = client.client_id
                with RemoteServer(url, tokens[cid], cid, retry=FAST_RETRY) as connection:
                    connection.upload_release(client.make_release(0), chunk_size=8)
            yield {"kind": kind, "run": run, "service": service, "url": url, "tokens": tokens}


def test_the_store_holds_each_releases_conditioning_as_in_process(served):
    run, service = served["run"], served["service"]
    in_process = Server(run.server.splits, seed=0)
    for client in run.clients:
        in_process.receive(client.make_release(0))
    over_http = Server(service.splits, seed=0)
    for batch in service.database.read_since(0, service.database.max_seq()):
        over_http.receive(batch)
    expected, actual = in_process.store.state_tensors(), over_http.store.state_tensors()
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    rows = service.database.condition_shape()
    assert rows == ((len(CELEBA_ATTRIBUTES),) if served["kind"] == "attributes" else (32, 32))


def test_the_server_starts_from_the_in_process_weights(served):
    expected = served["run"].server_unet.state_dict()
    actual = served["service"].sampling_unet().state_dict()
    assert expected.keys() == actual.keys()
    for name, value in actual.items():
        assert torch.equal(value, expected[name]), name


def test_sampling_through_http_equals_the_in_process_pipeline(served):
    run, client_id = served["run"], 1
    description = collafuse_description(run)
    extra = {}
    if served["kind"] == "text":
        extra = {"tokenizer": run.text.tokenizer, "text_encoder": run.text.text_encoder}
    ddim = sampling_scheduler("ddim", run.scheduler.config)
    full = CollaFusePipeline(run.vae, ddim, run.server_unet, run.client_unets, description, **extra)
    half = CollaFuseClientPipeline(
        run.vae,
        sampling_scheduler("ddim", run.scheduler.config),
        run.client_unets[client_id],
        client_id,
        description,
    )
    for pipe in (full, half):
        pipe.set_progress_bar_config(disable=True)
    seeds = [21, 22, 23]
    expected = full(
        client_id=client_id,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        num_inference_steps=STEPS,
        guidance_scale=2.0,
        output_type="pt",
    ).images
    request = make_request(description, client_id, seeds, STEPS, 2.0, "ddim", run.text)
    named = request.attributes if served["kind"] == "attributes" else request.prompts
    assert named is not None and len(named) == len(seeds)  # what the server is told
    token = served["tokens"][client_id]
    with RemoteServer(served["url"], token, client_id, retry=FAST_RETRY) as connection:
        images = finish_remote(connection, half, request, text=run.text)
    torch.testing.assert_close(images, expected, rtol=1e-5, atol=1e-5)
    # the server conditions its steps on what the request names: other rows, other hand-off
    other = make_request(description, client_id, [31, 32, 33], STEPS, 2.0, "ddim", run.text)
    swapped = SampleRequest(
        client_id,
        request.seeds,
        request.class_labels,
        STEPS,
        2.0,
        attributes=other.attributes,
        prompts=other.prompts,
    )
    with RemoteServer(served["url"], token, client_id, retry=FAST_RETRY) as connection:
        first, _ = connection.request_handoff(request)
        second, _ = connection.request_handoff(swapped)
    assert not torch.allclose(first.latents, second.latents)


def post(served, path: str, body: bytes, method: str = "POST") -> httpx.Response:
    """Client 0's request to `path`."""
    headers = {"Authorization": f"Bearer {served['tokens'][0]}"}
    url = served["url"] + path
    return httpx.request(method, url, content=body, headers=headers, timeout=30)


def bad_release(served, case: str) -> bytes:
    client = served["run"].clients[0]
    whole = client.make_release(0)
    cut = whole.handoff_t
    good = ReleaseBatch(0, whole.image_ids[:4], whole.latents[:4], whole.labels[:4], cut, 0)
    rows = good.labels
    if case == "class labels":
        rows = torch.zeros(len(rows), dtype=torch.long)
    elif case == "wrong width":
        rows = rows[:, :-1]
    elif case == "not sign":
        rows = rows * 0.5
    elif case == "no conditioning":
        rows = None
    batch = ReleaseBatch(0, good.image_ids, good.latents, rows, good.handoff_t, good.epoch)
    return encode_release(batch)


@pytest.mark.parametrize("case", ["class labels", "wrong width", "not sign", "no conditioning"])
def test_malformed_conditioning_is_refused_and_changes_nothing(served, case):
    if served["kind"] == "text" and case == "not sign":
        pytest.skip("token states are any finite floats")
    service = served["service"]
    before = (service.database.max_seq(), service.database.counts())
    path = f"/v1/clients/0/releases/bad-{case.replace(' ', '-')}"
    response = post(served, path, bad_release(served, case), "PUT")
    assert response.status_code == 400, response.text
    assert "conditioning" in response.json()["detail"]
    assert (service.database.max_seq(), service.database.counts()) == before


def test_a_request_without_the_conditioning_the_model_needs_is_refused(served):
    run = served["run"]
    description = collafuse_description(run)
    request = make_request(description, 0, [1, 2], STEPS, 1.0, "ddim", run.text)
    bare = SampleRequest(0, request.seeds, request.class_labels, STEPS, 1.0)
    response = post(served, "/v1/clients/0/sample", encode_sample_request(bare))
    needed = "attributes" if served["kind"] == "attributes" else "prompts"
    assert response.status_code == 400 and needed in response.json()["detail"]
    if served["kind"] == "attributes":  # rows of the wrong width
        short = SampleRequest(
            0, request.seeds, request.class_labels, STEPS, 1.0, attributes=((1,), (0,))
        )
        response = post(served, "/v1/clients/0/sample", encode_sample_request(short))
        assert response.status_code == 400 and "40 values" in response.json()["detail"]


# ---- HTTP and Flower end to end --------------------------------------------------------------
def deploy_toml(world, kind: str, path: Path) -> Path:
    """A deployment of two CelebA-format clients conditioned on `kind`, tiny models."""
    width = "[16, 32]" if kind == "text" else "[32]"
    text = f'text_encoder = "{world["clip"]}"' if kind == "text" else ""
    path.write_text(
        f"""vae = "{world["vae"]}"
server_labels = "class"
[conditioning]
kind = "{kind}"
{text}
[data]
source = "{world["celeba"]}"
format = "celeba"
resolution = {32 if kind == "text" else 64}
num_clients = 2
[split]
t_cut = 100
[server_unet]
block_out_channels = {width}
attention = false
norm_num_groups = 8
[client_unet]
block_out_channels = {width}
[train]
server_batch_size = 8
client_batch_size = 4
max_steps = 100
warmup_steps = 2
checkpoint_every = 50
[deploy]
class_names = ["face"]
attribute_names = {json.dumps(list(CELEBA_ATTRIBUTES))}
upload_chunk_size = 8
sampling_processes = 0
"""
    )
    return path


@pytest.mark.e2e
@pytest.mark.parametrize("kind", KINDS)
def test_http_and_flower_train_the_same_weights_and_sample(world, kind, tmp_path, monkeypatch):
    from latentfuse.deploy.client.job import ClientJob
    from latentfuse.deploy.config import load_deploy_config
    from latentfuse.deploy.flower.server_app import run_server
    from latentfuse.deploy.server.store import ReleaseDatabase
    from latentfuse.deploy.server.trainer import ServerTrainer
    from latentfuse.method.release_key import KEY_FILE
    from tests.test_flower import ROUNDS, SERVER_STEPS, LoopbackGrid, run_config, train_rounds

    monkeypatch.setenv("LATENTFUSE_CACHE", str(world["cache"]))
    toml = deploy_toml(world, kind, tmp_path / "deploy.toml")
    data = {c: make_celeba_fixture(tmp_path / f"data-{c}", 16, 64, seed=c + 1) for c in (0, 1)}
    config, deploy = load_deploy_config(str(toml), [])
    issued = issue_tokens(tmp_path / "clients.json", tmp_path / "tokens", [0, 1], iterations=1000)
    tokens = TokenBook.load(tmp_path / "clients.json")
    service = ServerService(config, deploy, tokens, tmp_path / "http", trainer="none")
    trainer = ServerTrainer(config, deploy, tmp_path / "http")
    with BackgroundServer(service) as url:
        remotes = {c: RemoteServer(url, read_token(issued[c]), c, retry=FAST_RETRY) for c in data}
        jobs = {
            c: ClientJob(config, deploy, c, data[c], tmp_path / f"work-{c}", remotes[c])
            for c in data
        }
        train_rounds(jobs, trainer)
        trainer.publish()
        # each release reached the server with its image's conditioning
        held = service.database.read_since(0, service.database.max_seq())
        rows = {c: [] for c in data}
        for batch in held:
            rows[batch.client_id].append((batch.image_ids, batch.labels))
        for cid, job in jobs.items():
            stored = dict(
                (i, row) for ids, labels in rows[cid] for i, row in zip(ids, labels, strict=True)
            )
            own = job.client.labels
            assert len(stored) == len(own)
            assert all(torch.equal(stored[i], own[i]) for i in range(len(own)))
        # sampling over HTTP with the exported client halves
        for cid, job in jobs.items():
            folder = job.export()
            images = sample_remote(remotes[cid], folder, 2, num_inference_steps=STEPS)
            assert images.shape[0] == 2 and torch.isfinite(images).all()
        for remote in remotes.values():
            remote.close()
    # Flower: the same clients (their folders, so their secret keys) from scratch
    flower = tmp_path / "flower"
    nodes = {}
    for cid in data:
        (flower / f"work-{cid}").mkdir(parents=True)
        shutil.copy(tmp_path / f"work-{cid}" / KEY_FILE, flower / f"work-{cid}" / KEY_FILE)
        nodes[100 + cid] = {
            "client-id": cid,
            "data": str(data[cid]),
            "work-dir": str(flower / f"work-{cid}"),
        }
    settings = run_config({"toml": toml}, flower / "state")
    summary = run_server(LoopbackGrid(nodes, settings), settings)
    assert summary["server_step"] == ROUNDS * SERVER_STEPS == trainer.step
    from safetensors.torch import load_file

    weights = "published/server_unet/diffusion_pytorch_model.safetensors"
    over_http, over_flower = (
        load_file(tmp_path / "http" / weights),
        load_file(flower / "state" / weights),
    )
    assert over_http.keys() == over_flower.keys()
    for key in over_http:
        assert torch.equal(over_http[key], over_flower[key]), key
    flower_db = ReleaseDatabase(flower / "state" / "releases.db", service.latent_shape)
    http_uploads = {(e.client_id, e.upload_id, e.sha256) for e in service.database.uploads()}
    assert {(e.client_id, e.upload_id, e.sha256) for e in flower_db.uploads()} == http_uploads
    assert [s["images"] for s in summary["samples"]] == [2, 2]


def test_attribute_names_are_required_for_an_attribute_deployment(world):
    from latentfuse.deploy.conditioning import WireConditioning

    config = celeba_config(world)
    with pytest.raises(ValueError, match="deploy.attribute_names"):
        WireConditioning.of(config, DeployConfig(class_names=("face",)))
    with pytest.raises(ValueError, match="distinct"):
        DeployConfig(class_names=("face",), attribute_names=("Smiling", "Smiling"))


def test_a_release_whose_conditioning_type_contradicts_its_tensor_is_refused():
    from latentfuse.deploy.wire import _encode, decode_release

    batch = ReleaseBatch(0, (1, 2), torch.zeros(2, 4, 8, 8), torch.ones(2, 3), 100, 0)
    body = encode_release(batch)
    assert torch.equal(decode_release(body, 1 << 20, 100).labels, batch.labels)
    tensors = {"latents": batch.latents, "image_ids": torch.tensor([1, 2]), "labels": batch.labels}
    meta = {"kind": "release", "schema_version": 1, "client_id": 0, "t_cut": 100, "epoch": 0}
    for kind in ("text", "class", "pixels"):
        forged = _encode(tensors, meta | {"conditioning": kind})
        with pytest.raises(WireError, match="does not fit"):
            decode_release(forged, 1 << 20, 100)
