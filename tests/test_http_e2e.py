"""Processes on loopback: `latentfuse serve` and two `latentfuse client`s train and sample; a
server killed with SIGKILL mid-training restarts with every acknowledged release, none twice."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from latentfuse.cli.main import main
from latentfuse.deploy.client.remote import RemoteServer, RetryPolicy, chunks, read_token, upload_id
from latentfuse.deploy.server.store import ReleaseDatabase
from latentfuse.deploy.server.train_server import trainer_command
from latentfuse.deploy.wire import SampleRequest, encode_release
from latentfuse.method.release_key import load_release_key
from tests.test_http_app import world  # noqa: F401  (fixture, by name)
from tests.test_http_client import client_folder

# every test here starts `latentfuse serve` (and clients) as processes
pytestmark = [pytest.mark.e2e, pytest.mark.subprocess]

CLASS_NAMES = ("class0", "class1", "class2", "class3")
CLIENT_CLASSES = {0: ("class0", "class1"), 1: ("class2", "class3")}


def deploy_toml(files: dict[str, Path], path: Path, max_steps: int, checkpoint_every: int) -> Path:
    """The tiny run (tests/test_training.py) as a deployment config file."""
    path.write_text(
        f"""vae = "{files["vae"]}"
[data]
source = "{files["images"]}"
subfolder = ""
num_clients = 2
[split]
t_cut = 100
[server_unet]
block_out_channels = [32]
[client_unet]
block_out_channels = [32]
[train]
server_batch_size = 8
client_batch_size = 4
max_steps = {max_steps}
warmup_steps = 2
checkpoint_every = {checkpoint_every}
[deploy]
class_names = {json.dumps(list(CLASS_NAMES))}
upload_chunk_size = 8
"""
    )
    return path


def environment(files: dict[str, Path]) -> dict[str, str]:
    """A child's environment: one thread, the tiny world's cache."""
    return os.environ | {"OMP_NUM_THREADS": "1", "LATENTFUSE_CACHE": str(files["cache"])}


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(
    files: dict[str, Path],
    toml: Path,
    root: Path,
    port: int,
    log: str,
    extra: tuple[str, ...] = (),
    state: str = "state",
) -> subprocess.Popen:
    """`latentfuse serve` in a child process; returns once /healthz answers."""
    command = [sys.executable, "-m", "latentfuse.cli.main", "serve", "--config", str(toml)]
    command += ["--clients", str(root / "clients.json"), "--state-dir", str(root / state)]
    command += ["--port", str(port), *extra]
    (root / state / "endpoint.json").unlink(missing_ok=True)
    with open(root / log, "w") as out:
        process = subprocess.Popen(command, env=environment(files), stdout=out, stderr=out)
    deadline = time.monotonic() + 120
    while not (root / state / "endpoint.json").exists():
        assert process.poll() is None, (root / log).read_text()[-3000:]
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.1)
    httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).raise_for_status()
    return process


def wait_until(condition, timeout: float, what: str) -> None:
    """Poll `condition` every 0.1 s until true or fail naming `what`."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def tiny_run(request: pytest.FixtureRequest) -> dict:
    """The tiny run of tests/test_http_app.py, built in-process, with its files."""
    return request.getfixturevalue("world")


@pytest.fixture
def deployment(tmp_path: Path) -> Path:
    """A folder with tokens for clients 0 and 1 (clients.json, tokens/)."""
    argv = ["serve", "--make-tokens", "0,1", "--clients", str(tmp_path / "clients.json")]
    assert main([*argv, "--token-dir", str(tmp_path / "tokens")]) == 0
    return tmp_path


@pytest.mark.slow
def test_server_and_two_client_processes_train_and_sample(tiny_run, deployment, capsys):
    root, port, files = deployment, free_port(), tiny_run["files"]
    toml = deploy_toml(files, root / "deploy.toml", max_steps=6, checkpoint_every=3)
    server = start_server(files, toml, root, port, "server.log")
    url = f"http://127.0.0.1:{port}"
    try:
        clients = []
        for cid, classes in CLIENT_CLASSES.items():
            data = client_folder(files["images"], root / f"data{cid}", classes)
            command = [sys.executable, "-m", "latentfuse.cli.main", "client", "--server", url]
            command += ["--token-file", str(root / "tokens" / f"client-{cid}.token")]
            command += ["--data", str(data), "--client-id", str(cid), "--config", str(toml)]
            command += ["--work-dir", str(root / f"client{cid}"), "--max-steps", "3"]
            output = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
            clients.append(subprocess.Popen(command, env=environment(files), **output))
        for process in clients:
            output, _ = process.communicate(timeout=300)
            assert process.returncode == 0, output[-3000:]
        token = read_token(root / "tokens" / "client-0.token")
        with RemoteServer(url, token, 0) as connection:
            wait_until(lambda: connection.status()["training"] == "finished", 120, "training")
            status = connection.status()
        assert status["releases_held"] == {"0": 24, "1": 24} and status["uploads"] == 6
        assert status["step"] == 6 and status["last_checkpoint"]["step"] == 6
        grid = root / "grid.png"
        argv = ["sample", "--server", url, "--token-file", str(root / "tokens" / "client-1.token")]
        argv += ["--client-dir", str(root / "client1" / "model"), "--client-id", "1"]
        argv += ["--num-images", "3", "--num-inference-steps", "4", "--out", str(grid)]
        assert main(argv) == 0 and grid.is_file()
        assert "through" in capsys.readouterr().out
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    log = (root / "server.log").read_text()
    # uvicorn shuts down gracefully, then re-raises SIGTERM so supervisors see it
    assert server.returncode in (0, -signal.SIGTERM) and "stopped at step 6" in log, log[-3000:]
    assert not list((root / "client0").rglob("*.token"))
    # Each client made its own secret release key; nothing on the server side holds it.
    server_files = [p.read_bytes() for p in (root / "state").rglob("*") if p.is_file()]
    server_files.append(log.encode())
    for cid in CLIENT_CLASSES:
        key_file = root / f"client{cid}" / "release.key"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        key = load_release_key(key_file)
        for spelling in (key, key.hex().encode()):
            assert not any(spelling in blob for blob in server_files)


class Uploader(threading.Thread):
    """Uploads every client's release in chunks of 2, slowly, retrying through outages."""

    def __init__(self, url: str, root: Path, releases: list):
        super().__init__(daemon=True)
        self.url, self.root, self.releases = url, root, releases
        self.acked: list[str] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for batch in self.releases:
                token = read_token(self.root / "tokens" / f"client-{batch.client_id}.token")
                retry = RetryPolicy(base=0.1, cap=1.0, budget=180)
                with RemoteServer(self.url, token, batch.client_id, retry=retry) as connection:
                    for chunk in chunks(batch, 2):
                        connection.upload(upload_id(chunk), encode_release(chunk))
                        self.acked.append(f"{batch.client_id}/{upload_id(chunk)}")
                        time.sleep(0.15)
        except BaseException as error:  # reported by the test
            self.error = error


@pytest.mark.slow
def test_kill_9_mid_training_loses_no_acknowledged_release(tiny_run, deployment):
    root, port, files = deployment, free_port(), tiny_run["files"]
    toml = deploy_toml(files, root / "deploy.toml", max_steps=100_000, checkpoint_every=3)
    releases = [c.make_release(0) for c in tiny_run["run"].clients]
    url = f"http://127.0.0.1:{port}"
    server = start_server(files, toml, root, port, "server.log")
    uploader = Uploader(url, root, releases)
    uploader.start()
    checkpoint = root / "state" / "checkpoint" / "state.json"
    wait_until(lambda: len(uploader.acked) >= 8 and checkpoint.exists(), 120, "uploads, checkpoint")
    server.send_signal(signal.SIGKILL)
    server.wait(timeout=30)
    acked_before_kill = list(uploader.acked)
    checkpoint_step = json.loads(checkpoint.read_text())["extra"]["step"]
    server = start_server(files, toml, root, port, "server2.log")
    try:
        token = read_token(root / "tokens" / "client-0.token")
        with RemoteServer(url, token, 0) as connection:
            # the front starts its trainer as a process: wait until it has resumed
            resumed = lambda: connection.status().get("resumed_from_step") is not None  # noqa: E731
            wait_until(resumed, 120, "the trainer to resume")
            restarted = connection.status()
            uploader.join(timeout=180)
            assert uploader.error is None and not uploader.is_alive(), uploader.error
            wait_until(lambda: connection.status()["step"] > checkpoint_step, 60, "training")
            final = connection.status()
    finally:
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=30)
    database = ReleaseDatabase(root / "state" / "releases.db", tuple(releases[0].latents.shape[1:]))
    committed = [f"{e.client_id}/{e.upload_id}" for e in database.uploads()]
    images = sum(e.num_images for e in database.uploads())
    duplicates = images - sum(database.counts().values()) + len(committed) - len(set(committed))
    held_after_restart = sum(restarted["releases_held"].values())
    print(
        f"\nkill -9 and restart: {len(acked_before_kill)} uploads "
        f"({2 * len(acked_before_kill)} releases) acknowledged before the kill, "
        f"{held_after_restart} releases held after restart, duplicates {duplicates}, "
        f"training resumed from step {restarted['resumed_from_step']} "
        f"(checkpoint on disk: step {checkpoint_step}); finally "
        f"{sum(final['releases_held'].values())} held, step {final['step']}"
    )
    assert set(acked_before_kill) <= set(committed)
    assert held_after_restart >= 2 * len(acked_before_kill)
    # the trainer is its own process: it outlives the front's kill -9 by at most a second
    # (it watches the front), checkpoints on its way out, and the next trainer resumes there
    assert restarted["resumed_from_step"] >= checkpoint_step
    assert duplicates == 0
    assert final["releases_held"] == {str(b.client_id): len(b.image_ids) for b in releases}
    assert final["uploads"] == sum(-(-len(b.image_ids) // 2) for b in releases)


def trained_behind_the_front(files, toml, root, state: str, processes: int) -> dict:
    """Start `serve --trainer-processes N` on `root/state`, wait until its trainer finishes;
    the published weights."""
    from safetensors.torch import load_file

    port = free_port()
    extra = ("--trainer-processes", str(processes))
    server = start_server(files, toml, root, port, f"{state}.log", extra, state)
    try:
        token = read_token(root / "tokens" / "client-0.token")
        with RemoteServer(f"http://127.0.0.1:{port}", token, 0) as connection:

            def finished() -> bool:
                training = connection.status()["training"]
                assert "exited" not in training, (root / state / "trainer.log").read_text()[-3000:]
                return training == "finished"

            wait_until(finished, 300, "training")
            status = connection.status()
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)
    assert status["trainer"] == "process" and status["step"] == 4, status
    weights = root / state / "published" / "server_unet" / "diffusion_pytorch_model.safetensors"
    return load_file(weights)


@pytest.mark.slow
def test_a_two_process_ddp_trainer_behind_the_front_matches_one_process(tiny_run, deployment):
    root, port, files = deployment, free_port(), tiny_run["files"]
    toml = deploy_toml(files, root / "deploy.toml", max_steps=4, checkpoint_every=2)
    server = start_server(files, toml, root, port, "ingest.log", ("--no-train",))
    try:  # the same releases for both trainers, committed before either starts
        for client in tiny_run["run"].clients:
            token = read_token(root / "tokens" / f"client-{client.client_id}.token")
            with RemoteServer(f"http://127.0.0.1:{port}", token, client.client_id) as connection:
                connection.upload_release(client.make_release(0), 8)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    shutil.copytree(root / "state", root / "state-one")
    two = trained_behind_the_front(files, toml, root, "state", processes=2)
    one = trained_behind_the_front(files, toml, root, "state-one", processes=1)
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(one[key], two[key], rtol=1e-4, atol=2e-5, msg=key)


@pytest.mark.slow
def test_killing_the_trainer_stops_neither_ingest_nor_sampling_and_a_restart_resumes(
    tiny_run, deployment
):
    root, port, files = deployment, free_port(), tiny_run["files"]
    toml = deploy_toml(files, root / "deploy.toml", max_steps=100_000, checkpoint_every=2)
    url, state = f"http://127.0.0.1:{port}", root / "state"
    clients = tiny_run["run"].clients
    server = start_server(files, toml, root, port, "front.log", ("--trainer-processes", "2"))
    token = {
        c.client_id: read_token(root / "tokens" / f"client-{c.client_id}.token") for c in clients
    }
    own = sorted({int(y) for y in clients[0].labels.tolist()})  # a client samples its classes
    request = SampleRequest(0, (1, 2), (own[0], own[-1]), num_inference_steps=4)
    trainer = None
    try:
        with RemoteServer(url, token[0], 0) as first:
            first.upload_release(clients[0].make_release(0), 8)
            published = state / "published" / "published.json"
            wait_until(lambda: published.exists() and first.status()["step"] >= 4, 300, "training")
            worker = json.loads((state / "trainer.json").read_text())["pid"]
            os.killpg(os.getpgid(worker), signal.SIGKILL)  # the launcher and both workers
            wait_until(lambda: "exited" in first.status()["training"], 60, "the front to notice")
            step_at_kill = json.loads((state / "checkpoint" / "state.json").read_text())["extra"]
            with RemoteServer(url, token[1], 1) as second:  # ingest goes on
                second.upload_release(clients[1].make_release(0), 8)
            handoff, _ = first.request_handoff(request)  # and sampling, on published weights
            assert torch.isfinite(handoff.latents).all()
            assert first.status()["releases_held"] == {
                str(c.client_id): c.num_images for c in clients
            }
            # the operator starts the trainer again: it resumes from its checkpoint
            command = trainer_command(toml, state, 1)
            trainer = subprocess.Popen(command, env=environment(files), start_new_session=True)
            wait_until(lambda: first.status()["training"] == "training", 300, "the restart")
            status = first.status()
            assert status["resumed_from_step"] == step_at_kill["step"], status
    finally:
        for process in (trainer, server):
            if process is not None:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=120)
