"""Deployment settings shared by server and clients: a run config plus its `[deploy]` table."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from latentfuse.config import RunConfig, apply_overrides, config_from_dict

SCHEDULER_NAMES = ("ddpm", "ddim", "dpm", "euler")


@dataclass(frozen=True)
class DeployConfig:
    """What a networked run adds to a RunConfig: the label vocabulary and the wire's limits."""

    class_names: tuple[str, ...] = ()  # global label i is class_names[i] on every client
    # conditioning.kind = "attributes": attribute j of every release's vector is
    # attribute_names[j] on every client (each client reorders its data set's to this)
    attribute_names: tuple[str, ...] = ()
    upload_chunk_size: int = 256  # images per release upload
    max_body_bytes: int = 32 * 2**20  # largest request body the server reads
    max_images_per_client: int = 200_000  # image ids must lie below this (bounds server memory)
    max_sample_batch: int = 64  # images per sampling request
    max_concurrent_sampling: int = 2  # sampling requests computed at once (others wait)
    max_sampling_queue: int = 4  # sampling requests waiting beyond those (503 past it)
    max_sampling_per_client: int = 1  # one client's sampling requests in the server (429 past)
    sampling_cost_per_minute: int = 100_000  # per client: images x steps (x2 guided); 0: none
    # one request's cost at most (413 beyond: it can never run); also capped by the minute's
    # budget above, which a larger request could never fit
    max_sample_cost: int = 25_600
    # A request costing more is large: large requests hold all sampling places but one at most
    # (429 with Retry-After beyond), so that a small one always finds a place; 0: no such lane
    large_sample_cost: int = 3_200
    uploads_per_minute: int = 600  # per client (429 past it); 0: no limit
    # token checks that need a key derivation (a token not seen before), per client address a
    # minute (429 past it, before any derivation): a flood of bad tokens costs its sender; 0: none
    key_derivations_per_minute: int = 60
    max_uploads_in_flight_per_client: int = 2  # bodies of one client read at once (429 past)
    max_connections: int = 1024  # connections and requests in the server at once (503 past)
    # connection limits before any application code (latentfuse/deploy/server/connections.py)
    max_connections_per_address: int = 256  # one client address's open connections; 0: none
    header_timeout_seconds: float = 10.0  # a request head must arrive within this (408)
    max_header_bytes: int = 16384  # a request head's size (431 beyond)
    max_headers: int = 64  # a request's header fields (431 beyond)
    keep_alive_seconds: int = 30  # an idle keep-alive connection is closed after this
    # Sampling runs in this many child processes (0: in threads of the web process, where it
    # holds the interpreter lock that uploads and status calls need), at this niceness (0-19)
    # so that the operating system serves the front first. A trainer thread keeps sampling in
    # the web process (its live weights are there).
    sampling_processes: int = 2
    sampling_niceness: int = 5
    # a sampling request in a sampling process is stopped (its process ended and replaced)
    # after this many seconds, or at once when its client hangs up; 0: no time limit
    sampling_timeout_seconds: float = 300.0
    fp16_wire: bool = False  # send latents as float16 (halves the bytes; not bit-exact)
    # The server's batches: "clients" draws a client first, so one client's share of a batch
    # is 1/k in expectation among k clients whatever it uploads; "releases" draws uniformly
    # over releases (a client weighs by its data, as in central training).
    balance: str = "clients"
    # Each client's part of a server step's gradient is clipped to this multiple of the median
    # client's norm in that batch (robust aggregation; engine.group_clipped_backward): a client
    # sending poison that passes the release checks pulls a step no harder than a typical
    # client. 0: off (measured: no gain over the batch share on in-range poison, 1.9x a server
    # step; docs/deployment.md).
    client_gradient_clip: float = 0.0
    # Past checkpoints the trainer keeps (state_dir/history, besides the initial weights) to
    # roll back to when an operator removes releases (`serve --remove-releases`): it goes back
    # to the newest one trained on none of them. 0: no history, no roll-back.
    roll_back_checkpoints: int = 8
    # What a release may hold: z0 of the autoencoder's range after scaling (per element, and
    # the root-mean-square over a latent), checked at ingest as the bounds of
    # sqrt(abar_r) z0 + sqrt(1 - abar_r) eps. The shipped CIFAR-10 autoencoder's latents reach
    # 6.8 and rms 1.71 (10,000 images); the defaults leave room for data with std 2-3.
    max_latent_abs: float = 16.0
    max_latent_rms: float = 4.0
    # Quotas per client: releases held, and bytes of the uploads it made (re-sending the same
    # images under new upload ids counts again); 0: no quota.
    max_releases_per_client: int = 0
    max_upload_bytes_per_client: int = 0
    # Sampling a class-conditioned model: a client may ask for the classes it released
    # (server_labels = "class"), or for any class when this is true.
    sample_any_class: bool = False
    # A client that declared its classes (`serve --make-tokens ID --declare ID=names`) may
    # release only those labels (403 beyond) unless this is true.
    undeclared_classes: bool = False

    def __post_init__(self) -> None:
        if not self.class_names or len(set(self.class_names)) != len(self.class_names):
            raise ValueError(
                f"config: deploy.class_names must be a non-empty list of distinct names, "
                f"got {list(self.class_names)!r}"
            )
        minimums = dict.fromkeys(
            ("upload_chunk_size", "max_body_bytes", "max_images_per_client"), 1
        ) | dict.fromkeys(
            (
                "max_concurrent_sampling",
                "max_sampling_per_client",
                "max_uploads_in_flight_per_client",
                "max_connections",
            ),
            1,
        )
        minimums |= dict.fromkeys(
            (
                "max_releases_per_client",
                "max_upload_bytes_per_client",
                "max_sampling_queue",
                "sampling_cost_per_minute",
                "uploads_per_minute",
                "key_derivations_per_minute",
                "max_connections_per_address",
                "max_header_bytes",
                "max_headers",
                "keep_alive_seconds",
                "sampling_processes",
                "sampling_niceness",
                "roll_back_checkpoints",
                "large_sample_cost",
            ),
            0,
        )
        minimums["max_sample_batch"] = 1
        minimums["max_sample_cost"] = 1
        for name, least in minimums.items():
            value = getattr(self, name)
            if type(value) is not int or value < least:
                raise ValueError(f"config: deploy.{name} must be an int >= {least}, got {value!r}")
        if self.sampling_niceness > 19:
            raise ValueError(
                f"config: deploy.sampling_niceness must be in [0, 19], got {self.sampling_niceness}"
            )
        if not (self.client_gradient_clip == 0 or self.client_gradient_clip >= 1):
            raise ValueError(
                "config: deploy.client_gradient_clip must be 0 (off) or >= 1 (a multiple of the "
                f"median client's gradient norm), got {self.client_gradient_clip!r}"
            )
        if self.balance not in ("releases", "clients"):
            raise ValueError(
                f"config: deploy.balance must be 'releases' or 'clients', got {self.balance!r}"
            )
        for name in ("sampling_timeout_seconds", "header_timeout_seconds"):
            value = getattr(self, name)
            if not (type(value) in (int, float) and 0 <= value < float("inf")):
                raise ValueError(f"config: deploy.{name} must be a number >= 0, got {value!r}")
        for name in ("max_latent_abs", "max_latent_rms"):
            value = getattr(self, name)
            if not (type(value) in (int, float) and 0 < value < float("inf")):
                raise ValueError(f"config: deploy.{name} must be a number > 0, got {value!r}")
        if type(self.sample_any_class) is not bool:
            raise ValueError(
                f"config: deploy.sample_any_class must be a bool, got {self.sample_any_class!r}"
            )
        if len(set(self.attribute_names)) != len(self.attribute_names):
            raise ValueError(
                f"config: deploy.attribute_names must be distinct, got {list(self.attribute_names)}"
            )
        if type(self.undeclared_classes) is not bool:
            raise ValueError(
                f"config: deploy.undeclared_classes must be a bool, got {self.undeclared_classes!r}"
            )
        if type(self.fp16_wire) is not bool:
            raise ValueError(f"config: deploy.fp16_wire must be a bool, got {self.fp16_wire!r}")

    @property
    def num_classes(self) -> int:
        """Number of class labels; the null label is this index."""
        return len(self.class_names)


def deploy_from_dict(values: dict[str, Any]) -> DeployConfig:
    """A DeployConfig from a TOML table, rejecting unknown keys by name."""
    known = {f.name for f in dataclasses.fields(DeployConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"config: unknown key(s) {unknown} in [deploy]; expected some of {sorted(known)}"
        )
    values = dict(values)
    if "class_names" in values:
        if not isinstance(values["class_names"], list | tuple):
            raise ValueError(
                f"config: deploy.class_names must be a list, got {values['class_names']!r}"
            )
        values["class_names"] = tuple(str(v) for v in values["class_names"])
    if "attribute_names" in values:
        if not isinstance(values["attribute_names"], list | tuple):
            raise ValueError(
                f"config: deploy.attribute_names must be a list, got {values['attribute_names']!r}"
            )
        values["attribute_names"] = tuple(str(v) for v in values["attribute_names"])
    return DeployConfig(**values)


def load_deploy_config(
    path: str | Path, overrides: list[str] | tuple[str, ...] = ()
) -> tuple[RunConfig, DeployConfig]:
    """Read a TOML run config with a `[deploy]` table; `key=value` overrides reach both."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    values = tomllib.loads(path.read_text())
    apply_overrides(values, overrides)
    deploy = values.pop("deploy", None)
    if not isinstance(deploy, dict):
        raise ValueError(f"config: {path} has no [deploy] table (deploy.class_names is required)")
    return config_from_dict(values), deploy_from_dict(deploy)


def latent_shape(config: RunConfig) -> tuple[int, int, int]:
    """(channels, height, width) of the latents, read from the autoencoder's config.json only."""
    from latentfuse.data.autoencoder import latent_geometry
    from latentfuse.paths import resolve_path

    config_file = Path(resolve_path(config.vae)) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"autoencoder config not found: {config_file} (the server reads only its config.json "
            "to learn the latent shape)"
        )
    channels, factor = latent_geometry(json.loads(config_file.read_text()))
    size = config.data.resolution // factor
    return channels, size, size


def sampling_scheduler(name: str, config: Any):
    """A diffusers scheduler of kind `name` (ddpm, ddim, dpm, euler) from a scheduler config."""
    from diffusers import (
        DDIMScheduler,
        DDPMScheduler,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
    )

    classes = {
        "ddpm": DDPMScheduler,
        "ddim": DDIMScheduler,
        "dpm": DPMSolverMultistepScheduler,
        "euler": EulerDiscreteScheduler,
    }
    if name not in classes:
        raise ValueError(f"scheduler must be one of {SCHEDULER_NAMES}, got {name!r}")
    return classes[name].from_config(config)
