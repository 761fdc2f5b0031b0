"""latentfuse as a Flower app: the CollaFuse exchange over Flower's Message API.

The messages carry exactly the bytes of latentfuse's HTTP transport (`latentfuse.deploy.wire`):
a client's release chunks (`encode_release`, keyed by the same upload ids), the sampling
request and the server's hand-off (`encode_handoff`), so a run with the same seeds and release
keys gives the same server weights whichever carries them. Both ends run the deployment code:
the client side is `ClientJob` (encode, train the low-noise denoiser, release under its secret
key) with a stand-in for the HTTP connection; the server side is `ServerService` (every check
an HTTP upload gets, the durable release database) and `ServerTrainer` (the engine and the
exact objective of train.py).

One round of the ServerApp: a "train" message to every SuperNode (train to the round's client
step, reply with the releases that are due); the server commits them and trains
`server-steps-per-round` steps. After the last round, sampling: a "query.request" message asks
each client for a sampling request (its seeds and labels), the server runs t >= t_cut, and a
"query.finish" message carries the hand-off back; the client finishes the chain, decodes and
keeps the images (they never leave it). SuperNodes cannot start requests, so interactive
sampling belongs to `latentfuse serve` (docs/flower.md).

Run config (`[tool.flwr.app.config]`, examples/flower/pyproject.toml): config (the run TOML),
deploy-overrides, state-dir, rounds, client-steps-per-round, server-steps-per-round,
sample-images, num-inference-steps. Node config (`flower-supernode --node-config`):
client-id, data, work-dir.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from latentfuse.deploy.wire import (
    SampleRequest,
    decode_handoff,
    encode_release,
    encode_sample_request,
)
from latentfuse.training.loop import fit

logger = logging.getLogger(__name__)

app = ClientApp()
server_app = ServerApp()
RELEASES, STATUS = "releases", "status"


# ---- settings ------------------------------------------------------------------------------------
def load_settings(run_config: dict[str, Any]) -> tuple[Any, Any]:
    """(RunConfig, DeployConfig) named by the run config: the `latentfuse client/serve` files."""
    from latentfuse.deploy.config import load_deploy_config

    overrides = str(run_config.get("overrides", "")).split()
    return load_deploy_config(str(run_config["config"]), overrides)


class Outbox:
    """Stands in for the HTTP connection of `ClientJob`: release chunks are encoded exactly as
    `RemoteServer.upload_release` encodes them and kept for the reply."""

    def __init__(self, client_id: int) -> None:
        self.client_id, self.items = client_id, []

    def upload_release(self, batch, chunk_size: int | None = None, fp16: bool = False):
        from latentfuse.deploy.client.remote import chunks, upload_id

        size = chunk_size or len(batch.image_ids)
        for chunk in chunks(batch, size):
            self.items.append((upload_id(chunk), encode_release(chunk, fp16=fp16)))
        return {"uploaded": len(self.items), "skipped": 0}


def node_settings(context: Context) -> tuple[int, str, Path]:
    """(client id, data folder, work folder) of this SuperNode: its node config (deployment:
    `--node-config "client-id=0 data=... work-dir=..."`), or in the simulation engine its
    partition id put into the run config's `data-template` / `work-template` ("{client}")."""
    node, run = context.node_config, context.run_config
    if "client-id" in node:
        return int(node["client-id"]), str(node["data"]), Path(str(node["work-dir"]))
    if "partition-id" not in node:
        raise ValueError("node config: expected client-id, data and work-dir")
    cid = int(node["partition-id"])
    data = str(run["data-template"]).format(client=cid)
    return cid, data, Path(str(run["work-template"]).format(client=cid))


def client_job(context: Context, outbox: Outbox | None = None):
    """This SuperNode's `ClientJob`, rebuilt from its work folder (its checkpoint, its key)."""
    from latentfuse.deploy.client.job import ClientJob

    config, deploy = load_settings(context.run_config)
    cid, data, work = node_settings(context)
    job = ClientJob(config, deploy, cid, data, str(work), outbox)
    job.load_checkpoint()
    return job


# ---- the ClientApp ---------------------------------------------------------------------------
@app.train()
def train(message: Message, context: Context) -> Message:
    """Train to the round's client step; reply with the releases that are due (wire bytes)."""
    outbox = Outbox(node_settings(context)[0])
    job = client_job(context, outbox)
    target = int(message.content["config"]["client-step"])
    start = time.perf_counter()
    if job.trains:
        fit(job, target, None, desc=f"client {job.client_id}", progress=False)
    job.upload_due()
    job.save_checkpoint()
    releases = ConfigRecord(
        {
            "client-id": job.client_id,
            "upload-ids": [key for key, _ in outbox.items],
            "bodies": [body for _, body in outbox.items],
        }
    )
    status = MetricRecord({"step": job.step, "seconds": time.perf_counter() - start})
    return Message(RecordDict({RELEASES: releases, STATUS: status}), reply_to=message)


@app.query("request")
def sampling_request(message: Message, context: Context) -> Message:
    """This client's sampling request: its seeds and labels drawn from its own classes."""
    from latentfuse.pipelines import CollaFuseClientPipeline
    from latentfuse.pipelines.sampling import client_labels

    cfg = message.content["config"]
    cid, _, work = node_settings(context)
    count = int(cfg["images"])
    client_job(context).export()  # the client's half of the model as trained so far
    pipe = CollaFuseClientPipeline.from_pretrained(work / "model", client_id=cid)
    seeds = [int(cfg["seed"]) * 100_000 + i for i in range(count)]
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    labels = client_labels(pipe.collafuse_config, cid, None, count, generators)
    request = SampleRequest(
        cid,
        tuple(seeds),
        tuple(labels.tolist()),
        int(cfg["steps"]),
        float(cfg["guidance"]),
        str(cfg["scheduler"]),
    )
    body = encode_sample_request(request)
    return Message(RecordDict({"request": ConfigRecord({"body": body})}), reply_to=message)


class _HandOffChannel:
    """`finish_remote`'s view of the server: the hand-off this message carried."""

    def __init__(self, body: bytes) -> None:
        self.body = body

    def request_handoff(self, request):
        return decode_handoff(self.body, max(1 << 20, 2 * len(self.body)))


@app.query("finish")
def finish(message: Message, context: Context) -> Message:
    """Finish the server's chains, decode, keep the images here; reply with their digest."""
    from latentfuse.data.imaging import make_grid, save_image
    from latentfuse.deploy.client.remote_sample import finish_remote
    from latentfuse.deploy.config import sampling_scheduler
    from latentfuse.deploy.wire import decode_sample_request
    from latentfuse.pipelines import CollaFuseClientPipeline

    cfg = message.content["config"]
    cid, _, work = node_settings(context)
    request = decode_sample_request(cfg["request"], 1 << 20)
    pipe = CollaFuseClientPipeline.from_pretrained(work / "model", client_id=cid)
    pipe.scheduler = sampling_scheduler(request.scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    images = finish_remote(_HandOffChannel(cfg["handoff"]), pipe, request)
    out = work / "flower-samples.png"
    save_image(make_grid(images * 2 - 1, columns=min(8, len(images))), out)
    digest = hashlib.sha256(images.numpy().tobytes()).hexdigest()
    reply = ConfigRecord({"images": len(images), "sha256": digest})  # the images stay here
    return Message(RecordDict({"samples": reply}), reply_to=message)


# ---- the ServerApp ---------------------------------------------------------------------------
class FlowerServer:
    """The server's side: `ServerService` checks and commits what arrives, `ServerTrainer`
    trains; the same objects `latentfuse serve` runs behind its HTTP routes."""

    def __init__(self, run_config: dict[str, Any]) -> None:
        from latentfuse.deploy.server.auth import TokenBook
        from latentfuse.deploy.server.service import ServerService
        from latentfuse.deploy.server.trainer import ServerTrainer

        self.config, self.deploy = load_settings(run_config)
        self.state_dir = Path(str(run_config["state-dir"]))
        # no tokens: Flower authenticates the SuperNodes; a node keeps the client id it first
        # answered with (`self.clients`)
        self.service = ServerService(
            self.config, self.deploy, TokenBook({}), self.state_dir, trainer="none"
        )
        self.trainer = ServerTrainer(self.config, self.deploy, self.state_dir)
        self.trainer.load_checkpoint()
        self.clients: dict[int, int] = {}  # node id -> client id
        self.timings: dict[str, list[float]] = {
            "round": [],  # a whole round: messages, client training, commits, server training
            "client_training": [],  # the slowest client's training in the round (its report)
            "server_training": [],
            "sample": [],  # one sampling request: both messages and the server's steps
        }

    def commit(self, node_id: int, content: RecordDict) -> int:
        """Check and commit one reply's release chunks (as an HTTP upload); how many."""
        releases = content[RELEASES]
        cid = int(releases["client-id"])
        known = self.clients.setdefault(node_id, cid)
        if known != cid:
            raise ValueError(f"SuperNode {node_id} answered as client {cid}, before as {known}")
        committed = self.service.committed(cid)
        for key, body in zip(releases["upload-ids"], releases["bodies"], strict=True):
            if committed.get(key) == hashlib.sha256(body).hexdigest():
                continue  # already held (a resumed run)
            self.service.submit(cid, key, body)
        return len(releases["upload-ids"])

    def train_round(self, grid: Grid, nodes: list[int], client_step: int, server_steps: int):
        """One round: clients train and release, the server commits and trains."""
        start = time.perf_counter()
        config = ConfigRecord({"client-step": client_step})
        messages = [
            Message(RecordDict({"config": config}), dst_node_id=n, message_type="train")
            for n in nodes
        ]
        slowest = 0.0
        for reply in grid.send_and_receive(messages):
            if reply.has_error():
                raise RuntimeError(f"SuperNode {reply.metadata.src_node_id}: {reply.error}")
            self.commit(reply.metadata.src_node_id, reply.content)
            slowest = max(slowest, float(reply.content[STATUS]["seconds"]))
        training = time.perf_counter()
        self.trainer.sync()
        fit(self.trainer, self.trainer.step + server_steps, None, desc="server", progress=False)
        self.trainer.save_checkpoint()
        self.trainer.publish()
        now = time.perf_counter()
        self.timings["round"].append(now - start)
        self.timings["client_training"].append(slowest)
        self.timings["server_training"].append(now - training)

    def sample(self, grid: Grid, nodes: list[int], settings: dict[str, Any]) -> list[dict]:
        """Each client asks for `images` images; the server runs its steps; the client finishes."""
        config = ConfigRecord(settings)
        asks = [
            Message(RecordDict({"config": config}), dst_node_id=n, message_type="query.request")
            for n in nodes
        ]
        start = time.perf_counter()
        finishes = []
        for reply in grid.send_and_receive(asks):
            node = reply.metadata.src_node_id
            body = reply.content["request"]["body"]
            handoff = self.service.sample(self.clients[node], body)
            content = RecordDict({"config": ConfigRecord({"request": body, "handoff": handoff})})
            finishes.append(Message(content, dst_node_id=node, message_type="query.finish"))
        samples = [dict(r.content["samples"]) for r in grid.send_and_receive(finishes)]
        # the clients' requests travel together: each one's share of the whole exchange
        self.timings["sample"].append((time.perf_counter() - start) / max(1, len(nodes)))
        return samples


def wait_for_nodes(grid: Grid, count: int, timeout: float = 120.0) -> list[int]:
    """The ids of `count` connected SuperNodes (waiting up to `timeout` seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= count:
            return nodes[:count]
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(nodes)} SuperNodes connected, waited for {count}")
        time.sleep(0.5)


def run_server(grid: Grid, run_config: dict[str, Any]) -> dict[str, Any]:
    """The whole ServerApp: rounds of training, then sampling on every client; a summary
    (also written to state-dir/flower-run.json)."""
    server = FlowerServer(run_config)
    nodes = wait_for_nodes(grid, int(run_config.get("num-supernodes", 2)))
    rounds = int(run_config.get("rounds", 2))
    client_steps = int(run_config.get("client-steps-per-round", 5))
    for r in range(1, rounds + 1):
        server.train_round(
            grid, nodes, r * client_steps, int(run_config.get("server-steps-per-round", 5))
        )
        logger.info("round %d: server step %d", r, server.trainer.step)
    settings = {
        "images": int(run_config.get("sample-images", 4)),
        "steps": int(run_config.get("num-inference-steps", 10)),
        "guidance": float(run_config.get("guidance-scale", 3.0)),
        "scheduler": str(run_config.get("scheduler", "ddim")),
        "seed": int(run_config.get("seed", 0)),
    }
    samples = server.sample(grid, nodes, settings)
    summary = {
        "rounds": rounds,
        "server_step": server.trainer.step,
        "clients": {str(c): n for n, c in server.clients.items()},
        "samples": samples,
        "seconds_per_round": server.timings["round"],
        "client_training_seconds": server.timings["client_training"],
        "server_training_seconds": server.timings["server_training"],
        "seconds_per_sampling_request": server.timings["sample"],
    }
    (server.state_dir / "flower-run.json").write_text(json.dumps(summary, indent=2))
    return summary


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """Flower's entry point (`flwr run`)."""
    run_server(grid, dict(context.run_config))
