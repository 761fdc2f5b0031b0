"""The Flower ClientApp: a client's job (encode, train, release) and its half of sampling."""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from latentfuse.deploy.flower.task import RELEASES, STATUS, load_settings
from latentfuse.deploy.wire import (
    decode_handoff,
    encode_release,
    encode_sample_request,
)
from latentfuse.training.loop import fit

logger = logging.getLogger(__name__)

app = ClientApp()


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
    from latentfuse.deploy.client.remote_sample import client_text, make_request
    from latentfuse.pipelines import CollaFuseClientPipeline

    cfg = message.content["config"]
    cid, _, work = node_settings(context)
    count = int(cfg["images"])
    client_job(context).export()  # the client's half of the model as trained so far
    pipe = CollaFuseClientPipeline.from_pretrained(work / "model", client_id=cid)
    seeds = [int(cfg["seed"]) * 100_000 + i for i in range(count)]
    request = make_request(
        pipe.collafuse_config,
        cid,
        seeds,
        int(cfg["steps"]),
        float(cfg["guidance"]),
        str(cfg["scheduler"]),
        client_text(work / "model", pipe.collafuse_config),
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
    from latentfuse.deploy.client.remote_sample import client_text, finish_remote
    from latentfuse.deploy.config import sampling_scheduler
    from latentfuse.deploy.wire import decode_sample_request
    from latentfuse.pipelines import CollaFuseClientPipeline

    cfg = message.content["config"]
    cid, _, work = node_settings(context)
    request = decode_sample_request(cfg["request"], 1 << 20)
    pipe = CollaFuseClientPipeline.from_pretrained(work / "model", client_id=cid)
    pipe.scheduler = sampling_scheduler(request.scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    text = client_text(work / "model", pipe.collafuse_config)
    images = finish_remote(_HandOffChannel(cfg["handoff"]), pipe, request, text=text)
    out = work / "flower-samples.png"
    save_image(make_grid(images * 2 - 1, columns=min(8, len(images))), out)
    digest = hashlib.sha256(images.numpy().tobytes()).hexdigest()
    reply = ConfigRecord({"images": len(images), "sha256": digest})  # the images stay here
    return Message(RecordDict({"samples": reply}), reply_to=message)
