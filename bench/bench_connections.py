"""An attacker on loopback against `latentfuse serve`: 1,100 half-open connections from 127.0.0.1
and a 64 MiB header, while a legitimate client at 127.0.0.2 asks for its status 10 times.

    python bench/bench_connections.py

Prints how many connections opened, what the 64 MiB header was answered, the legitimate
client's (status, ms) and what a half-open connection gets after the header timeout (408).
"""

from __future__ import annotations

import json
import socket
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from bench_http import LOAD_CONFIG, start_server, stop  # noqa: E402

from latentfuse.deploy.client.remote import read_token  # noqa: E402
from latentfuse.deploy.server.auth import issue_tokens  # noqa: E402

HEAD = b"GET /healthz HTTP/1.1\r\nHost: x\r\n"


def main() -> int:
    root = Path(tempfile.mkdtemp())
    vae = root / "vae"
    vae.mkdir()
    (vae / "config.json").write_text(
        json.dumps({"block_out_channels": [32, 32], "latent_channels": 4})
    )
    config = root / "c.toml"
    config.write_text(LOAD_CONFIG.format(vae=vae, clients=2, images=16))
    issue_tokens(root / "clients.json", root / "tokens", range(2))
    token = read_token(root / "tokens" / "client-1.token")
    server = start_server(config, root, "--no-train", "--host", "0.0.0.0", "--insecure-http")
    port = int(server.url.rsplit(":", 1)[1])
    try:
        half_open = []
        for _ in range(1100):
            try:
                connection = socket.create_connection(("127.0.0.1", port), timeout=2)
                connection.send(HEAD)  # a request head never finished
                half_open.append(connection)
            except OSError:
                pass
        big, sent, answer = socket.create_connection(("127.0.0.1", port)), 0, b""
        try:
            big.sendall(HEAD + b"X-Big: ")
            for _ in range(64):
                big.sendall(b"a" * 2**20)
                sent += 2**20
        except OSError:
            pass  # closed by the server
        try:
            big.settimeout(5)
            answer = big.recv(200)
        except OSError:
            pass
        legit = httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2"))
        times = []
        for _ in range(10):
            start = time.perf_counter()
            response = legit.get(
                f"http://127.0.0.1:{port}/v1/status",
                headers={"Authorization": f"Bearer {token}"},
                timeout=10,
            )
            times.append((response.status_code, round(1000 * (time.perf_counter() - start), 1)))
        print(f"half-open connections opened: {len(half_open)}")
        print(f"64 MiB header: {sent >> 20} MiB sent before the close; answered {answer[:40]!r}")
        print(f"legitimate client at 127.0.0.2 meanwhile (status, ms): {times}")
        time.sleep(11)
        print(f"a half-open connection after 11 s gets: {half_open[0].recv(60)[:30]!r}")
    finally:
        stop(server)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
