"""latentfuse as a Flower app: the ClientApp and ServerApp over Flower's Message API give the
same server weights as the HTTP transport, and a run on Flower's deployment engine (SuperLink,
two SuperNodes, TLS, SuperNode authentication) trains and samples."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import Context, RecordDict  # noqa: E402
from flwr.common.serde import message_from_proto, message_to_proto  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from latentfuse.deploy.flower.client_app import app as client_app  # noqa: E402
from latentfuse.deploy.flower.server_app import run_server  # noqa: E402
from latentfuse.method.release_key import KEY_FILE  # noqa: E402
from tests.test_http_client import client_folder  # noqa: E402
from tests.test_http_e2e import CLIENT_CLASSES, deploy_toml  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
ROUNDS, CLIENT_STEPS, SERVER_STEPS = 2, 2, 3


class LoopbackGrid:
    """Flower's Grid for a test: every message crosses Flower's own protobuf serialisation
    (what the SuperLink stores and forwards) to the ClientApp of its SuperNode and back."""

    def __init__(self, node_configs: dict[int, dict], run_config: dict):
        self.node_configs, self.run_config = node_configs, run_config
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0

    def get_node_ids(self) -> list[int]:
        return list(self.node_configs)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            arrived = message_from_proto(message_to_proto(message))
            context = Context(1, node, self.node_configs[node], RecordDict(), self.run_config)
            TaskIdentity.node_id = node
            try:
                reply = client_app(arrived, context)
            finally:
                TaskIdentity.node_id = 0
            replies.append(message_from_proto(message_to_proto(reply)))
        return replies


@pytest.fixture
def setting(tiny_run, tmp_path):
    files = tiny_run["files"]
    toml = deploy_toml(files, tmp_path / "deploy.toml", max_steps=100, checkpoint_every=50)
    data = {
        cid: client_folder(files["images"], tmp_path / f"data-{cid}", classes)
        for cid, classes in CLIENT_CLASSES.items()
    }
    return {"toml": toml, "data": data, "root": tmp_path, "files": files}


@pytest.fixture(scope="module")
def tiny_run(request):
    return request.getfixturevalue("world")


from tests.test_http_app import world  # noqa: E402, F401  (fixture, by name)


def run_config(setting, state: Path, **extra) -> dict:
    return {
        "config": str(setting["toml"]),
        "state-dir": str(state),
        "rounds": ROUNDS,
        "client-steps-per-round": CLIENT_STEPS,
        "server-steps-per-round": SERVER_STEPS,
        "sample-images": 2,
        "num-inference-steps": 4,
        "num-supernodes": 2,
        **extra,
    }


def train_rounds(jobs: dict, trainer) -> None:
    """The Flower app's schedule run over HTTP: per round each client's steps and upload,
    then the server's steps on what arrived."""
    for r in range(1, ROUNDS + 1):
        for job in jobs.values():
            while job.step < r * CLIENT_STEPS:
                job.train_step()
            job.upload_due()
        trainer.sync()
        for _ in range(SERVER_STEPS):
            trainer.train_step()


def server_weights(state: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(state / "published" / "server_unet" / "diffusion_pytorch_model.safetensors")


@pytest.mark.e2e
def test_flower_and_http_carry_the_same_bytes_to_the_same_server_weights(setting, monkeypatch):
    from latentfuse.deploy.client.job import ClientJob
    from latentfuse.deploy.client.remote import RemoteServer, read_token
    from latentfuse.deploy.config import load_deploy_config
    from latentfuse.deploy.server.app import BackgroundServer
    from latentfuse.deploy.server.auth import TokenBook, issue_tokens
    from latentfuse.deploy.server.service import ServerService
    from latentfuse.deploy.server.trainer import ServerTrainer

    monkeypatch.setenv("LATENTFUSE_CACHE", str(setting["files"]["cache"]))
    root = setting["root"]
    # HTTP: `latentfuse serve`'s service behind uvicorn, the clients' jobs over httpx
    config, deploy = load_deploy_config(str(setting["toml"]), [])
    issued = issue_tokens(root / "clients.json", root / "tokens", [0, 1], iterations=1000)
    service = ServerService(
        config, deploy, TokenBook.load(root / "clients.json"), root / "http", trainer="none"
    )
    trainer = ServerTrainer(config, deploy, root / "http")
    with BackgroundServer(service) as url:
        remotes = {c: RemoteServer(url, read_token(issued[c]), c) for c in CLIENT_CLASSES}
        jobs = {
            c: ClientJob(config, deploy, c, setting["data"][c], root / f"work-{c}", remotes[c])
            for c in CLIENT_CLASSES
        }
        train_rounds(jobs, trainer)
        for remote in remotes.values():
            remote.close()
    trainer.publish()
    # Flower: the same clients (their folders, so their secret keys) from scratch
    flower_root = root / "flower"
    for cid in CLIENT_CLASSES:
        (flower_root / f"work-{cid}").mkdir(parents=True)
        key = root / f"work-{cid}" / KEY_FILE
        shutil.copy(key, flower_root / f"work-{cid}" / KEY_FILE)
    nodes = {
        100 + cid: {
            "client-id": cid,
            "data": str(setting["data"][cid]),
            "work-dir": str(flower_root / f"work-{cid}"),
        }
        for cid in CLIENT_CLASSES
    }
    settings = run_config(setting, flower_root / "state")
    summary = run_server(LoopbackGrid(nodes, settings), settings)
    assert summary["server_step"] == ROUNDS * SERVER_STEPS == trainer.step
    http_weights, flower_weights = (
        server_weights(root / "http"),
        server_weights(flower_root / "state"),
    )
    assert http_weights.keys() == flower_weights.keys()
    for key in http_weights:
        assert torch.equal(http_weights[key], flower_weights[key]), key
    # the same upload bodies were committed, byte for byte
    http_uploads = {(e.client_id, e.upload_id, e.sha256) for e in service.database.uploads()}
    from latentfuse.deploy.server.store import ReleaseDatabase

    flower_db = ReleaseDatabase(flower_root / "state" / "releases.db", service.latent_shape)
    assert {(e.client_id, e.upload_id, e.sha256) for e in flower_db.uploads()} == http_uploads
    # sampling: each client got its images, kept on the client
    assert [s["images"] for s in summary["samples"]] == [2, 2]
    for cid in CLIENT_CLASSES:
        assert (flower_root / f"work-{cid}" / "flower-samples.png").is_file()


@pytest.mark.e2e
@pytest.mark.slow
def test_a_superlink_and_two_supernodes_with_tls_and_node_auth_train_and_sample(
    setting, monkeypatch
):
    """Flower's deployment engine on loopback, started and stopped by the test (at most 10
    minutes): TLS with a CA of the test's own, SuperNode authentication with registered
    P-384 keys, `flwr run` of examples/flower."""
    from latentfuse.testing.flower_loopback import run_loopback

    monkeypatch.setenv("LATENTFUSE_CACHE", str(setting["files"]["cache"]))
    work = setting["root"] / "deployment"
    summary = run_loopback(setting["toml"], setting["data"], work, rounds=2, timeout=600)
    assert summary["server_step"] == 2 * 3
    assert sorted(summary["clients"]) == ["0", "1"]  # each SuperNode answered as one client
    assert [s["images"] for s in summary["samples"]] == [2, 2]
    for cid in CLIENT_CLASSES:
        assert (work / f"client-{cid}" / "flower-samples.png").is_file()
    superlink_log = (work / "logs" / "superlink.log").read_text()
    assert "https://127.0.0.1" in superlink_log  # the SuperLink served TLS only
    assert superlink_log.count("Activated node_id") >= 2  # both authenticated


@pytest.mark.e2e
@pytest.mark.slow
def test_the_simulation_engine_runs_the_same_app(setting, monkeypatch):
    """Flower's simulation engine (Ray, a local simulation SuperLink that `flwr run` starts):
    the same ServerApp and ClientApp, two simulated SuperNodes."""
    pytest.importorskip("ray")
    from latentfuse.testing.flower_loopback import run_simulation_engine

    monkeypatch.setenv("LATENTFUSE_CACHE", str(setting["files"]["cache"]))
    template = str(setting["root"] / "data-{client}")
    work = setting["root"] / "simulation"
    summary = run_simulation_engine(setting["toml"], template, work, timeout=600)
    assert summary["server_step"] == 2 * 3
    assert sorted(summary["clients"]) == ["0", "1"]
    assert [s["images"] for s in summary["samples"]] == [2, 2]
