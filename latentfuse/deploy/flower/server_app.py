"""The Flower ServerApp: rounds of releases and server training, then sampling requests."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

# The server side is imported when the app loads, not when it first runs: Flower's simulation
# engine runs the ServerApp in an isolated runtime environment set up after loading, where a
# first import of diffusers finds no torch and exports no schedulers (measured: ImportError
# for DDPMScheduler, exit code 607).
from latentfuse.deploy.flower.task import RELEASES, STATUS, load_settings
from latentfuse.deploy.server.auth import TokenBook
from latentfuse.deploy.server.service import ServerService
from latentfuse.deploy.server.trainer import ServerTrainer
from latentfuse.training.loop import fit

logger = logging.getLogger(__name__)

server_app = ServerApp()


# ---- the ServerApp ---------------------------------------------------------------------------
class FlowerServer:
    """The server's side: `ServerService` checks and commits what arrives, `ServerTrainer`
    trains; the same objects `latentfuse serve` runs behind its HTTP routes."""

    def __init__(self, run_config: dict[str, Any]) -> None:
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
