"""The HTTP server on loopback (in this process): same state and samples as in-process, bad input
refused with 4xx and no change, idempotent replays, TLS, training with checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import save

from latentfuse.deploy.client.remote import (
    RemoteError,
    RemoteServer,
    RetryPolicy,
    chunks,
    read_token,
)
from latentfuse.deploy.client.remote_sample import finish_remote
from latentfuse.deploy.config import DeployConfig, sampling_scheduler
from latentfuse.deploy.server.app import BackgroundServer, serve
from latentfuse.deploy.server.auth import TokenBook, issue_tokens
from latentfuse.deploy.server.service import ServerService
from latentfuse.deploy.wire import SampleRequest, encode_release
from latentfuse.method.server import Server
from latentfuse.method.transport import ReleaseBatch
from latentfuse.pipelines import CollaFuseClientPipeline, CollaFusePipeline
from latentfuse.training.runner import collafuse_description
from latentfuse.training.setup import build_run
from tests.worlds import tiny_config

CLASS_NAMES = ("class0", "class1", "class2", "class3")
STEPS = 6
FAST_RETRY = RetryPolicy(base=0.05, cap=0.5, budget=20)


def tiny_deploy(**changes) -> DeployConfig:
    """Limits small enough to hit in a test."""
    fields = {
        "class_names": CLASS_NAMES,
        "upload_chunk_size": 8,
        "max_body_bytes": 64 * 1024,
        "max_images_per_client": 1000,
        "max_sample_batch": 4,
        "sampling_processes": 0,  # in-process: tests/test_hardening.py runs the processes
        "key_derivations_per_minute": 0,  # tests send many tokens from one address on purpose
    }
    return DeployConfig(**(fields | changes))


@pytest.fixture(scope="module")
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny run built in-process (data, clients, models) and two client tokens."""
    files = request.getfixturevalue("tiny_world")
    root = tmp_path_factory.mktemp("http")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LATENTFUSE_CACHE", str(files["cache"]))
        config = tiny_config(files, "train.checkpoint_every=2")
        run = build_run(config)
    issued = issue_tokens(root / "clients.json", root / "tokens", [0, 1], iterations=1000)
    tokens = {cid: read_token(path) for cid, path in issued.items()}
    return {"config": config, "run": run, "root": root, "tokens": tokens, "files": files}


def make_service(world: dict, state_dir: Path, train: bool = False, **deploy) -> ServerService:
    """A server over the world's config and tokens."""
    tokens = TokenBook.load(world["root"] / "clients.json")
    return ServerService(world["config"], tiny_deploy(**deploy), tokens, state_dir, train=train)


def remote(url: str, world: dict, client_id: int, **kwargs) -> RemoteServer:
    """Client `client_id`'s connection."""
    return RemoteServer(url, world["tokens"][client_id], client_id, retry=FAST_RETRY, **kwargs)


@pytest.fixture(scope="module")
def served(world, tmp_path_factory):
    """A sampling-only server holding every client's release, and its URL."""
    service = make_service(world, tmp_path_factory.mktemp("state"))
    with BackgroundServer(service) as url:
        for client in world["run"].clients:
            with remote(url, world, client.client_id) as connection:
                connection.upload_release(client.make_release(0), chunk_size=5)
        yield service, url


def held(service: ServerService) -> Server:
    """A Server holding what the service's release database holds."""
    server = Server(service.splits, seed=0)
    for batch in service.database.read_since(0, service.database.max_seq()):
        server.receive(batch)
    return server


def snapshot(service: ServerService) -> tuple:
    """Everything a refused request must leave as it was."""
    store = {k: v.clone() for k, v in held(service).store.state_tensors().items()}
    uploads = [(e.client_id, e.upload_id, e.sha256) for e in service.database.uploads()]
    return service.status()["releases_held"], uploads, store


def same(a: tuple, b: tuple) -> bool:
    """Whether two snapshots agree exactly."""
    stores = a[2].keys() == b[2].keys() and all(torch.equal(a[2][k], b[2][k]) for k in a[2])
    return a[:2] == b[:2] and stores


# ---- same as in-process ------------------------------------------------------------------------
def test_store_after_http_uploads_equals_the_in_process_store(world, served):
    service, _ = served
    run = world["run"]
    in_process = Server(run.server.splits, seed=0)
    for client in run.clients:
        in_process.receive(client.make_release(0))
    expected, actual = in_process.store.state_tensors(), held(service).store.state_tensors()
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    assert service.status()["releases_held"] == {
        str(c.client_id): c.num_images for c in run.clients
    }


def test_server_starts_from_the_weights_train_py_starts_from(world, served):
    service, _ = served
    expected = world["run"].server_unet.state_dict()
    for name, value in service.sampling_unet().state_dict().items():
        assert torch.equal(value, expected[name]), name


@pytest.mark.parametrize("scheduler", ["ddpm", "ddim", "dpm"])
def test_sample_through_http_equals_the_in_process_pipeline(world, served, scheduler):
    _, url = served
    run, client_id = world["run"], 1
    description = collafuse_description(run)
    schedule = sampling_scheduler(scheduler, run.scheduler.config)
    full = CollaFusePipeline(run.vae, schedule, run.server_unet, run.client_unets, description)
    half = CollaFuseClientPipeline(
        run.vae,
        sampling_scheduler(scheduler, run.scheduler.config),
        run.client_unets[client_id],
        client_id,
        description,
    )
    for pipe in (full, half):
        pipe.set_progress_bar_config(disable=True)
    seeds = (11, 12, 13)
    labels = [description["clients"][str(client_id)]["classes"][i % 2] for i in range(3)]
    expected = full(
        client_id=client_id,
        class_labels=labels,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        num_inference_steps=STEPS,
        guidance_scale=2.0,
        output_type="pt",
    ).images
    request = SampleRequest(client_id, seeds, tuple(labels), STEPS, 2.0, scheduler)
    with remote(url, world, client_id) as connection:
        images = finish_remote(connection, half, request)
    torch.testing.assert_close(images, expected, rtol=1e-5, atol=1e-5)


# ---- bad input ---------------------------------------------------------------------------------
def release_body(world: dict, client_id: int = 0, **changes) -> bytes:
    """A release of client `client_id`'s first two images, with fields changed."""
    batch = world["run"].clients[client_id].make_release(0)
    fields = {
        "client_id": client_id,
        "image_ids": (0, 1),
        "latents": batch.latents[:2],
        "labels": batch.labels[:2],
        "handoff_t": batch.handoff_t,
        "epoch": 0,
    } | changes
    return encode_release(ReleaseBatch(**fields))


def raw_body(world: dict, value: float = 0.0, dtype: torch.dtype = torch.float32) -> bytes:
    """Client 0's first two releases with one latent set to `value`, sent as `dtype`, built by
    hand (ReleaseBatch and encode_release would refuse or convert them)."""
    latents = world["run"].clients[0].make_release(0).latents[:2].clone()
    latents[0, 0, 0, 0] += value
    meta = {"wire_version": 1, "kind": "release", "schema_version": 1, "client_id": 0}
    meta |= {"t_cut": 100, "epoch": 0}
    tensors = {"latents": latents.to(dtype), "image_ids": torch.tensor([0, 1])}
    tensors["labels"] = torch.tensor([0, 0])
    return save(tensors, metadata={"latentfuse": json.dumps(meta)})


def sample_body(client_id: int = 0, **changes) -> bytes:
    """A JSON sampling request with fields changed."""
    fields = {"wire_version": 1, "kind": "sample", "client_id": client_id, "seeds": [1]}
    fields |= {"class_labels": [0], "num_inference_steps": 2}
    return json.dumps(fields | changes).encode()


BAD_INPUTS = {
    # name: (method, client id in path, token of, path tail, body, status, message)
    "no token": ("PUT", 0, None, "releases/a1", "release", 401, "missing bearer"),
    "bad token": ("PUT", 0, "garbage", "releases/a1", "release", 401, "invalid token for client 0"),
    "unknown client": ("PUT", 7, 0, "releases/a1", "release", 401, "invalid token for client 7"),
    "another client's token": ("PUT", 1, 0, "releases/a1", "release", 401, "invalid token"),
    "release for another client": ("PUT", 0, 0, "releases/a1", "foreign", 403, "names client 1"),
    "wrong shape": ("PUT", 0, 0, "releases/a1", "shape", 400, "latents must be"),
    "wrong dtype": ("PUT", 0, 0, "releases/a1", "dtype", 400, "dtype"),
    "NaN": ("PUT", 0, 0, "releases/a1", "nan", 400, "NaN"),
    "Inf": ("PUT", 0, 0, "releases/a1", "inf", 400, "Inf"),
    "wrong t_cut": ("PUT", 0, 0, "releases/a1", "t_cut", 400, "t_cut"),
    "labels out of range": ("PUT", 0, 0, "releases/a1", "labels", 400, "labels must lie"),
    "labels withheld": ("PUT", 0, 0, "releases/a1", "no labels", 400, "class labels"),
    "image id too large": ("PUT", 0, 0, "releases/a1", "big id", 400, "image ids must be"),
    "not safetensors": ("PUT", 0, 0, "releases/a1", "garbage", 400, "not safetensors"),
    "oversized body": ("PUT", 0, 0, "releases/a1", "huge", 413, "exceeds the limit"),
    "too many images": ("PUT", 0, 0, "releases/a1", "many", 413, "at most 8"),
    "bad upload id": ("PUT", 0, 0, "releases/bad%20id!", "release", 400, "upload id"),
    "replayed upload": ("PUT", 0, 0, "releases/replayed", "release", 409, "already committed"),
    "sample for another client": ("POST", 0, 0, "sample", "sample other", 403, "names client 1"),
    "sample label out of range": ("POST", 0, 0, "sample", "sample label", 400, "class_labels"),
    "sample batch too large": ("POST", 0, 0, "sample", "sample many", 413, "at most 4"),
    "sample not JSON": ("POST", 0, 0, "sample", "garbage", 400, "not JSON"),
}


def bad_body(world: dict, kind: str) -> bytes:
    """The request body a BAD_INPUTS row names."""
    latents = world["run"].clients[0].make_release(0).latents
    bodies = {
        "release": lambda: release_body(world),
        "foreign": lambda: release_body(world, client_id=1),
        "shape": lambda: release_body(world, latents=torch.zeros(2, 4, 8, 8)),
        "dtype": lambda: raw_body(world, dtype=torch.float64),
        "nan": lambda: raw_body(world, float("nan")),
        "inf": lambda: raw_body(world, float("-inf")),
        "t_cut": lambda: release_body(world, handoff_t=99),
        "labels": lambda: release_body(world, labels=torch.tensor([0, 9])),
        "no labels": lambda: release_body(world, labels=None),
        "big id": lambda: release_body(world, image_ids=(0, 5000)),
        "garbage": lambda: b"\x00garbage\x00" * 10,
        "huge": lambda: b"\x00" * (100 * 1024),
        "many": lambda: release_body(
            world, image_ids=tuple(range(9)), latents=latents[:9], labels=torch.zeros(9).long()
        ),
        "sample other": lambda: sample_body(client_id=1),
        "sample label": lambda: sample_body(class_labels=[4]),
        "sample many": lambda: sample_body(seeds=[1, 2, 3, 4, 5], class_labels=[0] * 5),
    }
    return bodies[kind]()


@pytest.fixture(scope="module")
def strict(world, tmp_path_factory):
    """A server holding one committed upload ('replayed') of client 0."""
    service = make_service(world, tmp_path_factory.mktemp("strict"))
    with BackgroundServer(service) as url:
        with remote(url, world, 0) as connection:
            assert connection.upload("replayed", release_body(world))
        yield service, url


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gets_a_4xx_and_changes_nothing(world, strict, case):
    service, url = strict
    method, client_id, token_of, tail, kind, status, message = BAD_INPUTS[case]
    token = world["tokens"].get(token_of, token_of)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    before = snapshot(service)
    response = httpx.request(
        method,
        f"{url}/v1/clients/{client_id}/{tail}",
        content=bad_body(world, kind),
        headers=headers,
    )
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]
    assert same(before, snapshot(service))


def test_a_retried_upload_is_acknowledged_once(world, strict):
    service, url = strict
    body = release_body(world, image_ids=(2, 3))
    with remote(url, world, 0) as connection:
        assert connection.upload("retried", body) is True
        before = snapshot(service)
        assert connection.upload("retried", body) is False  # 409 with the same bytes: done
        with pytest.raises(RemoteError, match="different bytes"):
            connection.upload("retried", release_body(world, image_ids=(4, 5)))
        assert "retried" in connection.committed()
    assert same(before, snapshot(service))


def test_whole_release_upload_resumes_where_it_stopped(world, strict):
    service, url = strict
    batch = world["run"].clients[1].make_release(0)
    with remote(url, world, 1) as connection:
        first = connection.upload_release(chunks_of(batch, 3), chunk_size=3)
        again = connection.upload_release(batch, chunk_size=3)
    assert first == {"uploaded": 1, "skipped": 0}
    assert again["skipped"] == 1 and again["uploaded"] == -(-len(batch.image_ids) // 3) - 1
    assert service.status()["releases_held"]["1"] == len(batch.image_ids)


def chunks_of(batch: ReleaseBatch, n: int) -> ReleaseBatch:
    """The first `n` images of a release."""
    return chunks(batch, n)[0]


def test_health_is_public_and_status_needs_a_client_token(served):
    _, url = served
    health = httpx.get(f"{url}/healthz").json()
    assert health["ok"] and health["limits"]["max_sample_batch"] == 4
    assert httpx.get(f"{url}/v1/status").status_code == 401
    bad = {"Authorization": "Bearer lf0.not-the-token"}
    assert httpx.get(f"{url}/v1/status", headers=bad).status_code == 401
    assert httpx.get(f"{url}/v1/clients/0/uploads", headers=bad).status_code == 401


def test_a_port_in_use_is_reported_not_raised_as_a_traceback():
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ValueError, match=f"cannot listen on 127.0.0.1:{port}.*--port 0"):
            serve(None, "127.0.0.1", port)
