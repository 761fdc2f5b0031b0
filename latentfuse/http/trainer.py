"""The server's training loop over releases as they arrive, on the one engine.

Each step draws a batch from `Server` (the exact objective over every held release) and takes
one `Engine` step: the optimiser, warm-up, EMA and checkpoint layout of the in-process job.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import torch

from ..config import RunConfig
from ..engine import Batch, Engine, make_accelerator
from ..server import Server

logger = logging.getLogger(__name__)


class ServerTrainer:
    """The shared denoiser on an `Engine`; `store_lock` guards the Server's store."""

    def __init__(
        self,
        config: RunConfig,
        server: Server,
        unet: torch.nn.Module,
        null_label: int,
        state_dir: Path,
        store_lock: threading.Lock,
    ):
        self.config, self.server, self.null_label = config, server, null_label
        self.checkpoint_dir = Path(state_dir) / "checkpoint"
        self.store_lock = store_lock
        self.accelerator = make_accelerator(config.train, Path(state_dir))
        self.engine = Engine(
            self.accelerator,
            {"server": unet},
            {"server": config.train.learning_rate},
            config.train,
            config.to_dict(),
        )
        self.state = "idle"
        self.resumed_from: int | None = None
        self.last_checkpoint: dict | None = None
        self.last_loss: float | None = None

    @property
    def step(self) -> int:
        """Optimiser steps taken."""
        return self.engine.step

    def _draw(self) -> dict[str, Batch]:
        cfg = self.config.train
        with self.store_lock:
            batch = self.server.draw_batch(
                cfg.server_batch_size,
                cfg.label_dropout,
                self.null_label,
                device=self.accelerator.device,
            )
        return {"server": batch}

    def train_step(self) -> float:
        """One optimiser step (with gradient accumulation) on batches of held releases."""
        self.last_loss = self.engine.train_step(self._draw)["server"]
        return self.last_loss

    def save_checkpoint(self) -> None:
        """The engine's checkpoint plus the server's generator, written atomically."""
        with self.store_lock:
            held = len(self.server.store)
        extra = {"releases_held": held, "unix_time": time.time()}
        tensors = {"generator.server": self.server.generator.get_state()}
        self.engine.save(self.checkpoint_dir, extra, tensors)
        self.last_checkpoint = {"step": self.step, **extra}
        logger.info("checkpoint at step %d (%d releases held)", self.step, held)

    def load_checkpoint(self) -> bool:
        """Resume from `checkpoint_dir` if it holds a checkpoint; returns whether it did."""
        loaded = self.engine.load(self.checkpoint_dir)
        if loaded is None:
            return False
        extra, tensors = loaded
        self.server.generator.set_state(tensors["generator.server"])
        self.resumed_from = self.step
        self.last_checkpoint = {
            k: extra[k] for k in ("step", "releases_held", "unix_time") if k in extra
        }
        logger.info("resumed from %s at step %d", self.checkpoint_dir, self.step)
        return True

    def ema_model(self) -> torch.nn.Module:
        """A float32 copy of the denoiser carrying the EMA weights (for sampling)."""
        return self.engine.ema_model("server")

    def run(self, stop: threading.Event, poll_seconds: float = 0.2) -> None:
        """Train until `train.max_steps` or `stop`, checkpointing every `train.checkpoint_every`."""
        cfg = self.config.train
        try:
            while not stop.is_set() and self.step < cfg.max_steps:
                with self.store_lock:
                    empty = len(self.server.store) == 0
                if empty:
                    self.state = "waiting for releases"
                    stop.wait(poll_seconds)
                    continue
                self.state = "training"
                self.train_step()
                if self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
            if self.step > 0 and (self.last_checkpoint or {}).get("step") != self.step:
                self.save_checkpoint()
            self.state = "finished" if self.step >= cfg.max_steps else "stopped"
        except Exception as error:  # the HTTP side stays up and reports it in /v1/status
            logger.exception("server training failed")
            self.state = f"failed: {type(error).__name__}: {error}"
