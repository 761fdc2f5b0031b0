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
import threading
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
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

    def sample(self, client_id: int, request: SampleRequest) -> bytes:
        """The server's steps (t >= t_cut) of one chain per seed; the encoded hand-off."""
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
_WORKER: LocalSampler | None = None


def _start_worker(arguments: dict[str, Any], niceness: int) -> None:
    """Runs once in each sampling process: lower its priority, build its sampler."""
    global _WORKER
    if niceness:
        os.nice(niceness)
    _WORKER = LocalSampler(**arguments)
    _WORKER.unet()  # load the weights now, not on the first request


def _sample_in_worker(client_id: int, request: SampleRequest) -> bytes:
    return _WORKER.sample(client_id, request)


def _ready() -> int:
    return os.getpid()


class ProcessSampler:
    """Sampling in `deploy.sampling_processes` child processes (spawned: no forked locks or
    threads); a process that dies is replaced and the request that was in it answers 503."""

    def __init__(self, **arguments: Any):
        """`arguments`: a LocalSampler's, without `live` (each process builds one)."""
        self.arguments = arguments
        deploy: DeployConfig = arguments["deploy"]
        self.processes, self.niceness = deploy.sampling_processes, deploy.sampling_niceness
        self._lock = threading.Lock()
        self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        pool = ProcessPoolExecutor(
            self.processes,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_worker,
            initargs=(self.arguments, self.niceness),
        )
        for future in [pool.submit(_ready) for _ in range(self.processes)]:
            future.result()  # a broken config fails here, at start-up, not on a request
        return pool

    def submit(self, function: Callable[..., Any], *args: Any) -> Future:
        """Run `function(*args)` in a sampling process (a new pool if one of its processes
        died); its future."""
        with self._lock:
            try:
                return self._pool.submit(function, *args)
            except BrokenProcessPool:
                logger.error("a sampling process died; starting new ones")
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = self._new_pool()
                return self._pool.submit(function, *args)

    def pids(self) -> set[int]:
        """The process ids of the sampling processes."""
        return {self.submit(_ready).result() for _ in range(self.processes)}

    def sample(self, client_id: int, request: SampleRequest) -> bytes:
        """The encoded hand-off (blocks until a process has run it); 503 if the process died
        meanwhile (the next request gets a new one)."""
        try:
            return self.submit(_sample_in_worker, client_id, request).result()
        except BrokenProcessPool:
            raise WireError(
                "a sampling process died during this request; retry", 503, "overloaded"
            ) from None

    def close(self) -> None:
        """Stop the sampling processes."""
        self._pool.shutdown(wait=True, cancel_futures=True)
