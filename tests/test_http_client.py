"""Deployment on loopback in this process: TLS, the server's training thread and its restart,
and the client's whole job (encode, upload, train, export, sample through the server, resume)."""

from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import ipaddress
import json
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import torch

from latentfuse.deploy.client.remote import RemoteError, upload_id
from latentfuse.deploy.server.app import BackgroundServer
from tests.test_http_app import (
    make_service,
    release_body,
    remote,
    tiny_deploy,
    world,  # noqa: F401  (fixture, by name)
)


@pytest.fixture(scope="module")
def tiny_run(request: pytest.FixtureRequest) -> dict:
    """The tiny run of tests/test_http_app.py, built in-process, with its tokens and files."""
    return request.getfixturevalue("world")


# ---- TLS ---------------------------------------------------------------------------------------
def self_signed(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost and its key (PEM): made with the
    `cryptography` package when installed, else with the openssl command."""
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    if importlib.util.find_spec("cryptography") is None:
        if shutil.which("openssl") is None:
            pytest.skip("neither the cryptography package nor openssl is available")
        command = ["openssl", "req", "-x509", "-newkey", "ec", "-nodes", "-days", "1"]
        command += ["-pkeyopt", "ec_paramgen_curve:P-256", "-subj", "/CN=latentfuse test"]
        command += ["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"]
        command += ["-keyout", str(key_file), "-out", str(cert_file)]
        subprocess.run(command, check=True, capture_output=True)
        return cert_file, key_file
    cert_file.write_bytes(_cryptography_certificate(key_file))
    return cert_file, key_file


def _cryptography_certificate(key_file: Path) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "latentfuse test")])
    now = datetime.datetime.now(datetime.UTC)
    alt = x509.SubjectAlternativeName(
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(alt, critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.mark.e2e
def test_tls_serves_a_client_that_trusts_the_certificate(tiny_run, tmp_path):
    cert, key = self_signed(tmp_path)
    service = make_service(tiny_run, tmp_path / "state")
    with BackgroundServer(service, str(cert), str(key)) as url:
        assert url.startswith("https://")
        with remote(url, tiny_run, 0, tls_ca=cert) as connection:
            assert connection.health()["ok"]
            connection.upload(
                upload_id(tiny_run["run"].clients[0].make_release(0)), release_body(tiny_run)
            )
            assert connection.status()["releases_held"] == {"0": 2}
        with remote(url, tiny_run, 0) as untrusting, pytest.raises(RemoteError, match="TLS"):
            untrusting.health()
        with pytest.raises(httpx.HTTPError):
            httpx.get(url.replace("https", "http") + "/healthz", timeout=5)


@pytest.mark.e2e
def test_server_trains_from_uploads_and_checkpoints(tiny_run, tmp_path):
    service = make_service(tiny_run, tmp_path / "state", train=True)
    with BackgroundServer(service) as url, remote(url, tiny_run, 0) as connection:
        assert connection.status()["training"] in ("waiting for releases", "idle")
        connection.upload_release(tiny_run["run"].clients[0].make_release(0))
        deadline = time.monotonic() + 60
        while connection.status()["training"] != "finished":
            assert time.monotonic() < deadline, connection.status()
            time.sleep(0.1)
        status = connection.status()
    max_steps = tiny_run["config"].train.max_steps
    assert status["step"] == max_steps and status["last_checkpoint"]["step"] == max_steps
    assert (tmp_path / "state" / "checkpoint" / "state.json").is_file()
    again = make_service(tiny_run, tmp_path / "state", train=True)  # a restart resumes training
    assert again.status()["resumed_from_step"] == max_steps
    assert again.status()["releases_held"] == status["releases_held"]
    sampling_only = make_service(tiny_run, tmp_path / "state")  # samples the published weights
    published = sampling_only.sampling_unet().state_dict()
    for name, value in again.sampling_unet().state_dict().items():
        assert torch.equal(value, published[name]), name


def client_folder(world_images: Path, out: Path, classes: tuple[str, ...]) -> Path:
    """An ImageFolder holding only `classes` of the tiny world (links, not copies)."""
    for name in classes:
        (out / name).mkdir(parents=True)
        for image in sorted((world_images / name).iterdir()):
            (out / name / image.name).symlink_to(image)
    return out


@pytest.mark.e2e
@pytest.mark.parametrize(("t_cut", "folders"), [(100, ["clients"]), (0, [])], ids=["split", "GM"])
def test_client_job_uploads_trains_exports_samples_and_resumes(tiny_run, tmp_path, t_cut, folders):
    from latentfuse.deploy.client.job import ClientJob
    from latentfuse.deploy.client.remote_sample import sample_remote

    config = tiny_run["config"]
    config = dataclasses.replace(config, split=dataclasses.replace(config.split, t_cut=t_cut))
    variant = tiny_run | {"config": config}
    data = client_folder(variant["files"]["images"], tmp_path / "data", ("class1", "class3"))
    service = make_service(variant, tmp_path / "state")
    with BackgroundServer(service) as url, remote(url, variant, 0) as connection:
        job = ClientJob(config, tiny_deploy(), 0, data, tmp_path / "work", connection)
        model = job.run(max_steps=2)
        assert job.uploaded == {"uploaded": 3, "skipped": 0}
        assert job.step == (2 if t_cut else 0)  # under GM the client only encodes and decodes
        assert service.status()["releases_held"] == {"0": 24}
        description = json.loads((model / "collafuse.json").read_text())
        assert description["clients"]["0"]["classes"] == [1, 3]  # global ids of its classes
        expected = sorted([*folders, "collafuse.json", "scheduler", "vae"])
        assert sorted(p.name for p in model.iterdir()) == expected
        images = sample_remote(connection, model, 3, num_inference_steps=4, seed=1)
        assert images.shape == (3, 3, 32, 32) and 0 <= images.min() <= images.max() <= 1
        again = ClientJob(config, tiny_deploy(), 0, data, tmp_path / "work", connection)
        again.run(max_steps=2)
        assert again.step == job.step and again.uploaded == {"uploaded": 0, "skipped": 0}
        assert len(service.database) == 3


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["serve", "--clients", "c.json", "--config", "x.toml"], "--state-dir"),
        (["serve", "--clients", "c.json", "--make-tokens", "0,x"], "comma-separated"),
        (
            [
                "serve",
                "--config",
                "configs/deploy.toml",
                "--clients",
                "c.json",
                "--state-dir",
                "s",
                "--host",
                "0.0.0.0",
            ],
            "refusing plain HTTP",
        ),
        (["sample", "--server", "http://127.0.0.1:9", "--client-id", "0"], "--token-file"),
        (
            [
                "client",
                "--server",
                "http://127.0.0.1:9",
                "--token-file",
                "TOKEN",
                "--data",
                "d",
                "--client-id",
                "0",
                "--retry-for",
                "0.3",
            ],
            "unreachable",
        ),
        (
            [
                "client",
                "--server",
                "http://127.0.0.1:9",
                "--token-file",
                "TOKEN",
                "--data",
                "d",
                "--client-id",
                "9",
            ],
            "--client-id must lie in [0, 5)",
        ),
        (
            [
                "sample",
                "--server",
                "http://127.0.0.1:9",
                "--token-file",
                "TOKEN",
                "--client-dir",
                "d",
                "--client-id",
                "0",
            ],
            "--client-dir d: no such folder",
        ),
    ],
    ids=[
        "no state dir",
        "bad ids",
        "plain http",
        "sample without token",
        "down",
        "bad id",
        "sample without model",
    ],
)
def test_command_line_refuses_bad_invocations(argv, message, tmp_path, capsys):
    from latentfuse.cli.main import main

    token = tmp_path / "t.token"
    token.write_text("lf0.secret\n")
    token.chmod(0o600)
    argv = [str(token) if a == "TOKEN" else a for a in argv]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_a_changed_release_is_refused_before_its_body_leaves(monkeypatch):
    """The server holds a release of images 0..3; a different one (a new key, say) is refused
    by the client itself, so the server never receives a second noisy copy."""
    import torch

    from latentfuse.deploy.client.remote import RemoteServer, upload_id
    from latentfuse.method.transport import ReleaseBatch

    batch = lambda latents: ReleaseBatch(0, (0, 1, 2, 3), latents, None, 100, 0)
    first = batch(torch.zeros(4, 4, 2, 2))
    remote = RemoteServer("http://127.0.0.1:9", "lf1.x", 0)
    sent = []
    monkeypatch.setattr(remote, "limits", lambda: {"upload_chunk_size": 2, "max_body_bytes": 1e9})
    monkeypatch.setattr(remote, "committed", lambda: {upload_id(c): "other" for c in [first]})
    monkeypatch.setattr(remote, "upload", lambda key, body: sent.append(key) or True)
    with pytest.raises(RuntimeError, match="already holds other releases"):
        remote.upload_release(batch(torch.ones(4, 4, 2, 2)))
    assert sent == []


@pytest.mark.parametrize(
    ("flags", "mode"), [([], "process"), (["--trainer-thread"], "thread"), (["--no-train"], "none")]
)
def test_serve_trains_under_accelerate_by_default(flags, mode):
    import argparse

    from latentfuse.cli.serve import add_serve_parser, trainer_mode

    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers(dest="command"))
    argv = ["serve", "--config", "c.toml", "--clients", "k.json", "--state-dir", "s", *flags]
    args = parser.parse_args(argv)
    chosen, command = trainer_mode(args, "no")
    assert chosen == mode
    if mode == "process":
        launch = command.index("accelerate.commands.launch")
        assert command[launch + 1 : launch + 3] == ["--num_processes", "1"]
        assert command[-4:] == ["--config", "c.toml", "--state-dir", "s"]
    else:
        assert command is None


def test_a_trainer_stops_when_its_front_is_gone_and_one_trainer_holds_a_state_folder(tmp_path):
    import subprocess
    import sys
    import threading

    from latentfuse.deploy.server.train_server import hold_trainer_lock, watch_front

    front = subprocess.Popen([sys.executable, "-c", "pass"])
    front.wait()  # a front that is gone (as after kill -9)
    stop = threading.Event()
    threading.Thread(target=watch_front, args=(front.pid, stop, 0.05), daemon=True).start()
    assert stop.wait(5)
    held = hold_trainer_lock(tmp_path, rank=0)
    with pytest.raises(TimeoutError, match="another trainer holds"):
        hold_trainer_lock(tmp_path, rank=0, timeout=0.2)
    assert hold_trainer_lock(tmp_path, rank=1) is None  # only rank 0 locks
    import os

    os.close(held)
    again = hold_trainer_lock(tmp_path, rank=0, timeout=1)
    os.close(again)
