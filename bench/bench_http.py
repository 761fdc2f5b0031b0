"""HTTP deployment benchmarks on loopback, against baselines measured in the same run.

    python bench/bench_http.py                 # sampling: HTTP server half vs in-process
    python bench/bench_http.py --load          # 20 clients x 50 concurrent uploads
    python bench/bench_http.py --load --train  # the same while the server trains

Sampling runs the same models and batch both ways: in-process, the server half pipeline and
the client half in this process; over HTTP, `latentfuse serve --no-train` in a child process
runs the server half and this process finishes (target ratio HTTP / in-process <= 1.10). The
load test fires concurrent uploads from threads and checks that every acknowledged release is
held, once.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

from latentfuse.deploy.client.remote import RemoteServer, read_token, upload_id
from latentfuse.deploy.server.auth import issue_tokens
from latentfuse.deploy.wire import encode_release
from latentfuse.method.transport import ReleaseBatch

REPO = Path(__file__).resolve().parent.parent


def start_server(config: Path, root: Path, *extra: str, threads: int = 1) -> subprocess.Popen:
    """`latentfuse serve` on a free loopback port in a child process; waits for /healthz."""
    state = root / "state"
    command = [sys.executable, "-m", "latentfuse.cli.main", "serve", "--config", str(config)]
    command += ["--clients", str(root / "clients.json"), "--state-dir", str(state), "--port", "0"]
    env = os.environ | {"OMP_NUM_THREADS": str(threads)}
    log = open(root / "server.log", "w")  # noqa: SIM115  (the child writes it)
    process = subprocess.Popen([*command, *extra], env=env, stdout=log, stderr=log, cwd=REPO)
    deadline = time.monotonic() + 180
    while not (state / "endpoint.json").exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError((root / "server.log").read_text()[-3000:])
        time.sleep(0.1)
    process.url = json.loads((state / "endpoint.json").read_text())["url"]
    httpx.get(f"{process.url}/healthz", timeout=30).raise_for_status()
    return process


def stop(process: subprocess.Popen) -> None:
    """Stop a child server."""
    process.terminate()
    process.wait(timeout=60)


# ---- sampling ----------------------------------------------------------------------------------
def sampling_bench(config_path: Path, batch: int, steps: int, scheduler: str, repeats: int) -> dict:
    """Median seconds of one batch in-process and over HTTP, and their ratio."""
    from latentfuse.data.autoencoder import load_vae
    from latentfuse.deploy.client.remote_sample import finish_remote
    from latentfuse.deploy.config import latent_shape, load_deploy_config, sampling_scheduler
    from latentfuse.deploy.server.service import server_description
    from latentfuse.deploy.server.trainer import build_server_unet
    from latentfuse.deploy.wire import SampleRequest
    from latentfuse.method.schedule import client_split, make_scheduler
    from latentfuse.models import build_unet
    from latentfuse.paths import resolve_path
    from latentfuse.pipelines import CollaFuseClientPipeline, CollaFuseServerPipeline

    config, deploy = load_deploy_config(config_path)
    client_id, (channels, size, _) = 0, latent_shape(config)
    scheduler_ = make_scheduler(config)
    splits = {c: client_split(config, scheduler_, c) for c in range(config.data.num_clients)}
    description = server_description(config, deploy, splits)
    torch.manual_seed(0)
    client_unet = build_unet(config.client_unet_config(0), size, channels, deploy.num_classes + 1)
    base = scheduler_.config
    server = CollaFuseServerPipeline(
        sampling_scheduler(scheduler, base), build_server_unet(config, deploy).eval(), description
    )
    vae = load_vae(resolve_path(config.vae))
    client = CollaFuseClientPipeline(
        vae, sampling_scheduler(scheduler, base), client_unet.eval(), client_id, description
    )
    for pipe in (server, client):
        pipe.set_progress_bar_config(disable=True)
    seeds = tuple(range(batch))
    labels = tuple(i % deploy.num_classes for i in range(batch))
    request = SampleRequest(client_id, seeds, labels, steps, 1.0, scheduler)

    def in_process() -> torch.Tensor:
        """Both halves in this process, as CollaFusePipeline runs them."""
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        handoff = server(client_id, list(labels), None, steps, 1.0, generators)
        return client(handoff, generator=generators, output_type="pt").images

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        issue_tokens(root / "clients.json", root / "tokens", [client_id])
        process = start_server(config_path, root, "--no-train", threads=torch.get_num_threads())
        token = read_token(root / "tokens" / f"client-{client_id}.token")
        try:
            with RemoteServer(process.url, token, client_id) as remote:
                over_http = lambda: finish_remote(remote, client, request)  # noqa: E731
                same = torch.equal(in_process(), over_http())  # also the warm-up of both
                times = {"in_process": [], "http": []}
                for _ in range(repeats):  # interleaved, so background load hits both alike
                    for name, run in (("in_process", in_process), ("http", over_http)):
                        start = time.perf_counter()
                        run()
                        times[name].append(time.perf_counter() - start)
        finally:
            stop(process)
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {**medians, "ratio": medians["http"] / medians["in_process"], "identical": same}


# ---- load --------------------------------------------------------------------------------------
LOAD_CONFIG = """vae = "{vae}"
[data]
num_clients = {clients}
[split]
t_cut = 100
[server_unet]
block_out_channels = [32]
[train]
server_batch_size = 16
max_steps = 100000
checkpoint_every = 50
[deploy]
class_names = ["a", "b", "c", "d"]
upload_chunk_size = {images}
"""


def upload_worker(
    url: str, token: str, cid: int, uploads: int, images: int, barrier: threading.Barrier
) -> list[float]:
    """One client: `uploads` releases of `images` random latents each; their latencies (s)."""
    generator, latencies = torch.Generator().manual_seed(cid), []
    with RemoteServer(url, token, cid) as remote:
        barrier.wait()
        for k in range(uploads):
            batch = ReleaseBatch(
                cid,
                tuple(range(k * images, (k + 1) * images)),
                torch.randn(images, 4, 16, 16, generator=generator),
                torch.randint(0, 4, (images,), generator=generator),
                100,
                0,
            )
            body = encode_release(batch)
            start = time.perf_counter()
            remote.upload(upload_id(batch), body)
            latencies.append(time.perf_counter() - start)
    return latencies


def load_bench(clients: int, uploads: int, images: int, train: bool, threads: int) -> dict:
    """Upload from `clients` threads at once; throughput, latency and what the server holds."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        vae = root / "vae"
        vae.mkdir()  # the server reads only the autoencoder's config.json (for the latent shape)
        (vae / "config.json").write_text(
            json.dumps({"block_out_channels": [32, 32], "latent_channels": 4})
        )
        config = root / "load.toml"
        config.write_text(LOAD_CONFIG.format(vae=vae, clients=clients, images=images))
        issue_tokens(root / "clients.json", root / "tokens", range(clients))
        tokens = [read_token(root / "tokens" / f"client-{c}.token") for c in range(clients)]
        process = start_server(config, root, *(() if train else ("--no-train",)), threads=threads)
        barrier = threading.Barrier(clients + 1, timeout=300)
        try:
            with ThreadPoolExecutor(clients) as pool:
                futures = [
                    pool.submit(upload_worker, process.url, tokens[c], c, uploads, images, barrier)
                    for c in range(clients)
                ]
                barrier.wait()
                start = time.perf_counter()
                latencies = sorted(x for future in futures for x in future.result())
                wall = time.perf_counter() - start
            with RemoteServer(process.url, tokens[0], 0) as remote:
                status = remote.status()
        finally:
            stop(process)
    held = sum(status["releases_held"].values())
    return {
        "uploads": len(latencies),
        "wall_s": wall,
        "uploads_per_s": len(latencies) / wall,
        "releases_per_s": len(latencies) * images / wall,
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p95_ms": 1000 * latencies[int(0.95 * (len(latencies) - 1))],
        "max_ms": 1000 * latencies[-1],
        "held": held,
        "lost": clients * uploads * images - held,
        "uploads_committed": status["uploads"],
        "server_steps": status["step"],
    }


def _p95(values: list[float]) -> float:
    values = sorted(values)
    return 1000 * values[int(0.95 * (len(values) - 1))]


def probe(url: str, token: str, rounds: int, client: int = 1) -> dict[str, float]:
    """A client's p95 (ms) of a status call, an upload and a 1-image 10-step sample."""
    times: dict[str, list[float]] = {"status": [], "upload": [], "sample": []}
    generator = torch.Generator().manual_seed(1)
    headers = {"Authorization": f"Bearer {token}"}
    small = json.dumps(
        {
            "wire_version": 1,
            "kind": "sample",
            "client_id": client,
            "seeds": [1],
            "class_labels": [0],
            "num_inference_steps": 10,
        }
    ).encode()
    with httpx.Client(base_url=url, headers=headers, timeout=300) as session:
        for k in range(-4, rounds):  # rounds -4..-1 warm the sampling processes, not timed
            batch = ReleaseBatch(
                client,
                (k + 4,),
                torch.randn(1, 4, 16, 16, generator=generator),
                torch.tensor([0]),
                100,
                0,
            )
            requests = {
                "status": ("GET", "/v1/status", None),
                "upload": (
                    "PUT",
                    f"/v1/clients/{client}/releases/p{k}-{time.time_ns()}",
                    encode_release(batch),
                ),
                "sample": ("POST", f"/v1/clients/{client}/sample", small),
            }
            for name, (method, path, body) in requests.items():
                start = time.perf_counter()
                response = session.request(method, path, content=body)
                if k >= 0:
                    times[name].append(time.perf_counter() - start)
                response.raise_for_status()
    return {name: _p95(values) for name, values in times.items()}


def fairness_bench(
    flood: int,
    rounds: int,
    threads: int,
    flood_niceness: int = 0,
    sampling_processes: int = 2,
    heavy: bool = False,
    large_sample_cost: int | None = None,
) -> dict:
    """The probing client's p95s unloaded, then while client 0 keeps `flood` sampling requests
    (16 images x 10 steps) in flight, or (`heavy`) while clients 0 and 1 each keep the largest
    request a client may send in flight (`max_sampling_per_client` of them: the most images x
    the most steps that `max_sample_cost` admits) and client 2 probes; what the floods were
    answered."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        vae = root / "vae"
        vae.mkdir()
        (vae / "config.json").write_text(
            json.dumps({"block_out_channels": [32, 32], "latent_channels": 4})
        )
        config = root / "fair.toml"
        config.write_text(
            LOAD_CONFIG.format(vae=vae, clients=3, images=16)
            + f"sampling_processes = {sampling_processes}\n"
            + ("" if large_sample_cost is None else f"large_sample_cost = {large_sample_cost}\n")
        )
        issue_tokens(root / "clients.json", root / "tokens", range(3))
        tokens = [read_token(root / "tokens" / f"client-{c}.token") for c in range(3)]
        process = start_server(config, root, "--no-train", threads=threads)
        floods = [0, 1] if heavy else [0]
        prober = 2 if heavy else 1
        try:
            generator = torch.Generator().manual_seed(0)
            limits = httpx.get(f"{process.url}/healthz", timeout=30).json()["limits"]
            images = limits["max_sample_batch"] if heavy else 16
            steps = min(1000, limits["max_sample_cost"] // images) if heavy else 10
            for c in floods:  # each flooding client holds class 0
                with RemoteServer(process.url, tokens[c], c) as remote:
                    latents = torch.randn(16, 4, 16, 16, generator=generator)
                    labels = torch.zeros(16, dtype=torch.long)
                    remote.upload_release(
                        ReleaseBatch(c, tuple(range(16)), latents, labels, 100, 0), 16
                    )
            unloaded = probe(process.url, tokens[prober], rounds, prober)
            # Each flood comes from its own process (asyncio, its requests in flight), so that
            # the probe's timings measure the server, not 100 threads in this interpreter.
            flooders, files = [], []
            for c in floods:
                files.append(root / f"flood-{c}.json")
                worker = [process.url, tokens[c], str(1 if heavy else flood), str(files[-1])]
                worker += [str(c), str(images), str(steps)]
                flooders.append(
                    subprocess.Popen(
                        [sys.executable, __file__, "--flood-worker", *worker],
                        env=os.environ | {"OMP_NUM_THREADS": "1"},
                        preexec_fn=(lambda: os.nice(flood_niceness)) if flood_niceness else None,
                    )
                )
            for flooder, file in zip(flooders, files, strict=True):
                while not file.with_suffix(".ready").exists():
                    if flooder.poll() is not None:
                        raise RuntimeError("a flooding process exited early")
                    time.sleep(0.1)
            time.sleep(1.0)  # the floods under way
            loaded = probe(process.url, tokens[prober], rounds, prober)
            for flooder in flooders:
                flooder.terminate()
                flooder.wait(timeout=60)
            answers = [json.loads(file.read_text()) for file in files]
        finally:
            stop(process)
    request = f"{images} images x {steps} steps"
    return {"unloaded": unloaded, "loaded": loaded, "flood_answers": answers, "request": request}


def flood_worker(
    url: str, token: str, flood: int, answers_file: str, client: int, images: int, steps: int
) -> None:
    """Keep `flood` sampling requests of `images` x `steps` in flight as `client` until
    SIGTERM; the count of each status code goes to `answers_file`."""
    import asyncio

    body = json.dumps(
        {
            "wire_version": 1,
            "kind": "sample",
            "client_id": client,
            "seeds": list(range(images)),
            "class_labels": [0] * images,
            "num_inference_steps": steps,
        }
    ).encode()
    answers: dict[int, int] = {}

    client_id = client

    async def one(client: httpx.AsyncClient, stop: asyncio.Event) -> None:
        while not stop.is_set():
            code = (await client.post(f"/v1/clients/{client_id}/sample", content=body)).status_code
            answers[code] = answers.get(code, 0) + 1

    async def run() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        Path(answers_file).with_suffix(".ready").touch()
        limits = httpx.Limits(max_connections=flood, max_keepalive_connections=flood)
        headers = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(
            base_url=url, headers=headers, timeout=300, limits=limits
        ) as client:
            tasks = [asyncio.create_task(one(client, stop)) for _ in range(flood)]
            await stop.wait()  # SIGTERM: hang up on what is in flight (the server stops it)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(run())
    Path(answers_file).write_text(json.dumps(answers))


def keepalive_latency(nodelay: bool, requests: int) -> float:
    """Median ms of keep-alive GET /healthz-like requests to uvicorn on a socket made by
    `bind_socket(nodelay=...)`."""
    import uvicorn
    from fastapi import FastAPI

    from latentfuse.deploy.server.app import bind_socket

    app = FastAPI()

    @app.get("/ping")
    async def ping() -> dict:
        return {"ok": True, "padding": "x" * 200}

    sock = bind_socket("127.0.0.1", 0, nodelay=nodelay)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/ping"
    times = []
    with httpx.Client() as client:
        client.get(url)
        for _ in range(requests):
            start = time.perf_counter()
            client.get(url).raise_for_status()
            times.append(1000 * (time.perf_counter() - start))
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    """Run the chosen benchmark and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--load", action="store_true", help="run the upload load test")
    parser.add_argument(
        "--fairness", action="store_true", help="another client's p95 while one client floods"
    )
    parser.add_argument("--flood-worker", nargs=7, help=argparse.SUPPRESS)
    parser.add_argument(
        "--heavy",
        action="store_true",
        help="fairness: clients 0 and 1 each send the largest admissible request; client 2 probes",
    )
    parser.add_argument(
        "--large-sample-cost",
        type=int,
        default=None,
        help="fairness: the server's deploy.large_sample_cost (0: no lane for small requests)",
    )
    parser.add_argument("--flood", type=int, default=100, help="fairness: requests in flight")
    parser.add_argument(
        "--flood-niceness",
        type=int,
        default=0,
        help="fairness: run the flooding client at this niceness (it stands in for a client on "
        "another machine; on a 2-core loopback test its own CPU use otherwise competes)",
    )
    parser.add_argument(
        "--sampling-processes",
        type=int,
        default=2,
        help="fairness: the server's deploy.sampling_processes (0: in the web process)",
    )
    parser.add_argument("--rounds", type=int, default=20, help="fairness: probes per phase")
    parser.add_argument(
        "--nodelay", action="store_true", help="keep-alive latency with and without TCP_NODELAY"
    )
    parser.add_argument("--train", action="store_true", help="load test: server trains meanwhile")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--uploads", type=int, default=50, help="uploads per client")
    parser.add_argument("--images", type=int, default=4, help="releases per upload")
    parser.add_argument("--config", default=str(REPO / "configs" / "deploy.toml"))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--scheduler", default="ddim")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.flood_worker:
        url, token, flood, answers_file, client, images, steps = args.flood_worker
        flood_worker(url, token, int(flood), answers_file, int(client), int(images), int(steps))
        return 0
    if args.fairness:
        r = fairness_bench(
            args.flood,
            args.rounds,
            args.threads,
            args.flood_niceness,
            args.sampling_processes,
            args.heavy,
            args.large_sample_cost,
        )
        prober = 2 if args.heavy else 1
        for name in ("status", "upload", "sample"):
            a, b = r["unloaded"][name], r["loaded"][name]
            print(
                f"client {prober} {name}: p95 unloaded {a:.1f} ms, during the flood {b:.1f} ms, "
                f"ratio {b / a:.2f} (target <= 2)"
            )
        what = "clients 0 and 1 (1 in flight each" if args.heavy else f"client 0 ({args.flood}"
        print(f"{what}, {r['request']}) were answered {r['flood_answers']}")
        return 0
    if args.nodelay:
        before, after = keepalive_latency(False, 200), keepalive_latency(True, 200)
        print(
            f"keep-alive GET, median of 200: without TCP_NODELAY {before:.2f} ms, "
            f"with {after:.2f} ms, ratio {before / after:.1f}"
        )
        return 0
    if args.load:
        r = load_bench(args.clients, args.uploads, args.images, args.train, args.threads)
        print(
            f"load: {args.clients} clients x {args.uploads} uploads x {args.images} releases "
            f"(server {'training' if args.train else 'not training'}): {r['uploads']} uploads in "
            f"{r['wall_s']:.1f} s = {r['uploads_per_s']:.1f} uploads/s "
            f"({r['releases_per_s']:.0f} releases/s); latency p50 {r['p50_ms']:.0f} ms, "
            f"p95 {r['p95_ms']:.0f} ms, max {r['max_ms']:.0f} ms; held {r['held']}, "
            f"lost {r['lost']}, committed uploads {r['uploads_committed']}, "
            f"server steps meanwhile {r['server_steps']}"
        )
        return 0 if r["lost"] == 0 else 1
    r = sampling_bench(Path(args.config), args.batch_size, args.steps, args.scheduler, args.repeats)
    print(
        f"sampling batch {args.batch_size}, {args.steps} {args.scheduler} steps, "
        f"{args.threads} threads: in-process {r['in_process']:.3f} s, HTTP {r['http']:.3f} s, "
        f"ratio {r['ratio']:.3f} (target <= 1.10); images identical: {r['identical']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
