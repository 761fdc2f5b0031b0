"""The server's training loop over releases as they arrive: train.py's server step, in a thread.

Each step draws a batch from `Server` (the exact objective over every held release) and takes
one optimiser step of `denoising_loss` under Accelerate, with the EMA, warm-up and periodic
`save_state` checkpoints of the in-process Trainer.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from pathlib import Path

import torch

from ..checkpointing import load_state, save_state
from ..config import RunConfig
from ..models import EMA
from ..runner import make_accelerator
from ..server import Server
from ..training import denoising_loss, lr_at, shard

logger = logging.getLogger(__name__)


class ServerTrainer:
    """Owns the shared denoiser, its optimiser and EMA; `store_lock` guards the Server's store."""

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
        self.store_lock, self.ema_lock = store_lock, threading.Lock()
        cfg = config.train
        self.accelerator = make_accelerator(config, Path(state_dir), log=False)
        optimizer = torch.optim.AdamW(
            unet.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay
        )
        self.unet, self.optimizer = self.accelerator.prepare(unet, optimizer)
        self.ema = EMA(self.accelerator.unwrap_model(self.unet), cfg.ema_decay)  # on the device
        self.step, self.state = 0, "idle"
        self.resumed_from: int | None = None
        self.last_checkpoint: dict | None = None
        self.last_loss: float | None = None

    def train_step(self) -> float:
        """One optimiser step (with gradient accumulation) on batches of held releases."""
        accelerator, cfg = self.accelerator, self.config.train
        total = 0.0
        for _ in range(cfg.gradient_accumulation_steps):
            with self.store_lock:
                batch = self.server.draw_batch(
                    cfg.server_batch_size, cfg.label_dropout, self.null_label
                )
            with accelerator.accumulate(self.unet):
                with accelerator.autocast():
                    loss = denoising_loss(self.unet, shard(batch, accelerator, accelerator.device))
                accelerator.backward(loss)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr_at(self.step, cfg.learning_rate, cfg.warmup_steps)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            total += loss.detach().item() / cfg.gradient_accumulation_steps
        if accelerator.sync_gradients:
            with self.ema_lock:
                self.ema.update(accelerator.unwrap_model(self.unet), self.step)
                self.step += 1
        self.last_loss = total
        return total

    def save_checkpoint(self) -> None:
        """Weights, optimiser, EMA, the server's generator and the step, written atomically."""
        with self.ema_lock:
            tensors = self.ema.state_tensors("ema.server")
        tensors["generator.server"] = self.server.generator.get_state()
        with self.store_lock:
            held = len(self.server.store)
        extra = {"step": self.step, "releases_held": held, "unix_time": time.time()}
        save_state(
            self.checkpoint_dir,
            {"server": self.accelerator.unwrap_model(self.unet)},
            {"server": self.optimizer.optimizer},
            extra,
            tensors,
        )
        self.last_checkpoint = extra
        logger.info("checkpoint at step %d (%d releases held)", self.step, held)

    def load_checkpoint(self) -> bool:
        """Resume from `checkpoint_dir` if it holds a checkpoint; returns whether it did."""
        if not (self.checkpoint_dir / "state.json").is_file():
            return False
        extra, tensors = load_state(
            self.checkpoint_dir,
            {"server": self.accelerator.unwrap_model(self.unet)},
            {"server": self.optimizer.optimizer},
        )
        self.ema.load_tensors(tensors, "ema.server")
        self.ema.shadow = {k: v.to(self.accelerator.device) for k, v in self.ema.shadow.items()}
        self.server.generator.set_state(tensors["generator.server"])
        self.step = self.resumed_from = int(extra["step"])
        self.last_checkpoint = extra
        logger.info("resumed from %s at step %d", self.checkpoint_dir, self.step)
        return True

    def ema_model(self) -> torch.nn.Module:
        """A float32 copy of the denoiser carrying the EMA weights (for sampling)."""
        model = copy.deepcopy(self.accelerator.unwrap_model(self.unet)).float()
        with self.ema_lock:
            return self.ema.copy_to(model).eval().requires_grad_(False)

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
