"""The deployment server's trainer: releases from the durable store in, published weights out.

It meets the web front only in the state folder: it reads the releases the front committed
(`releases.db`), trains the shared denoiser on the one engine (the optimiser, warm-up, EMA and
checkpoint layout of train.py), publishes the EMA weights to `published/` for the front to
sample with, and reports its progress in `trainer.json`. The same object runs in a thread of
the front (`latentfuse serve`, the default) or as its own process under `accelerate launch`
(`latentfuse serve --trainer-processes N`, or `latentfuse.deploy.server.train_server` by hand).

Data parallelism: at every step the main process reads how far the store goes and tells the
others, so every process holds the same releases and draws the same global batch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from latentfuse.checkpointing import atomic_write_dir, atomic_write_json
from latentfuse.conditioning import load_text
from latentfuse.config import RunConfig
from latentfuse.deploy.conditioning import WireConditioning
from latentfuse.deploy.config import DeployConfig, latent_shape
from latentfuse.deploy.server.store import ReleaseDatabase
from latentfuse.method.schedule import client_split, make_scheduler
from latentfuse.method.server import ReleaseStore, Server
from latentfuse.training.engine import Batch, Engine, make_accelerator
from latentfuse.training.jobs import server_denoiser
from latentfuse.training.loop import Hooks, fit
from latentfuse.training.pretrained import save_denoiser

logger = logging.getLogger(__name__)

DATABASE = "releases.db"
PUBLISHED = "published"
STATUS = "trainer.json"
HISTORY = "history"  # past checkpoints, to roll back to when releases are removed
INITIAL = "step-00000000"  # the weights before any release: kept whatever the history's size


def build_server_unet(
    config: RunConfig, deploy: DeployConfig, init_from: Path | None = None
) -> torch.nn.Module:
    """The shared denoiser, seeded as train.py seeds it, or with the weights of a model folder."""
    channels, size, _ = latent_shape(config)
    unet = server_denoiser(config, WireConditioning.of(config, deploy).spec, size, channels)
    if init_from is not None:
        from safetensors.torch import load_file

        weights = Path(init_from) / "server_unet" / "diffusion_pytorch_model.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(f"--init-from: no server denoiser weights at {weights}")
        unet.load_state_dict(load_file(weights))
    return unet


def server_splits(config: RunConfig) -> dict:
    """Every client's cut as the server sees it (raised in the formal-privacy mode)."""
    scheduler = make_scheduler(config)
    return {c: client_split(config, scheduler, c) for c in range(config.data.num_clients)}


def refuse_an_older_database(state_dir: Path) -> None:
    """ValueError, before any writer opens the database (a read-write open would checkpoint its
    WAL into it), when the checkpoint was trained on uploads the database does not hold: a
    state folder restored from an older backup. Read-only: a refusal changes no file."""
    import json
    import sqlite3

    record, database = state_dir / "checkpoint" / "state.json", state_dir / DATABASE
    if not (record.is_file() and database.is_file()):
        return
    try:
        seen = int(json.loads(record.read_text())["extra"].get("seen", 0))
    except (ValueError, KeyError, TypeError):
        return  # a corrupt checkpoint is named when it is loaded
    # without a -wal file the database file holds every commit: "immutable" reads it and makes
    # no -wal/-shm; with one, a read-only open reads its frames too
    wal = database.with_name(database.name + "-wal").exists()
    mode = "mode=ro" if wal else "immutable=1"
    try:
        with contextlib.closing(sqlite3.connect(f"file:{database}?{mode}", uri=True)) as db:
            tables = db.execute("SELECT name FROM sqlite_master WHERE name = 'uploads'")
            newest = 0  # a database not yet holding the uploads table holds no upload
            if tables.fetchone():
                newest = db.execute("SELECT COALESCE(MAX(seq), 0) FROM uploads").fetchone()[0]
    except sqlite3.DatabaseError:
        return  # an unreadable database is named when it is opened
    if seen > newest:
        raise older_database(database, newest, record.parent, seen)


def older_database(database: Path, newest: int, checkpoint: Path, seen: int) -> ValueError:
    """The refusal of a database older than the checkpoint trained on it."""
    return ValueError(
        f"{database} holds uploads up to {newest}, but {checkpoint} was trained on uploads up "
        f"to {seen}: the database is older than the model (restored from an old backup?). "
        "Restore the newer database, or move the checkpoint aside to train from the start; "
        "nothing was changed"
    )


def server_null(config: RunConfig, deploy: DeployConfig) -> int | torch.Tensor:
    """The server's null conditioning (label dropout): the id after the clients' under
    server_labels "client", else the null of the images' conditioning (for text, the empty
    prompt's states under the public encoder; unused under "none")."""
    if config.server_labels == "client":
        return config.data.num_clients
    conditioning = WireConditioning.of(config, deploy)
    if conditioning.kind == "class":
        return deploy.num_classes
    text = load_text(config) if config.server_labels == "class" else None
    if conditioning.kind == "text" and text is None:
        return torch.zeros(conditioning.token_shape)  # never drawn: no conditioning arrives
    return conditioning.null(text)


class ServerTrainer:
    """The shared denoiser on an `Engine`, fed from the release database of `state_dir`."""

    def __init__(
        self,
        config: RunConfig,
        deploy: DeployConfig,
        state_dir: str | Path,
        init_from: str | Path | None = None,
        accelerator: Accelerator | None = None,
    ):
        self.config, self.deploy, self.state_dir = config, deploy, Path(state_dir)
        self.server = Server(
            server_splits(config),
            config.split.objective,
            config.split.weighting,
            config.server_labels,
            seed=config.train.seed,
            timestep_density=config.split.server_timesteps,
            balance=deploy.balance,
        )
        refuse_an_older_database(self.state_dir)  # before the database is opened for writing
        self.database = ReleaseDatabase(self.state_dir / DATABASE, latent_shape(config))
        self.null_label = server_null(config, deploy)
        self.checkpoint_dir = self.state_dir / "checkpoint"
        self.accelerator = accelerator or make_accelerator(config.train, self.state_dir)
        unet = build_server_unet(config, deploy, Path(init_from) if init_from else None)
        self.engine = Engine(
            self.accelerator,
            {"server": unet},
            {"server": config.train.learning_rate},
            config.train,
            config.to_dict(),
            group_clip={"server": deploy.client_gradient_clip},
        )
        self.seen = 0  # uploads up to this sequence number are in the server's store
        self.trained_on = 0  # ... and up to this one had reached the store by the last step
        self.removals = self.database.removal_version()
        self.rolled_back: dict | None = None
        self.state = "idle"
        self.resumed_from: int | None = None
        self.last_checkpoint: dict | None = None
        self.last_loss: float | None = None
        self._status_written = 0.0

    @property
    def step(self) -> int:
        """Optimiser steps taken."""
        return self.engine.step

    # ---- releases in ---------------------------------------------------------------------------
    def sync(self, stop: threading.Event | None = None) -> bool:
        """Take the uploads committed since the last call into the store; whether to stop. The
        main process decides both for every process (a signal may reach them at other times)."""
        decision = [0, False, 0]
        if self.accelerator.is_main_process:
            stopping = stop is not None and stop.is_set()
            decision = [self.database.max_seq(), stopping, self.database.removal_version()]
        if self.accelerator.num_processes > 1:
            broadcast_object_list(decision)  # every process reads the same uploads
        removed_from = None
        if decision[2] != self.removals:  # an operator removed releases: start the store over
            removed_from = self.database.first_removed_seq(self.removals, decision[2])
            self.server.store, self.seen, self.removals = ReleaseStore(), 0, decision[2]
            logger.info("releases were removed: the store is read again")
        for batch in self.database.read_since(self.seen, decision[0]):
            self.server.receive(batch)
        self.seen = max(self.seen, decision[0])
        if removed_from is not None and self.trained_on >= removed_from:
            self.roll_back(removed_from)
        return bool(decision[1])

    def roll_back(self, removed_from: int) -> None:
        """Go back to the newest kept checkpoint trained on no upload from `removed_from` on
        (the first removed one), so that weights trained on removed releases are not kept:
        its weights, optimiser, EMA and step; the newer kept checkpoints are dropped and the
        rolled-back state is checkpointed and published at once."""
        history = self.state_dir / HISTORY
        kept = sorted(history.glob("step-*"), reverse=True) if history.is_dir() else []
        older = [d for d in kept if _seen_of(d) < removed_from]
        if not older:
            logger.warning(
                "no kept checkpoint predates upload %d (deploy.roll_back_checkpoints = %d): the "
                "weights keep what they learned from the removed releases",
                removed_from,
                self.deploy.roll_back_checkpoints,
            )
            return
        before = self.step
        _, tensors = self.engine.load(older[0])
        self.server.generator.set_state(tensors["generator.server"])
        if self.accelerator.is_main_process:
            for newer in kept[: kept.index(older[0])]:
                shutil.rmtree(newer, ignore_errors=True)
        self.trained_on = _seen_of(older[0])
        self.rolled_back = {"from_step": before, "to_step": self.step, "removed_from": removed_from}
        logger.warning(
            "rolled back from step %d to step %d (%s, trained on uploads before %d, the first "
            "removed one)",
            before,
            self.step,
            older[0].name,
            removed_from,
        )
        self.save_checkpoint()

    def _draw(self) -> dict[str, Batch]:
        cfg = self.config.train
        batch = self.server.draw_batch(
            cfg.server_batch_size,
            cfg.label_dropout,
            self.null_label,
            device=self.accelerator.device,
        )
        return {"server": batch}

    def train_step(self) -> float:
        """One optimiser step (with gradient accumulation) on batches of held releases."""
        self.trained_on = self.seen
        self.last_loss = self.engine.train_step(self._draw)["server"]
        return self.last_loss

    # ---- weights and state out -----------------------------------------------------------------
    def save_checkpoint(self) -> None:
        """The engine's checkpoint plus the server's generator, then the published weights."""
        extra = {
            "releases_held": len(self.server.store),
            "seen": self.seen,  # the newest upload trained on: a restored older database shows
            "trained_on": self.trained_on,  # what a roll-back compares with the removed uploads
            "removals": self.removals,  # removals since: rolled back at the next start
            "unix_time": time.time(),
        }
        tensors = {"generator.server": self.server.generator.get_state()}
        self.engine.save(self.checkpoint_dir, extra, tensors)
        self.last_checkpoint = {"step": self.step, **extra}
        self.keep_history()
        self.publish()
        logger.info("checkpoint at step %d (%d releases held)", self.step, len(self.server.store))

    def keep_history(self, initial: bool = False) -> None:
        """Keep a copy of `checkpoint/` in `history/` for a roll-back: the newest
        `deploy.roll_back_checkpoints` and the initial weights (`initial`: write those, before
        any step, once)."""
        keep = self.deploy.roll_back_checkpoints
        target = self.state_dir / HISTORY / (INITIAL if initial else f"step-{self.step:08d}")
        if keep == 0 or (initial and target.is_dir()):
            return
        if initial:  # every process saves (the engine waits for all)
            extra = {"seen": 0, "trained_on": 0, "removals": self.removals}
            tensors = {"generator.server": self.server.generator.get_state()}
            self.engine.save(target, extra, tensors)
            return
        if not self.accelerator.is_main_process:
            return
        atomic_write_dir(
            target, lambda tmp: shutil.copytree(self.checkpoint_dir, tmp, dirs_exist_ok=True)
        )
        later = [d for d in sorted(target.parent.glob("step-*")) if d.name != INITIAL]
        for old in later[:-keep]:
            shutil.rmtree(old, ignore_errors=True)

    def publish(self) -> None:
        """Write the EMA weights to `published/` (atomically) for the front to sample with."""
        if not self.accelerator.is_main_process:
            return
        model = self.ema_model()

        def write(tmp: Path) -> None:  # merged: what the sampler loads (LoRA adapters folded in)
            save_denoiser(model, tmp / "server_unet", merge=True)
            record = {"step": self.step, "trained_on": self.trained_on, "unix_time": time.time()}
            atomic_write_json(tmp / "published.json", record)

        atomic_write_dir(self.state_dir / PUBLISHED, write)

    def load_checkpoint(self) -> bool:
        """Resume from `checkpoint_dir` if it holds a checkpoint; returns whether it did."""
        loaded = self.engine.load(self.checkpoint_dir)
        if loaded is None:
            return False
        extra, tensors = loaded
        newest = self.database.max_seq()
        if extra.get("seen", 0) > newest:  # a checkpoint written since the read-only check
            raise older_database(self.database.path, newest, self.checkpoint_dir, extra["seen"])
        self.server.generator.set_state(tensors["generator.server"])
        self.trained_on = int(extra.get("trained_on", extra.get("seen", 0)))
        self.removals = int(extra.get("removals", self.removals))  # removed while it was down
        self.resumed_from = self.step
        self.last_checkpoint = {
            k: extra[k] for k in ("step", "releases_held", "unix_time") if k in extra
        }
        logger.info("resumed from %s at step %d", self.checkpoint_dir, self.step)
        return True

    def ema_model(self) -> torch.nn.Module:
        """A float32 copy of the denoiser carrying the EMA weights (for sampling)."""
        return self.engine.ema_model("server")

    def status(self) -> dict:
        """What the front reports of training."""
        return {
            "step": self.step,
            "training": self.state,
            "last_loss": self.last_loss,
            "last_checkpoint": self.last_checkpoint,
            "resumed_from_step": self.resumed_from,
            "skipped_steps": self.engine.skipped.get("server", 0),
            "rolled_back": self.rolled_back,
            "processes": self.accelerator.num_processes,
            "pid": os.getpid(),
            "unix_time": time.time(),
        }

    def write_status(self, force: bool = False) -> None:
        """`trainer.json`, at most once a second unless `force`."""
        now = time.monotonic()
        if self.accelerator.is_main_process and (force or now - self._status_written > 1.0):
            atomic_write_json(self.state_dir / STATUS, self.status())
            self._status_written = now

    def run(self, stop: threading.Event, poll_seconds: float = 0.2) -> None:
        """Train until `train.max_steps` or `stop`, checkpointing (and publishing) every
        `train.checkpoint_every` steps and on the way out."""
        cfg = self.config.train

        def ready() -> bool:
            self.state = "training" if len(self.server.store) else "waiting for releases"
            return bool(len(self.server.store))

        def wait() -> None:
            self.write_status()
            stop.wait(poll_seconds)

        def after_step(step: int, losses: dict[str, float]) -> None:
            if step % cfg.checkpoint_every == 0:
                self.save_checkpoint()
            self.write_status()

        hooks = Hooks(
            should_stop=lambda: self.sync(stop), ready=ready, wait=wait, after_step=after_step
        )
        if self.step == 0:
            self.keep_history(initial=True)
        try:  # the front reports progress in /v1/status (trainer.json), not a progress bar
            fit(self, cfg.max_steps, None, hooks, desc="server", progress=False)
            if self.step > 0 and (self.last_checkpoint or {}).get("step") != self.step:
                self.save_checkpoint()
            self.state = "finished" if self.step >= cfg.max_steps else "stopped"
        except Exception as error:  # the front stays up and reports it in /v1/status
            logger.exception("server training failed")
            self.state = f"failed: {type(error).__name__}: {error}"
        self.write_status(force=True)


def _seen_of(checkpoint: Path) -> int:
    """The newest upload a kept checkpoint may have trained on (its `trained_on`)."""
    extra = json.loads((checkpoint / "state.json").read_text())["extra"]
    return int(extra.get("trained_on", extra.get("seen", 0)))
