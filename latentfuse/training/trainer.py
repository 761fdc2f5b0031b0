"""The collaborative training loop of the in-process job (train.py).

How client and server steps interleave: each global step, (1) every client hands the
transport any release that is due (all its images once under `once`; anew at each of its
own epochs under `fresh`), (2) the server takes in what arrived, (3) every client with
timesteps of its own (t_cut > 0) makes one optimiser step on a batch of its own latents,
and (4) the server makes one optimiser step on a batch drawn uniformly over all releases it
holds. Clients with more images therefore weigh more in the server's batches, as they would
in central training, while each client's own steps are independent of its data set size
(each client cycles through its own epochs). The optimiser step itself is the engine's
(`latentfuse.training.engine`), the same one the deployment server and client run.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from accelerate import Accelerator

from latentfuse.method.transport import InProcessTransport
from latentfuse.training.engine import Batch, Engine
from latentfuse.training.setup import Run

logger = logging.getLogger(__name__)


class Trainer:
    """The in-process job's models on one engine, with the clients, server and transport."""

    def __init__(
        self, run: Run, accelerator: Accelerator, output_dir: Path, keep_transport_log: bool = False
    ):
        self.run, self.accelerator, self.output_dir = run, accelerator, Path(output_dir)
        cfg = run.config.train
        world = accelerator.num_processes
        for name in ("server_batch_size", "client_batch_size"):
            if getattr(cfg, name) % world:
                raise ValueError(
                    f"train.{name}={getattr(cfg, name)} must be divisible by the "
                    f"number of processes ({world})"
                )
        self.transport = InProcessTransport(keep_log=keep_transport_log)
        models: dict[str, torch.nn.Module] = {}
        if run.server_unet is not None:
            models["server"] = run.server_unet
        for cid, unet in run.client_unets.items():
            models[f"client_{cid}"] = unet
        rates = {
            name: cfg.learning_rate if name == "server" else cfg.client_learning_rate
            for name in models
        }
        self.engine = Engine(accelerator, models, rates, cfg, run.config.to_dict())
        self.clients = {c.client_id: c for c in run.clients}
        self.latest_losses: dict[str, float] = {}
        self.client_null = run.client_null  # (the empty prompt's states: encoded once)
        self.server_null = run.server_null_label

    @property
    def step(self) -> int:
        """Optimiser steps taken."""
        return self.engine.step

    # ---- one step -------------------------------------------------------------------------
    def exchange_releases(self) -> None:
        """Clients send due releases through the transport; the server takes them in."""
        for client in self.run.clients:
            for message in client.due_releases():
                self.transport.send(message)
        for message in self.transport.receive():
            if self.run.server is not None:
                self.run.server.receive(message)

    def stepping(self) -> list[str]:
        """The models that take an optimiser step this step: the server every step, the
        clients every `train.client_every`-th step (counting from the first)."""
        clients_too = self.engine.step % self.run.config.train.client_every == 0
        return [n for n in self.engine.wrapped if n == "server" or clients_too]

    def global_batches(self, names: list[str] | None = None) -> dict[str, Batch]:
        """This step's global batch for every model in `names` (default: all), drawn from the
        seeded generators."""
        cfg, batches = self.run.config.train, {}
        for name in self.engine.wrapped if names is None else names:
            if name == "server":
                batches[name] = self.run.server.draw_batch(
                    cfg.server_batch_size,
                    cfg.label_dropout,
                    self.server_null,
                    device=self.accelerator.device,
                )
            else:
                client = self.clients[int(name.split("_")[1])]
                batches[name] = client.draw_batch(
                    cfg.client_batch_size, cfg.label_dropout, self.client_null
                )
        return batches

    def train_step(self) -> dict[str, float]:
        """One optimiser step of the models due (`stepping()`, with gradient accumulation);
        returns every model's latest loss (a client's from the last step it took)."""
        names = self.stepping()

        def draw() -> dict[str, Batch]:
            self.exchange_releases()
            return self.global_batches(names)

        self.latest_losses.update(self.engine.train_step(draw, names))
        return dict(self.latest_losses)

    # ---- checkpoints ----------------------------------------------------------------------
    def checkpoint_dir(self) -> Path:
        """Where the resumable state lives."""
        return self.output_dir / "checkpoint"

    def save_checkpoint(self) -> None:
        """Everything exact resume needs (weights, EMA, optimisers, generators, releases)."""
        tensors = {}
        for client in self.run.clients:
            tensors[f"generator.client_{client.client_id}"] = client.generator_state()
        if self.run.server is not None:
            tensors["generator.server"] = self.run.server.generator.get_state()
            for key, value in self.run.server.store.state_tensors().items():
                tensors[f"store.{key}"] = value
        extra = {"clients": {str(c.client_id): c.state() for c in self.run.clients}}
        self.engine.save(self.checkpoint_dir(), extra, tensors)

    def load_checkpoint(self) -> bool:
        """Resume from `checkpoint_dir()` if it exists; returns whether it did."""
        loaded = self.engine.load(self.checkpoint_dir())
        if loaded is None:
            return False
        extra, tensors = loaded
        for client in self.run.clients:
            client.load_state(
                extra["clients"][str(client.client_id)],
                tensors[f"generator.client_{client.client_id}"],
            )
        if self.run.server is not None:
            self.run.server.generator.set_state(tensors["generator.server"])
            self.run.server.store.load_tensors(
                {k[len("store.") :]: v for k, v in tensors.items() if k.startswith("store.")}
            )
        return True

    def ema_models(self) -> dict[str, torch.nn.Module]:
        """Copies of every model carrying its EMA weights."""
        return {name: self.engine.ema_model(name) for name in self.engine.wrapped}
