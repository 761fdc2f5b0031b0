"""The server's half of sampling, in the web process or in sampling processes of its own.

A sampling request is seconds of denoiser work in Python and torch. Run in threads of the web
process it holds the interpreter lock between torch calls, and every upload and status call
waits for it; `deploy.sampling_processes = N` (the default, 2) moves it into N child processes
that run at `deploy.sampling_niceness` (so the operating system serves the front's ingest and
status first). Each process holds its own copy of the newest published weights and reloads them
when the trainer publishes new ones; in thread-trainer mode the live EMA exists only in the web
process, so sampling stays there. Both kinds answer `sample(client_id, request) -> bytes` with
the same bytes for the same request and weights.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from latentfuse.conditioning import TextConditioner, load_text
from latentfuse.config import RunConfig
from latentfuse.deploy.conditioning import WireConditioning
from latentfuse.deploy.config import DeployConfig, sampling_scheduler
from latentfuse.deploy.server.trainer import PUBLISHED, ServerTrainer, build_server_unet
from latentfuse.deploy.wire import SampleRequest, WireError, encode_handoff
from latentfuse.method.schedule import make_scheduler
from latentfuse.pipelines import CollaFuseServerPipeline
from latentfuse.pipelines.folder import load_unet

logger = logging.getLogger(__name__)

START_SECONDS = 300.0  # a sampling process builds its sampler within this (imports, weights)
POLL_SECONDS = 0.1  # how often a waiting request looks at its client and its time limit


class LocalSampler:
    """Sampling in the calling thread, with the newest weights: the live EMA of a trainer
    thread, else the newest published weights (reloaded when a new version appears), else the
    initial ones."""

    def __init__(
        self,
        config: RunConfig,
        deploy: DeployConfig,
        state_dir: Path,
        description: dict[str, Any],
        init_from: Path | None = None,
        live: ServerTrainer | None = None,
    ):
        self.config, self.deploy, self.state_dir = config, deploy, Path(state_dir)
        self.description, self.init_from, self.live = description, init_from, live
        self.scheduler_config = make_scheduler(config).config
        self._snapshot: tuple[object, torch.nn.Module] | None = None
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(deploy.max_concurrent_sampling)
        self.conditioning = WireConditioning.of(config, deploy)
        self._text: TextConditioner | None = None

    def request_conditioning(
        self, request: SampleRequest
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(rows, null) of a request's attributes or prompts (None for class labels): the
        prompts' token states under the public text encoder, loaded at the first one."""
        if request.attributes is not None:
            rows = torch.tensor(request.attributes, dtype=torch.float32) * 2 - 1
            return rows, self.conditioning.null()
        if request.prompts is not None:
            if self._text is None:
                self._text = load_text(self.config)
            return self._text.embed(list(request.prompts)), self.conditioning.null(self._text)
        return None, None

    def published(self) -> tuple[object, Path] | None:
        """(version, folder) of the newest weights a trainer published, if any."""
        record = self.state_dir / PUBLISHED / "published.json"
        try:
            return (
                record.stat().st_mtime_ns,
                json.loads(record.read_text())["step"],
            ), record.parent
        except (OSError, ValueError, KeyError):  # none yet, or being replaced this instant
            return None

    def unet(self) -> torch.nn.Module:
        """The denoiser to sample with now."""
        with self._lock:
            load: Callable[[], torch.nn.Module]
            if self.live is not None:
                version, load = ("live", self.live.step), self.live.ema_model
            else:
                published = self.published()
                if published is not None:
                    version, folder = published
                    load = lambda: self._load_published(folder)  # noqa: E731
                else:
                    version = ("initial",)
                    load = lambda: build_server_unet(  # noqa: E731
                        self.config, self.deploy, self.init_from
                    ).eval()
            if self._snapshot is None or self._snapshot[0] != version:
                self._snapshot = (version, load())
            return self._snapshot[1]

    def _load_published(self, folder: Path) -> torch.nn.Module:
        return load_unet(folder / "server_unet").eval().requires_grad_(False)

    def sample(
        self,
        client_id: int,
        request: SampleRequest,
        cancelled: Callable[[], bool] | None = None,
    ) -> bytes:
        """The server's steps (t >= t_cut) of one chain per seed; the encoded hand-off. A thread
        cannot be stopped: `cancelled` is for the process sampler's signature only."""
        scheduler = sampling_scheduler(request.scheduler, self.scheduler_config)
        pipe = CollaFuseServerPipeline(scheduler, self.unet(), self.description)
        pipe.set_progress_bar_config(disable=True)
        generators = [torch.Generator().manual_seed(s) for s in request.seeds]
        with self._slots:  # bounds the memory and compute of concurrent requests
            rows, null = self.request_conditioning(request)
            handoff = pipe(
                client_id=client_id,
                class_labels=list(request.class_labels),
                num_inference_steps=request.num_inference_steps,
                guidance_scale=float(request.guidance_scale),
                generator=generators,
                conditioning=rows,
                null_conditioning=null,
            )
        states = [g.get_state() for g in generators]
        return encode_handoff(handoff, states, fp16=self.deploy.fp16_wire)

    def close(self) -> None:
        """Nothing to release."""


# ---- sampling processes -------------------------------------------------------------------------
def _serve(connection, arguments: dict[str, Any], niceness: int) -> None:
    """A sampling process: lower its priority, build its sampler, answer requests one at a time
    ("ok", bytes) or ("error", (status, code, message)) until the pipe closes."""
    if niceness:
        os.nice(niceness)
    sampler = LocalSampler(**arguments)
    sampler.unet()  # load the weights now, not on the first request
    connection.send(("ready", os.getpid()))
    while True:
        try:
            client_id, request = connection.recv()
        except (EOFError, OSError):
            return
        try:
            connection.send(("ok", sampler.sample(client_id, request)))
        except WireError as error:
            connection.send(("error", (error.status, error.code, str(error))))
        except Exception as error:  # noqa: BLE001 (reported to the request, the process lives on)
            logger.exception("sampling failed")
            connection.send(("error", (500, "sampling_failed", f"{type(error).__name__}: {error}")))


@dataclass
class _Worker:
    process: Any  # multiprocessing.Process
    connection: Any  # its end of the pipe


class ProcessSampler:
    """Sampling in `deploy.sampling_processes` child processes (spawned: no forked locks or
    threads), one request per process at a time. A request whose client hangs up, or that runs
    past `deploy.sampling_timeout_seconds`, is stopped by ending its process, and a new one
    takes its place: the work is not done for nobody and the place is free again. A process
    that dies is replaced and the request that was in it answers 503."""

    def __init__(self, **arguments: Any):
        """`arguments`: a LocalSampler's, without `live` (each process builds one)."""
        self.arguments = arguments
        deploy: DeployConfig = arguments["deploy"]
        self.niceness, self.timeout = deploy.sampling_niceness, deploy.sampling_timeout_seconds
        self._context = multiprocessing.get_context("spawn")
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._workers: dict[int, _Worker] = {}  # pid -> every live sampling process
        self._lock = threading.Lock()
        workers = [self._spawn() for _ in range(deploy.sampling_processes)]
        for worker in workers:  # a broken config fails here, at start-up, not on a request
            self._idle.put(self._ready(worker))

    def _spawn(self) -> _Worker:
        mine, theirs = self._context.Pipe()
        process = self._context.Process(
            target=_serve, args=(theirs, self.arguments, self.niceness), daemon=True
        )
        process.start()
        theirs.close()
        return _Worker(process, mine)

    def _ready(self, worker: _Worker) -> _Worker:
        if not worker.connection.poll(START_SECONDS):
            worker.process.kill()
            raise RuntimeError(f"a sampling process did not start within {START_SECONDS} s")
        kind, pid = worker.connection.recv()
        if kind != "ready":
            raise RuntimeError(f"a sampling process failed to start: {pid}")
        with self._lock:
            self._workers[worker.process.pid] = worker
        return worker

    def _replace(self, worker: _Worker) -> None:
        """End `worker` (if it still runs) and put a new process in its place, in the
        background: the request that ended it answers at once."""
        worker.process.kill()
        worker.process.join(5)
        worker.connection.close()
        with self._lock:
            self._workers.pop(worker.process.pid, None)

        def start() -> None:
            try:
                self._idle.put(self._ready(self._spawn()))
            except RuntimeError:
                logger.exception("a replacement sampling process failed to start")

        threading.Thread(target=start, name="sampler-replace", daemon=True).start()

    def pids(self) -> set[int]:
        """The process ids of the sampling processes."""
        with self._lock:
            return set(self._workers)

    def sample(
        self,
        client_id: int,
        request: SampleRequest,
        cancelled: Callable[[], bool] | None = None,
    ) -> bytes:
        """The encoded hand-off; WireError 503 if the process died, 503 `timed_out` past the
        time limit, 499 `cancelled` when `cancelled()` turns true (the client hung up)."""
        worker = self._idle.get()  # admission bounds who waits here
        try:
            worker.connection.send((client_id, request))
        except (OSError, BrokenPipeError):
            self._replace(worker)
            raise WireError("a sampling process died; retry", 503, "overloaded") from None
        deadline = time.monotonic() + self.timeout if self.timeout else None
        while True:
            try:
                answered = worker.connection.poll(POLL_SECONDS)
            except (OSError, EOFError):
                answered = False
            if answered:
                try:
                    kind, payload = worker.connection.recv()
                except (EOFError, OSError):
                    self._replace(worker)
                    raise WireError(
                        "a sampling process died during this request; retry", 503, "overloaded"
                    ) from None
                self._idle.put(worker)
                if kind == "ok":
                    return payload
                status, code, message = payload
                raise WireError(message, status, code)
            if not worker.process.is_alive():
                self._replace(worker)
                raise WireError(
                    "a sampling process died during this request; retry", 503, "overloaded"
                )
            if cancelled is not None and cancelled():
                self._replace(worker)
                raise WireError("the client closed the connection", 499, "cancelled")
            if deadline is not None and time.monotonic() > deadline:
                self._replace(worker)
                raise WireError(
                    f"sampling took longer than deploy.sampling_timeout_seconds = "
                    f"{self.timeout:g} s and was stopped: ask for fewer images or steps",
                    503,
                    "timed_out",
                    retry_after=1,
                )

    def close(self) -> None:
        """Stop the sampling processes (a request still in one ends with it)."""
        with self._lock:
            workers, self._workers = list(self._workers.values()), {}
        for worker in workers:
            worker.connection.close()
            worker.process.join(2)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(2)
