"""The web front's state behind the HTTP routes: tokens, the durable store, sampling.

Every request that changes state is checked in full first; a release upload is committed to
the release database (one transaction), then acknowledged. Training is not the front's: the
trainer (`latentfuse.deploy.server.trainer`) reads the database and publishes weights to
`published/`, in a thread of this process (`trainer="thread"`), as its own process under
`accelerate launch` that the front starts (`trainer="process"`), or started by the operator
(`trainer="none"`). The front samples with the newest published weights (the trainer
thread's live EMA in thread mode), reloading them without a restart.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from latentfuse import __version__
from latentfuse.config import RunConfig
from latentfuse.deploy.conditioning import WireConditioning
from latentfuse.deploy.config import DeployConfig, latent_shape
from latentfuse.deploy.server.auth import TokenBook
from latentfuse.deploy.server.persist import UPLOAD_ID
from latentfuse.deploy.server.sampler import LocalSampler, ProcessSampler
from latentfuse.deploy.server.store import (
    DuplicateUpload,
    QuotaExceeded,
    ReleaseDatabase,
    migrate_release_log,
)
from latentfuse.deploy.server.train_server import FRONT_PID, trainer_environment
from latentfuse.deploy.server.trainer import (
    DATABASE,
    STATUS,
    ServerTrainer,
    refuse_an_older_database,
    server_splits,
)
from latentfuse.deploy.wire import (
    WIRE_VERSION,
    SampleRequest,
    WireError,
    decode_release,
    decode_sample_request,
)
from latentfuse.description import client_entry, conditioning_record, model_description
from latentfuse.method.split import DiffusionSplit
from latentfuse.method.transport import ReleaseBatch

logger = logging.getLogger(__name__)

TRAINER_MODES = ("thread", "process", "none")


def implausible_releases(
    split: DiffusionSplit,
    latents: torch.Tensor,
    max_abs: float,
    max_rms: float,
    clip_norm: float = 0.0,
) -> list[tuple[int, str]]:
    """(index, why) of each release (n, c, h, w) no z0 of the autoencoder's range could give
    at `split`'s level (DiffusionSplit.release_bounds): not finite, an element or the norm past
    what the range allows, a norm below what the noise guarantees, or less spread around its
    mean (over the latent, or within a channel) than the level's noise alone has."""
    flat = latents.double().flatten(1)
    if not torch.isfinite(flat).all():
        bad = (~torch.isfinite(flat)).any(dim=1).nonzero().flatten().tolist()
        return [(i, "its latents are not finite") for i in bad]
    dim = flat.shape[1]
    max_norm = max_rms * dim**0.5
    bounds = split.release_bounds(dim, max_abs, min(max_norm, clip_norm) if clip_norm else max_norm)
    channels = latents.double().flatten(2)  # (n, c, h*w)
    least_channel = split.min_spread(channels.shape[2])
    norms, peaks = flat.norm(dim=1).tolist(), flat.abs().amax(dim=1).tolist()
    spread = (flat - flat.mean(1, keepdim=True)).norm(dim=1).tolist()
    flattest = (channels - channels.mean(2, keepdim=True)).norm(dim=2).amin(dim=1).tolist()
    crowds = crowded_releases(split, flat)
    found = []
    for i in range(len(flat)):
        if peaks[i] > bounds["max_abs"]:
            found.append((i, f"max |z_r| {peaks[i]:.4g} (bound {bounds['max_abs']:.4g})"))
        elif not bounds["min_norm"] <= norms[i] <= bounds["max_norm"]:
            found.append(
                (
                    i,
                    f"norm {norms[i]:.4g} (bounds [{bounds['min_norm']:.4g}, "
                    f"{bounds['max_norm']:.4g}])",
                )
            )
        elif spread[i] < bounds["min_spread"] or flattest[i] < least_channel:
            found.append(
                (
                    i,
                    f"it lacks the level's noise: spread around its mean {spread[i]:.4g} "
                    f"(least {bounds['min_spread']:.4g}), flattest channel {flattest[i]:.4g} "
                    f"(least {least_channel:.4g})",
                )
            )
        elif i in crowds:
            count, limit = crowds[i]
            found.append(
                (
                    i,
                    f"it lacks the level's noise: {count} of its {dim} elements lie in one "
                    f"interval of width {split.crowding_width:.3g} (at most {limit} with the "
                    "noise of its level)",
                )
            )
    return found


def crowded_releases(split: DiffusionSplit, flat: torch.Tensor) -> dict[int, tuple[int, int]]:
    """{index: (count, limit)} of the releases (n, dim) with more elements in one interval of
    the grid of width `split.crowding_width` than the level's noise allows
    (`DiffusionSplit.most_in_width`, widened by the float16 spacing at the interval)."""
    width = split.crowding_width
    if width == 0.0 or flat.numel() == 0:
        return {}
    n, dim = flat.shape
    bins = torch.floor(flat.double() / width).long()
    span = int(bins.abs().max()) + 2
    keys = torch.arange(n).unsqueeze(1) * (2 * span) + (bins + span)
    unique, counts = torch.unique(keys.flatten(), return_counts=True)
    rows, cells = unique // (2 * span), unique % (2 * span) - span
    magnitude = torch.maximum(cells.abs(), (cells + 1).abs()).double() * width
    exponent = torch.floor(torch.log2(magnitude.clamp_min(2.0**-14))).long()  # float16 spacing
    limits = {e: split.most_in_width(dim, 2.0 ** (e - 10)) for e in exponent.unique().tolist()}
    limit = torch.tensor([limits[e] for e in exponent.tolist()])
    over = counts > limit
    found: dict[int, tuple[int, int]] = {}
    crowds = zip(rows[over].tolist(), counts[over].tolist(), limit[over].tolist(), strict=True)
    for row, count, bound in crowds:
        if row not in found or count - bound > found[row][0] - found[row][1]:
            found[row] = (count, bound)
    return found


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
    conditioning = conditioning_record(config, deploy.attribute_names)
    return model_description(
        config, deploy.class_names, entries, alphas_cumprod, conditioning=conditioning
    ).to_json()


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
        trainer: str | None = None,
        trainer_command: list[str] | None = None,
    ):
        self.config, self.deploy, self.tokens = config, deploy, tokens
        self.mode = trainer or ("thread" if train else "none")
        if self.mode not in TRAINER_MODES:
            raise ValueError(f"trainer must be one of {TRAINER_MODES}, got {self.mode!r}")
        if self.mode == "process" and not trainer_command:
            raise ValueError("trainer='process' needs the trainer_command to start")
        self.train = self.mode != "none"
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        bad = [c for c in tokens.client_ids if c >= config.data.num_clients]
        if bad:
            raise ValueError(
                f"clients file lists ids {bad}, but data.num_clients={config.data.num_clients}"
            )
        for cid, names in tokens.declared.items():
            unknown = sorted(set(names) - set(deploy.class_names))
            if unknown:
                raise ValueError(
                    f"clients file: client {cid} declares classes {unknown} that are not in "
                    f"deploy.class_names {list(deploy.class_names)}"
                )
        self.splits = server_splits(config)
        if all(s.is_independent for s in self.splits.values()):
            raise ValueError("every client has t_cut = T: there is nothing for a server to do")
        self.latent_shape = latent_shape(config)
        self.conditioning = WireConditioning.of(config, deploy)
        self.description = server_description(config, deploy, self.splits)
        refuse_an_older_database(self.state_dir)  # read-only: a refusal changes no file
        self.database = ReleaseDatabase(self.state_dir / DATABASE, self.latent_shape)
        migrate_release_log(self.state_dir / "releases", self.database)
        self.init_from = Path(init_from) if init_from else None
        self.trainer: ServerTrainer | None = None
        if self.mode == "thread":
            self.trainer = ServerTrainer(config, deploy, self.state_dir, init_from)
            self.trainer.load_checkpoint()
        self.trainer_command, self._process, self._exited_at = trainer_command, None, None
        self._stop, self._thread = threading.Event(), None
        self.sampler: LocalSampler | ProcessSampler
        if self.trainer is not None or not deploy.sampling_processes:  # the live EMA is here
            self.sampler = LocalSampler(
                config, deploy, self.state_dir, self.description, self.init_from, self.trainer
            )
        else:
            self.sampler = ProcessSampler(
                config=config,
                deploy=deploy,
                state_dir=self.state_dir,
                description=self.description,
                init_from=self.init_from,
            )
        logger.info("holding %d uploads (%s releases)", len(self.database), self.database.counts())

    # ---- life cycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """Start the trainer: a thread, or its own process (`trainer_command`)."""
        if self.mode == "thread" and self._thread is None:
            self._thread = threading.Thread(
                target=self.trainer.run, args=(self._stop,), name="server-training", daemon=True
            )
            self._thread.start()
        elif self.mode == "process" and self._process is None:
            log = open(self.state_dir / "trainer.log", "ab")  # noqa: SIM115 (the child keeps it)
            logger.info("starting the trainer: %s", " ".join(self.trainer_command))
            self._process = subprocess.Popen(
                self.trainer_command,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # stop() signals the launcher and its workers together
                env={**trainer_environment(), FRONT_PID: str(os.getpid())},  # it stops with us
            )
            log.close()

    def stop(self) -> None:
        """Stop training after its current step (it checkpoints on the way out), and the
        sampling processes."""
        self._stop.set()
        self.sampler.close()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._process is not None:
            if self._process.poll() is None:
                os.killpg(self._process.pid, signal.SIGTERM)
                try:
                    self._process.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    os.killpg(self._process.pid, signal.SIGKILL)
                    self._process.wait()
            self._process = None
        step = self.trainer_status().get("step", 0)
        logger.info("stopped at step %d with %d uploads held", step, len(self.database))

    # ---- requests ------------------------------------------------------------------------------
    def authenticate(self, client_id: int, token: str | None) -> None:
        """WireError 401 unless `token` is client `client_id`'s token."""
        if not token:
            raise WireError(
                "missing bearer token (Authorization: Bearer <token>)", 401, "unauthorized"
            )
        self.tokens.refresh()  # a token reissued or revoked while the server runs
        # One answer, and one key derivation, whether the id is unknown or the token wrong; an
        # id outside the run's clients (listed in clients.json since) is refused the same way.
        if not self.tokens.verify(client_id, token) or client_id not in self.splits:
            raise WireError(f"invalid token for client {client_id}", 401, "unauthorized")

    def authenticated_before(self, client_id: int, token: str | None) -> bool:
        """Whether `token` was accepted for `client_id` before (no key derivation): the routes
        check this in the event loop and take a worker thread only for the slow path."""
        self.tokens.refresh()
        known = bool(token) and self.tokens.verified_before(client_id, token)
        return known and client_id in self.splits

    def authenticate_any(self, token: str | None) -> int:
        """The id of the client whose token this is; WireError 401 if none."""
        self.tokens.refresh()
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
        expected_cut = self.splits[client_id].handoff_t
        if batch.handoff_t != expected_cut:
            raise WireError(
                f"release has t_cut={batch.handoff_t}, client {client_id} has {expected_cut}"
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
            what = {"class": "class labels", "attributes": "attribute vectors"}.get(
                self.conditioning.kind, "prompt token states"
            )
            raise WireError(
                f"server_labels='class': a release must carry its conditioning ({what})"
            )
        else:
            try:
                self.conditioning.check_rows(batch.labels, len(batch.image_ids))
            except ValueError as error:
                raise WireError(f"release conditioning: {error}") from None
            self.check_declared(client_id, batch.labels)
        self.check_statistics(client_id, batch)

    def check_declared(self, client_id: int, labels: torch.Tensor) -> None:
        """WireError 403 for a class label the client did not declare when its token was
        issued (clients that declared nothing, and `deploy.undeclared_classes`, pass)."""
        declared = self.tokens.declared.get(client_id)
        if declared is None or self.deploy.undeclared_classes or labels.is_floating_point():
            return
        names = self.deploy.class_names
        foreign = sorted({names[int(y)] for y in labels.tolist()} - set(declared))
        if foreign:
            raise WireError(
                f"client {client_id} declared the classes {list(declared)}; its release "
                f"carries {foreign} (deploy.undeclared_classes = true allows them)",
                403,
                "forbidden",
            )

    def check_statistics(self, client_id: int, batch: ReleaseBatch) -> None:
        """WireError 400 for a release no z0 of the autoencoder's range could give at the
        client's level (`implausible_releases`). A poisoned release (every element 1e30, an
        all-zero or constant latent) is refused before it is stored."""
        d = self.deploy
        found = implausible_releases(
            self.splits[client_id],
            batch.latents,
            d.max_latent_abs,
            d.max_latent_rms,
            self.config.privacy.clip_norm,
        )
        if found:
            index, reason = found[0]
            raise WireError(
                f"release of image {batch.image_ids[index]} is impossible at client "
                f"{client_id}'s level: {reason} (deploy.max_latent_abs={d.max_latent_abs:g}, "
                f"max_latent_rms={d.max_latent_rms:g})",
                code="implausible_release",
            )

    def _duplicate(self, error: DuplicateUpload, digest: str) -> WireError:
        same = error.entry is not None and error.entry.sha256 == digest
        return WireError(
            f"{error} ({'same' if same else 'different'} bytes); a replay changes nothing",
            409,
            "duplicate_upload",
            sha256=error.entry.sha256 if error.entry else None,
            same_content=same,
        )

    def submit(self, client_id: int, upload_id: str, body: bytes) -> dict[str, Any]:
        """Check, then commit one release upload (one transaction); the acknowledgement."""
        if not UPLOAD_ID.fullmatch(upload_id):
            raise WireError(f"upload id {upload_id!r} must match {UPLOAD_ID.pattern}")
        digest = hashlib.sha256(body).hexdigest()
        committed = self.database.lookup(client_id, upload_id)
        if committed is not None:
            raise self._duplicate(DuplicateUpload(client_id, upload_id, committed), digest)
        batch = decode_release(body, self.deploy.max_body_bytes, self.deploy.upload_chunk_size)
        self.check_release(client_id, batch)
        d = self.deploy
        try:
            entry = self.database.append(
                upload_id, batch, body, d.max_releases_per_client, d.max_upload_bytes_per_client
            )
        except DuplicateUpload as error:  # a concurrent twin committed first
            raise self._duplicate(error, digest) from None
        except QuotaExceeded as error:
            raise WireError(str(error), 403, "quota_exceeded") from None
        return {
            "upload_id": upload_id,
            "seq": entry.seq,
            "sha256": entry.sha256,
            "images": len(batch.image_ids),
            "held": self.database.counts().get(client_id, 0),
        }

    def committed(self, client_id: int) -> dict[str, str]:
        """upload id -> sha256 of every committed upload of `client_id` (to resume from)."""
        return {e.upload_id: e.sha256 for e in self.database.uploads(client_id)}

    def check_sample_request(self, client_id: int, request: SampleRequest) -> None:
        """Refuse (WireError) a sampling request this client may not make."""
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
        self.check_request_conditioning(request)
        by_class = self.config.server_labels == "class" and self.conditioning.kind == "class"
        if by_class and not self.deploy.sample_any_class:
            own = self.database.labels(client_id)
            foreign = sorted(set(request.class_labels) - own)
            if foreign:
                raise WireError(
                    f"client {client_id} may sample the classes it released ({sorted(own)}), "
                    f"not {foreign} (deploy.sample_any_class = true allows every class)",
                    403,
                    "forbidden",
                )

    def check_request_conditioning(self, request: SampleRequest) -> None:
        """A request carries attribute rows or prompts exactly when the model is conditioned
        on them and the server sees the conditioning (server_labels = "class")."""
        kind, sees = self.conditioning.kind, self.config.server_labels == "class"
        needed = {"attributes": "attributes", "text": "prompts"}.get(kind) if sees else None
        for name in ("attributes", "prompts"):
            sent = getattr(request, name) is not None
            if sent and name != needed:
                why = f"server_labels = {self.config.server_labels!r}" if not sees else kind
                raise WireError(f"this server takes no {name} ({why}): send none")
            if not sent and name == needed:
                raise WireError(f"a model conditioned on {kind} needs the request's {name}")
        width = self.conditioning.num_attributes
        if needed == "attributes" and len(request.attributes[0]) != width:
            raise WireError(
                f"attribute rows must have {width} values (deploy.attribute_names), "
                f"got {len(request.attributes[0])}"
            )

    def sample(
        self, client_id: int, body: bytes, cancelled: Callable[[], bool] | None = None
    ) -> bytes:
        """Run the server's steps (t >= t_cut) of one chain per seed; the encoded hand-off.
        `cancelled()` true: the client hung up, and a sampling process stops the work."""
        request = decode_sample_request(body, self.deploy.max_body_bytes)
        self.check_sample_request(client_id, request)
        return self.sampler.sample(client_id, request, cancelled)

    def sampling_unet(self) -> torch.nn.Module:
        """The denoiser the web process would sample with now (tests compare weights)."""
        return self._local_sampler().unet()

    def _local_sampler(self) -> LocalSampler:
        if isinstance(self.sampler, LocalSampler):
            return self.sampler
        return LocalSampler(
            self.config, self.deploy, self.state_dir, self.description, self.init_from
        )

    def sample_cost_cap(self) -> int:
        """The most one sampling request may cost: `deploy.max_sample_cost`, and no more than
        the per-minute budget (a request above it could never be admitted)."""
        d = self.deploy
        budget = d.sampling_cost_per_minute or d.max_sample_cost
        return min(d.max_sample_cost, budget)

    def limits(self) -> dict[str, int | bool]:
        """The limits a client needs to size its requests."""
        d = self.deploy
        return {
            "max_body_bytes": d.max_body_bytes,
            "upload_chunk_size": d.upload_chunk_size,
            "max_sample_batch": d.max_sample_batch,
            "max_sample_cost": self.sample_cost_cap(),
            "max_images_per_client": d.max_images_per_client,
        }

    def trainer_status(self) -> dict[str, Any]:
        """The trainer's own report: live in thread mode, else its `trainer.json`."""
        if self.trainer is not None:
            return self.trainer.status()
        try:
            status = json.loads((self.state_dir / STATUS).read_text())
        except (OSError, ValueError):
            status = {"step": 0, "training": "not started"}
        if self.mode == "process" and self._process is not None:
            code = self._process.poll()
            if code is not None and self._exited_at is None:
                self._exited_at = time.time()
            newer = status.get("unix_time", 0) > (self._exited_at or 0)  # one started by hand
            if code is not None and not newer and status.get("training") != "finished":
                status["training"] = f"trainer exited with code {code}"
        elif self.mode == "none":
            status.setdefault("training", "external")
        return status

    def health(self) -> dict[str, Any]:
        """Liveness plus what a client must agree with (versions, limits)."""
        return {
            "ok": not str(self.trainer_status().get("training", "")).startswith("failed"),
            "version": __version__,
            "wire_version": WIRE_VERSION,
            "limits": self.limits(),
        }

    def client_status(self, client_id: int) -> dict[str, Any]:
        """What one client may see of `status`: training, and its own releases and uploads
        (how much the other clients hold is theirs to know)."""
        full = self.status()
        held = full.pop("releases_held")
        full["releases_held"] = {str(client_id): held.get(str(client_id), 0)}
        full["uploads"] = len(self.database.uploads(client_id))
        full["clients"] = len(held)
        return full

    def status(self) -> dict[str, Any]:
        """Training step and state, releases held per client, uploads, the last checkpoint."""
        trainer = self.trainer_status()
        if self.mode == "none" and self.trainer is None and not (self.state_dir / STATUS).exists():
            trainer["training"] = "disabled"
        return {
            "step": trainer.get("step", 0),
            "max_steps": self.config.train.max_steps,
            "training": trainer.get("training"),
            "last_loss": trainer.get("last_loss"),
            "releases_held": {str(k): v for k, v in self.database.counts().items()},
            "uploads": len(self.database),
            "last_checkpoint": trainer.get("last_checkpoint"),
            "resumed_from_step": trainer.get("resumed_from_step"),
            "skipped_steps": trainer.get("skipped_steps", 0),
            "trainer": self.mode,
        }
