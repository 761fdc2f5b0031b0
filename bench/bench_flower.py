"""Flower's deployment engine against latentfuse's HTTP transport, on loopback, one process
each way, the same tiny model, the same rounds (both with TLS).

    python bench/bench_flower.py [--rounds 2] [--images 2]

Flower: `latentfuse.testing.flower_loopback` (a SuperLink, two SuperNodes with authentication, `flwr
run`); a release round is one train message to each SuperNode and its reply with the release
bytes; its transport share is the round's time less the slowest client's training and the
server's training. HTTP: `latentfuse serve`'s service behind uvicorn with TLS in this process,
the same `ClientJob`s uploading over httpx. A sampling request is the client's request, the
server's steps and the hand-off back (Flower: two messages; HTTP: one POST).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def http_rounds(toml: Path, data: dict, root: Path, rounds: int, args) -> dict:
    """The same rounds over HTTPS: upload seconds per round, seconds per sampling request."""
    from latentfuse.deploy.client.job import ClientJob
    from latentfuse.deploy.client.remote import RemoteServer, read_token
    from latentfuse.deploy.client.remote_sample import finish_remote
    from latentfuse.deploy.config import load_deploy_config, sampling_scheduler
    from latentfuse.deploy.server.app import BackgroundServer
    from latentfuse.deploy.server.auth import TokenBook, issue_tokens
    from latentfuse.deploy.server.service import ServerService
    from latentfuse.deploy.server.trainer import ServerTrainer
    from latentfuse.deploy.wire import SampleRequest
    from latentfuse.pipelines import CollaFuseClientPipeline
    from latentfuse.pipelines.sampling import client_labels
    from latentfuse.testing.flower_loopback import make_tls

    config, deploy = load_deploy_config(str(toml), [])
    tls = make_tls(root / "tls")
    issued = issue_tokens(root / "clients.json", root / "tokens", list(data), iterations=1000)
    service = ServerService(
        config, deploy, TokenBook.load(root / "clients.json"), root / "state", trainer="none"
    )
    trainer = ServerTrainer(config, deploy, root / "state")
    upload, sample = [], []
    with BackgroundServer(service, str(tls["cert"]), str(tls["key"])) as url:
        remotes = {c: RemoteServer(url, read_token(issued[c]), c, tls_ca=tls["ca"]) for c in data}
        jobs = {
            c: ClientJob(config, deploy, c, data[c], root / f"client-{c}", remotes[c]) for c in data
        }
        for r in range(1, rounds + 1):
            for job in jobs.values():
                start = time.perf_counter()  # (a training step would upload what is due first)
                job.upload_due()
                upload.append(time.perf_counter() - start)
                while job.step < r * args.client_steps:
                    job.train_step()
            trainer.sync()
            for _ in range(args.server_steps):
                trainer.train_step()
            trainer.publish()
        for cid, job in jobs.items():
            pipe = CollaFuseClientPipeline.from_pretrained(job.export(), client_id=cid)
            pipe.scheduler = sampling_scheduler("ddim", pipe.scheduler.config)
            pipe.set_progress_bar_config(disable=True)
            seeds = list(range(args.images))
            generators = [torch.Generator().manual_seed(s) for s in seeds]
            labels = client_labels(pipe.collafuse_config, cid, None, len(seeds), generators)
            request = SampleRequest(cid, tuple(seeds), tuple(labels.tolist()), 4, 3.0, "ddim")
            start = time.perf_counter()  # the request, the server's steps, the client's finish
            finish_remote(remotes[cid], pipe, request)
            sample.append(time.perf_counter() - start)
        for remote in remotes.values():
            remote.close()
    return {"upload_seconds": upload, "sampling_request_seconds": sample}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--client-steps", type=int, default=2)
    parser.add_argument("--server-steps", type=int, default=3)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args(argv)

    from latentfuse.testing.flower_loopback import run_loopback
    from tests.test_http_client import client_folder
    from tests.test_http_e2e import CLIENT_CLASSES, deploy_toml
    from tests.worlds import make_tiny_world

    with tempfile.TemporaryDirectory() as tmp:
        root = args.work or Path(tmp)
        world = make_tiny_world(root / "world")
        import os

        os.environ["LATENTFUSE_CACHE"] = str(world["cache"])
        toml = deploy_toml(world, root / "deploy.toml", max_steps=100, checkpoint_every=50)
        data = {
            c: client_folder(world["images"], root / f"data-{c}", classes)
            for c, classes in CLIENT_CLASSES.items()
        }
        flower = run_loopback(
            toml,
            data,
            root / "flower",
            args.rounds,
            args.client_steps,
            args.server_steps,
            args.images,
        )
        http = http_rounds(toml, data, root / "http", args.rounds, args)
    transport = [
        r - c - s
        for r, c, s in zip(
            flower["seconds_per_round"],
            flower["client_training_seconds"],
            flower["server_training_seconds"],
            strict=True,
        )
    ]
    result = {
        "flower_round_seconds": flower["seconds_per_round"],
        "flower_round_transport_seconds": transport,
        "flower_sampling_request_seconds": flower["seconds_per_sampling_request"],
        "http_upload_seconds_per_client_round": http["upload_seconds"],
        "http_sampling_request_seconds": http["sampling_request_seconds"],
        "flower_deployment_wall_seconds": flower["wall_seconds"],
    }
    median = statistics.median
    flower_sample = median(flower["seconds_per_sampling_request"])
    http_sample = median(http["sampling_request_seconds"])
    print(json.dumps(result, indent=2))
    print(
        f"release round: Flower {median(transport):.2f} s of transport and overhead a round "
        f"(the ClientApp process, its imports and model loading included) vs HTTP "
        f"{max(http['upload_seconds']):.3f} s for the largest upload of a client (round 1; "
        f"later rounds upload nothing under `once`); sampling request (the client's request, "
        f"the server's steps, the client finishing and decoding): "
        f"Flower {flower_sample:.2f} s vs HTTP {http_sample:.3f} s "
        f"({flower_sample / http_sample:.0f}x)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
