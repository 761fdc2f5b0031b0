"""Flower's engines on one machine. `run_loopback`: a whole deployment on loopback, a
SuperLink with TLS and SuperNode authentication, two SuperNodes (one per client), `flwr run`
of the latentfuse app; `run_simulation_engine`: the same app on the simulation engine. Every
process is started and stopped here (docs/flower.md walks through the commands by hand).

    python -m latentfuse.testing.flower_loopback --config deploy.toml --data 0=DIR0 --data 1=DIR1 \\
        --work runs/flower [--rounds 2 --client-steps 2 --server-steps 3 --timeout 600]

Under --work: `tls/` (a CA, and the SuperLink's certificate for 127.0.0.1 signed by it),
`keys/` (each SuperNode's P-384 key pair, OpenSSH format; the public keys are registered with
`flwr supernode register` before the SuperNodes start), `flwr-home/` (the Flower CLI's
connection file), `logs/`, the clients' work folders and the server's state; the run's summary
is `server/flower-run.json`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

APP = Path(__file__).resolve().parents[2] / "examples" / "flower"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_tls(folder: Path) -> dict[str, Path]:
    """A CA and a certificate for 127.0.0.1/localhost signed by it (P-384, two days)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "latentfuse flower CA")])

    def certificate(subject, public_key, extensions):
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca_name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
        )
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(ca_key, hashes.SHA384())

    ca = certificate(ca_name, ca_key.public_key(), [(x509.BasicConstraints(True, None), True)])
    names = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    server = certificate(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]),
        key.public_key(),
        [(x509.SubjectAlternativeName(names), False), (x509.BasicConstraints(False, None), True)],
    )
    paths = {"ca": folder / "ca.crt", "cert": folder / "server.pem", "key": folder / "server.key"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    paths["key"].chmod(0o600)
    return paths


def make_node_key(folder: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's P-384 key pair in OpenSSH format (what Flower's SuperNode auth reads)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / name, folder / f"{name}.pub"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    private.chmod(0o600)
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
    )
    return private, public


class Processes:
    """Child processes in their own sessions, stopped together (SIGTERM, then SIGKILL)."""

    def __init__(self, env: dict[str, str], logs: Path):
        self.env, self.logs, self.children = env, logs, []
        logs.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, command: list[str]) -> subprocess.Popen:
        with open(self.logs / f"{name}.log", "w") as log:
            child = subprocess.Popen(
                command, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.children.append(child)
        return child

    def run(self, command: list[str], timeout: float = 120) -> str:
        done = subprocess.run(
            command, env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )
        if done.returncode:
            raise RuntimeError(f"{' '.join(command[:3])} failed: {done.stdout}{done.stderr}")
        return done.stdout

    def stop(self) -> None:
        for child in reversed(self.children):
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for child in self.children:
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()


def wait_for(condition, timeout: float, what: str, poll: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


def run_config_text(config: str | Path, work: Path, **values) -> str:
    """`flwr run --run-config`: the run TOML, the server's state under `work`, and `values`."""
    paths = {"config": f"'{Path(config).resolve()}'", "state-dir": f"'{work / 'server'}'"}
    return " ".join(f"{k}={v}" for k, v in {**paths, **values}.items())


def run_loopback(
    config: str | Path,
    data: dict[int, str | Path],
    work: str | Path,
    rounds: int = 2,
    client_steps: int = 2,
    server_steps: int = 3,
    sample_images: int = 2,
    inference_steps: int = 4,
    timeout: float = 600,
) -> dict:
    """Deploy, run, stop; the run's summary (server/flower-run.json) with the wall times."""
    work = Path(work).resolve()
    if work.exists():
        shutil.rmtree(work)
    tls = make_tls(work / "tls")
    home = work / "flwr-home"
    home.mkdir(parents=True)
    port = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n'
        f'address = "127.0.0.1:{port}"\nroot-certificates = "{tls["ca"]}"\n'
    )
    env = os.environ | {"FLWR_HOME": str(home), "OMP_NUM_THREADS": "1"}
    bin_dir = Path(sys.executable).parent
    tool = {name: str(bin_dir / name) for name in ("flower-superlink", "flower-supernode", "flwr")}
    processes = Processes(env, work / "logs")
    started = time.monotonic()
    try:
        link = processes.start(
            "superlink",
            [
                tool["flower-superlink"],
                "--ssl-ca-certfile",
                str(tls["ca"]),
                "--ssl-certfile",
                str(tls["cert"]),
                "--ssl-keyfile",
                str(tls["key"]),
                "--enable-supernode-auth",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--database",
                str(work / "superlink.db"),
            ],
        )
        log = work / "logs" / "superlink.log"
        wait_for(
            lambda: link.poll() is None and "Uvicorn running" in log.read_text(),
            60,
            f"the SuperLink (log: {log})",
        )
        for cid, folder in sorted(data.items()):
            private, public = make_node_key(work / "keys", f"node{cid}")
            processes.run([tool["flwr"], "supernode", "register", str(public), "loopback"])
            node_config = f'client-id={cid} data="{Path(folder).resolve()}" '
            node_config += f'work-dir="{work / f"client-{cid}"}"'
            processes.start(
                f"supernode{cid}",
                [
                    tool["flower-supernode"],
                    "--root-certificates",
                    str(tls["ca"]),
                    "--superlink",
                    f"127.0.0.1:{port}",
                    "--auth-supernode-private-key",
                    str(private),
                    "--node-config",
                    node_config,
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(free_port()),
                ],
            )
        text = run_config_text(
            config,
            work,
            **{
                "num-supernodes": len(data),
                "rounds": rounds,
                "client-steps-per-round": client_steps,
                "server-steps-per-round": server_steps,
                "sample-images": sample_images,
                "num-inference-steps": inference_steps,
            },
        )
        out = processes.run([tool["flwr"], "run", str(APP), "loopback", "--run-config", text])
        run_id = re.search(r"started run (\d+)", out, re.IGNORECASE)
        summary_file = work / "server" / "flower-run.json"
        wait_for(summary_file.is_file, timeout, f"the run to finish ({summary_file})", poll=1)
        summary = json.loads(summary_file.read_text())
        summary["run_id"] = run_id.group(1) if run_id else None
        summary["wall_seconds"] = time.monotonic() - started
        return summary
    finally:
        processes.stop()


def run_simulation_engine(
    config: str | Path,
    data_template: str,
    work: str | Path,
    num_clients: int = 2,
    rounds: int = 2,
    client_steps: int = 2,
    server_steps: int = 3,
    timeout: float = 600,
) -> dict:
    """The same app on Flower's simulation engine (Ray; `flwr run` starts a local simulation
    SuperLink); the SuperNodes' data folders are `data_template` with "{client}" the client
    id. The local SuperLink is stopped afterwards. The run's summary, with its wall time."""
    work = Path(work).resolve()
    if work.exists():
        shutil.rmtree(work)
    home = work / "flwr-home"
    home.mkdir(parents=True)
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n'
    )
    port = free_port()
    env = os.environ | {
        "FLWR_HOME": str(home),
        "OMP_NUM_THREADS": "1",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(port),
    }
    processes = Processes(env, work / "logs")
    text = run_config_text(
        config,
        work,
        **{
            "num-supernodes": num_clients,
            "rounds": rounds,
            "client-steps-per-round": client_steps,
            "server-steps-per-round": server_steps,
            "sample-images": 2,
            "num-inference-steps": 4,
            "data-template": f"'{data_template}'",
            "work-template": f"'{work / 'client-{client}'}'",
        },
    )
    flwr = str(Path(sys.executable).parent / "flwr")
    started = time.monotonic()
    try:
        processes.run(
            [
                flwr,
                "run",
                str(APP),
                "local",
                "--run-config",
                text,
                "--federation-config",
                f"num-supernodes={num_clients}",
            ]
        )
        summary_file = work / "server" / "flower-run.json"
        wait_for(summary_file.is_file, timeout, f"the simulation to finish ({summary_file})", 1)
        summary = json.loads(summary_file.read_text())
        summary["wall_seconds"] = time.monotonic() - started
        return summary
    finally:
        stop_local_superlinks(home)


def stop_local_superlinks(home: Path) -> None:
    """Stop the simulation SuperLink(s) `flwr run` started under FLWR_HOME=`home` (detached
    from us, found by their environment), with their Ray workers."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            command = (proc / "cmdline").read_bytes().replace(b"\0", b" ")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"flower-superlink" in command and f"FLWR_HOME={home}".encode() in environ:
            try:
                os.killpg(int(proc.name), signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                os.kill(int(proc.name), signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the run + [deploy] TOML")
    parser.add_argument("--data", action="append", required=True, help="CLIENT_ID=DIR, repeated")
    parser.add_argument("--work", default="runs/flower-loopback")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--client-steps", type=int, default=2)
    parser.add_argument("--server-steps", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args(argv)
    data = {}
    for item in args.data:
        cid, _, folder = item.partition("=")
        if not cid.isdigit() or not folder:
            parser.error(f"--data: expected CLIENT_ID=DIR, got {item!r}")
        data[int(cid)] = folder
    summary = run_loopback(
        args.config,
        data,
        args.work,
        args.rounds,
        args.client_steps,
        args.server_steps,
        timeout=args.timeout,
    )
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
