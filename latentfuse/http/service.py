"""The server's state behind the HTTP routes: tokens, the release log, training and sampling.

Every request that changes state is checked in full first; a release is persisted, then added
to the `Server`'s store, then acknowledged. After a restart the log is replayed into the store
and training resumes from the last checkpoint.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..config import RunConfig
from ..description import client_entry, model_description
from ..models import build_unet
from ..pipelines import CollaFuseServerPipeline
from ..schedule import client_split, make_scheduler
from ..server import Server
from ..split import DiffusionSplit
from ..transport import ReleaseBatch
from .auth import TokenBook
from .deploy import DeployConfig, latent_shape, sampling_scheduler
from .persist import UPLOAD_ID, DuplicateUpload, ReleaseLog
from .trainer import ServerTrainer
from .wire import (
    WIRE_VERSION,
    WireError,
    decode_release,
    decode_sample_request,
    encode_handoff,
)

logger = logging.getLogger(__name__)


def server_description(
    config: RunConfig, deploy: DeployConfig, splits: dict[int, DiffusionSplit]
) -> dict[str, Any]:
    """The collafuse.json the server half pipeline needs, at each client's effective cut
    (`splits`, from `client_split`: raised in the formal-privacy mode); every class is allowed
    to every client."""
    classes = range(deploy.num_classes)
    entries = {
        cid: client_entry(config, split, classes, deploy.class_names)
        for cid, split in splits.items()
    }
    alphas_cumprod = next(iter(splits.values())).alphas_cumprod
    return model_description(config, deploy.class_names, entries, alphas_cumprod)


def build_server_unet(
    config: RunConfig, deploy: DeployConfig, init_from: Path | None = None
) -> torch.nn.Module:
    """The shared denoiser, seeded as train.py seeds it, or with the weights of a model folder."""
    channels, size, _ = latent_shape(config)
    num_embeds = {
        "class": deploy.num_classes + 1,
        "client": config.data.num_clients + 1,
        "none": None,
    }[config.server_labels]
    torch.manual_seed(config.train.seed * 1000)
    unet = build_unet(config.server_unet, size, channels, num_embeds)
    if init_from is not None:
        from safetensors.torch import load_file

        weights = Path(init_from) / "server_unet" / "diffusion_pytorch_model.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(f"--init-from: no server denoiser weights at {weights}")
        unet.load_state_dict(load_file(weights))
    return unet


class ServerService:
    """Everything the routes call; thread-safe (the store and the log share one lock)."""

    def __init__(
        self,
        config: RunConfig,
        deploy: DeployConfig,
        tokens: TokenBook,
        state_dir: str | Path,
        train: bool = True,
        init_from: str | Path | None = None,
    ):
        self.config, self.deploy, self.tokens, self.train = config, deploy, tokens, train
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        bad = [c for c in tokens.client_ids if c >= config.data.num_clients]
        if bad:
            raise ValueError(
                f"clients file lists ids {bad}, but data.num_clients={config.data.num_clients}"
            )
        self.scheduler = make_scheduler(config)
        splits = {
            cid: client_split(config, self.scheduler, cid) for cid in range(config.data.num_clients)
        }
        if all(s.is_independent for s in splits.values()):
            raise ValueError("every client has t_cut = T: there is nothing for a server to do")
        self.server = Server(
            splits,
            config.split.objective,
            config.split.weighting,
            config.server_labels,
            seed=config.train.seed,
        )
        self.latent_shape = latent_shape(config)
        self.description = server_description(config, deploy, splits)
        self.lock = threading.Lock()  # guards the Server's store (uploads vs training batches)
        self.log = ReleaseLog(self.state_dir / "releases")
        for entry in self.log.entries():  # replay: the store is rebuilt from the durable log
            body = self.log.read(entry)
            self.server.receive(decode_release(body, len(body), deploy.max_images_per_client))
        null_label = (
            config.data.num_clients if config.server_labels == "client" else deploy.num_classes
        )
        unet = build_server_unet(config, deploy, Path(init_from) if init_from else None)
        self.trainer = ServerTrainer(
            config, self.server, unet, null_label, self.state_dir, self.lock
        )
        self.trainer.load_checkpoint()
        self._stop, self._thread = threading.Event(), None
        self._snapshot: tuple[int, torch.nn.Module] | None = None
        self._snapshot_lock = threading.Lock()
        self._sampling_slots = threading.BoundedSemaphore(deploy.max_concurrent_sampling)
        logger.info("replayed %d uploads (%d releases)", len(self.log), len(self.server.store))

    # ---- life cycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """Start the background training thread (unless training is disabled)."""
        if self.train and self._thread is None:
            self._thread = threading.Thread(
                target=self.trainer.run, args=(self._stop,), name="server-training", daemon=True
            )
            self._thread.start()
        elif not self.train:
            self.trainer.state = "disabled"

    def stop(self) -> None:
        """Stop training after its current step (it checkpoints on the way out)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        logger.info(
            "stopped at step %d with %d releases held", self.trainer.step, len(self.server.store)
        )

    # ---- requests ------------------------------------------------------------------------------
    def authenticate(self, client_id: int, token: str | None) -> None:
        """WireError 401 unless `token` is client `client_id`'s token."""
        if not token:
            raise WireError(
                "missing bearer token (Authorization: Bearer <token>)", 401, "unauthorized"
            )
        if client_id not in self.tokens.credentials:
            raise WireError(f"unknown client {client_id}", 401, "unauthorized")
        if not self.tokens.verify(client_id, token):
            raise WireError(f"bad token for client {client_id}", 401, "unauthorized")

    def authenticate_any(self, token: str | None) -> int:
        """The id of the client whose token this is; WireError 401 if none."""
        client_id = self.tokens.claimed_id(token) if token else None
        if client_id is None or not self.tokens.verify(client_id, token):
            raise WireError("missing or unknown bearer token", 401, "unauthorized")
        return client_id

    def check_release(self, client_id: int, batch: ReleaseBatch) -> None:
        """WireError unless the server can take `batch` from `client_id` as it is."""
        if batch.client_id != client_id:
            raise WireError(
                f"release names client {batch.client_id}, but client {client_id} sent it",
                403,
                "forbidden",
            )
        expected_cut = self.server.splits[client_id].t_cut
        if batch.t_cut != expected_cut:
            raise WireError(
                f"release has t_cut={batch.t_cut}, client {client_id} has {expected_cut}"
            )
        if tuple(batch.latents.shape[1:]) != self.latent_shape:
            raise WireError(
                f"release latents must be (n, {', '.join(map(str, self.latent_shape))}), "
                f"got {tuple(batch.latents.shape)}"
            )
        if max(batch.image_ids) >= self.deploy.max_images_per_client:
            raise WireError(
                f"image ids must be < {self.deploy.max_images_per_client}, "
                f"got {max(batch.image_ids)}"
            )
        if self.config.server_labels != "class":
            if batch.labels is not None:
                raise WireError(f"server_labels={self.config.server_labels!r}: send no labels")
        elif batch.labels is None:
            raise WireError("server_labels='class': a release must carry its class labels")
        elif batch.labels.min() < 0 or batch.labels.max() >= self.deploy.num_classes:
            raise WireError(
                f"labels must lie in [0, {self.deploy.num_classes}), got {batch.labels.tolist()}"
            )

    def _duplicate(self, error: DuplicateUpload, digest: str) -> WireError:
        if error.entry is None:  # a twin of this upload is being written: retry to learn how
            return WireError(f"{error}; retry", 503, "upload_in_progress")
        same = error.entry.sha256 == digest
        return WireError(
            f"{error} ({'same' if same else 'different'} bytes); a replay changes nothing",
            409,
            "duplicate_upload",
            sha256=error.entry.sha256,
            same_content=same,
        )

    def _receive(self, batch: ReleaseBatch) -> None:
        with self.lock:
            self.server.receive(batch)

    def submit(self, client_id: int, upload_id: str, body: bytes) -> dict[str, Any]:
        """Check, persist, then store one release upload; the acknowledgement's JSON."""
        if not UPLOAD_ID.match(upload_id):
            raise WireError(f"upload id {upload_id!r} must match {UPLOAD_ID.pattern}")
        digest = hashlib.sha256(body).hexdigest()
        committed = self.log.lookup(client_id, upload_id)
        if committed is not None:
            raise self._duplicate(DuplicateUpload(client_id, upload_id, committed), digest)
        batch = decode_release(body, self.deploy.max_body_bytes, self.deploy.upload_chunk_size)
        self.check_release(client_id, batch)
        try:  # the store takes the batch in commit order, once it is durable
            entry = self.log.append(
                client_id,
                upload_id,
                body,
                len(batch.image_ids),
                batch.epoch,
                on_commit=lambda: self._receive(batch),
            )
        except DuplicateUpload as error:
            raise self._duplicate(error, digest) from None
        with self.lock:
            held = self.server.store.counts().get(client_id, 0)
        return {
            "upload_id": upload_id,
            "seq": entry.seq,
            "sha256": entry.sha256,
            "images": len(batch.image_ids),
            "held": held,
        }

    def committed(self, client_id: int) -> dict[str, str]:
        """upload id -> sha256 of every committed upload of `client_id` (to resume from)."""
        return {e.upload_id: e.sha256 for e in self.log.entries() if e.client_id == client_id}

    def sampling_unet(self) -> torch.nn.Module:
        """The EMA denoiser of the current step (a new copy when training moved on)."""
        with self._snapshot_lock:
            step = self.trainer.step
            if self._snapshot is None or self._snapshot[0] != step:
                self._snapshot = (step, self.trainer.ema_model())
            return self._snapshot[1]

    def sample(self, client_id: int, body: bytes) -> bytes:
        """Run the server's steps (t >= t_cut) of one chain per seed; the encoded hand-off."""
        request = decode_sample_request(body, self.deploy.max_body_bytes)
        if request.client_id != client_id:
            raise WireError(
                f"request names client {request.client_id}, but client {client_id} sent it",
                403,
                "forbidden",
            )
        if len(request.seeds) > self.deploy.max_sample_batch:
            raise WireError(
                f"at most {self.deploy.max_sample_batch} images per request, "
                f"got {len(request.seeds)}",
                413,
                "too_large",
            )
        if max(request.class_labels) >= self.deploy.num_classes:
            raise WireError(
                f"class_labels must lie in [0, {self.deploy.num_classes}), "
                f"got {list(request.class_labels)}"
            )
        scheduler = sampling_scheduler(request.scheduler, self.scheduler.config)
        pipe = CollaFuseServerPipeline(scheduler, self.sampling_unet(), self.description)
        pipe.set_progress_bar_config(disable=True)
        generators = [torch.Generator().manual_seed(s) for s in request.seeds]
        with self._sampling_slots:  # bounds the memory and compute of concurrent requests
            handoff = pipe(
                client_id=client_id,
                class_labels=list(request.class_labels),
                num_inference_steps=request.num_inference_steps,
                guidance_scale=float(request.guidance_scale),
                generator=generators,
            )
        states = [g.get_state() for g in generators]
        return encode_handoff(handoff, states, fp16=self.deploy.fp16_wire)

    def limits(self) -> dict[str, int | bool]:
        """The limits a client needs to size its requests."""
        d = self.deploy
        return {
            "max_body_bytes": d.max_body_bytes,
            "upload_chunk_size": d.upload_chunk_size,
            "max_sample_batch": d.max_sample_batch,
            "max_images_per_client": d.max_images_per_client,
        }

    def health(self) -> dict[str, Any]:
        """Liveness plus what a client must agree with (versions, limits)."""
        return {
            "ok": not self.trainer.state.startswith("failed"),
            "version": __version__,
            "wire_version": WIRE_VERSION,
            "limits": self.limits(),
        }

    def status(self) -> dict[str, Any]:
        """Training step and state, releases held per client, uploads, the last checkpoint."""
        with self.lock:
            held = {str(k): v for k, v in self.server.store.counts().items()}
        uploads = len(self.log)
        return {
            "step": self.trainer.step,
            "max_steps": self.config.train.max_steps,
            "training": self.trainer.state,
            "last_loss": self.trainer.last_loss,
            "releases_held": held,
            "uploads": uploads,
            "last_checkpoint": self.trainer.last_checkpoint,
            "resumed_from_step": self.trainer.resumed_from,
        }
