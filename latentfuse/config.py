"""Typed, frozen run configuration read from TOML with `key=value` overrides."""

from __future__ import annotations

import copy
import dataclasses
import json
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from latentfuse.method.split import CLIENT_ENTRIES, OBJECTIVES, TIMESTEP_DENSITIES, WEIGHTINGS

PARTITIONS = ("iid", "classes", "dirichlet", "attributes")
RELEASE_POLICIES = ("once", "fresh")
SERVER_LABELS = ("class", "client", "none")
VAE_SCALINGS = ("config", "auto")
MIXED_PRECISION = ("no", "fp16", "bf16")
LR_SCHEDULES = ("constant", "cosine")
# Keys renamed since configs were first saved, (table, old name) -> new name. Configs saved in
# checkpoints, run folders and model folders, TOML files and overrides are read with either.
RENAMED_KEYS = {("data", "split"): "subfolder"}
# Keys added since, with the value that means "as before": `first_form` leaves them out at that
# value, so hashes of saved results stay valid when a key is added.
ADDED_KEYS = {
    ("vae_scaling",): "config",
    ("train", "guidance_scale"): None,
    ("train", "client_every"): 1,
    ("train", "lr_schedule"): "constant",
    ("split", "server_timesteps"): "uniform",
    ("split", "client_entry"): "auto",
    ("conditioning", "kind"): "class",
    ("conditioning", "text_encoder"): "",
    ("conditioning", "prompt_template"): "{}",
    ("conditioning", "max_length"): 32,
    ("train", "export_merged"): False,
    ("data", "classes"): [],
    **{
        (*table, key): before
        for table in (("server_unet",), ("client_unet",), ("clients", "*", "unet"))
        for key, before in (
            ("pretrained", ""),
            ("adapter", "none"),
            ("lora_rank", 8),
            ("lora_alpha", 8),
            ("lora_targets", []),
        )
    },
}
ADAPTERS = ("none", "lora")
CONDITIONING_KINDS = ("class", "attributes", "text")


def _check(condition: bool, name: str, value: Any, expected: str) -> None:
    if not condition:
        raise ValueError(f"config: {name} must be {expected}, got {value!r}")


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how they are dealt to clients."""

    source: str = "cifar10"  # "cifar10" (the shared archive), a folder or an archive
    subfolder: str = "train"  # sub-folder of an ImageFolder source; "" for none; CIFAR-10:
    # "train" or "test" (called `split` before 0.2; saved configs are read either way)
    format: str = "auto"  # auto, imagefolder, celeba, awa2
    label_attribute: str = ""  # CelebA: the attribute used as class label ("" = none)
    groups: tuple[tuple[str, ...], ...] = ()  # partition "attributes": attributes per client
    overlap: bool = False  # partition "attributes": an image may join every matching client
    resolution: int = 32
    num_clients: int = 5
    partition: str = "classes"
    alpha: float = 0.5
    eval_fraction: float = 0.1
    max_images_per_client: int = 0  # 0: all
    seed: int = 0
    # keep the images of these classes only (relabelled in the data set's order); empty: all
    classes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check(self.num_clients >= 1, "data.num_clients", self.num_clients, ">= 1")
        _check(self.partition in PARTITIONS, "data.partition", self.partition, f"in {PARTITIONS}")
        _check(self.alpha > 0, "data.alpha", self.alpha, "> 0")
        _check(0 <= self.eval_fraction < 1, "data.eval_fraction", self.eval_fraction, "in [0, 1)")
        _check(
            self.max_images_per_client >= 0,
            "data.max_images_per_client",
            self.max_images_per_client,
            ">= 0",
        )
        _check(self.resolution >= 8, "data.resolution", self.resolution, ">= 8")
        if self.partition == "attributes":
            _check(
                len(self.groups) == self.num_clients,
                "data.groups",
                self.groups,
                f"one list of attribute names per client ({self.num_clients})",
            )
        else:
            _check(
                not self.groups and not self.overlap,
                "data.groups/overlap",
                self.groups,
                "empty unless partition = 'attributes'",
            )


@dataclass(frozen=True)
class UNetConfig:
    """A denoiser: its architecture, or the pretrained one it starts from, and how it is
    fine-tuned (docs/pretrained.md)."""

    block_out_channels: tuple[int, ...] = (64, 128, 128)
    layers_per_block: int = 1
    attention: bool = False  # self-attention in the lowest-resolution block
    norm_num_groups: int = 8  # small nets: 32 groups of 1 channel would erase t/y conditioning
    # A diffusers UNet to start from: a local folder (a UNet's own, a pipeline's with `unet/`,
    # a CollaFuse model's with `server_unet/`) or a hub id; its config gives the architecture
    # (an architecture key above set to another value than both its default and the base's is
    # refused). "": random weights.
    pretrained: str = ""
    adapter: str = "none"  # "lora": train LoRA adapters (PEFT) on a frozen pretrained base
    lora_rank: int = 8
    lora_alpha: int = 8  # the adapters' scale is lora_alpha / lora_rank
    # module names (suffixes) that get adapters; empty: every attention projection and every
    # ResNet convolution and time projection of the base
    lora_targets: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check(self.adapter in ADAPTERS, "unet.adapter", self.adapter, f"in {ADAPTERS}")
        _check(
            self.adapter == "none" or bool(self.pretrained),
            "unet.adapter",
            self.adapter,
            "'none' without unet.pretrained (adapters fine-tune a pretrained base)",
        )
        _check(self.lora_rank >= 1, "unet.lora_rank", self.lora_rank, ">= 1")
        _check(self.lora_alpha >= 1, "unet.lora_alpha", self.lora_alpha, ">= 1")
        _check(
            len(self.block_out_channels) >= 1,
            "unet.block_out_channels",
            self.block_out_channels,
            "non-empty",
        )
        for channels in self.block_out_channels:
            _check(
                channels % self.norm_num_groups == 0,
                "unet.block_out_channels",
                self.block_out_channels,
                f"multiples of norm_num_groups={self.norm_num_groups}",
            )
        _check(self.layers_per_block >= 1, "unet.layers_per_block", self.layers_per_block, ">= 1")


@dataclass(frozen=True)
class SplitConfig:
    """The cut and the server objective (method.md §2)."""

    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    t_cut: int = 100
    release_policy: str = "once"
    objective: str = "exact"
    weighting: str = "inverse_lambda"  # measured: bench/weighting_experiment.py, README
    max_target_variance: float = 0.0  # > 1: the server's buffer (split.buffered_cut); 0: none
    # how the server draws its timesteps: "uniform" over [t_cut, T), or "rising" (linearly
    # more often towards T: split.sample_server_timesteps)
    server_timesteps: str = "uniform"
    # where sampling starts the client: "cut", "compensated" or "auto" (split.CLIENT_ENTRIES)
    client_entry: str = "auto"

    def __post_init__(self) -> None:
        _check(
            self.num_train_timesteps >= 2,
            "split.num_train_timesteps",
            self.num_train_timesteps,
            ">= 2",
        )
        _check(
            0 <= self.t_cut <= self.num_train_timesteps,
            "split.t_cut",
            self.t_cut,
            f"in [0, {self.num_train_timesteps}]",
        )
        _check(
            self.release_policy in RELEASE_POLICIES,
            "split.release_policy",
            self.release_policy,
            f"in {RELEASE_POLICIES}",
        )
        _check(self.objective in OBJECTIVES, "split.objective", self.objective, f"in {OBJECTIVES}")
        _check(self.weighting in WEIGHTINGS, "split.weighting", self.weighting, f"in {WEIGHTINGS}")
        _check(
            self.server_timesteps in TIMESTEP_DENSITIES,
            "split.server_timesteps",
            self.server_timesteps,
            f"in {TIMESTEP_DENSITIES}",
        )
        _check(
            self.client_entry in CLIENT_ENTRIES,
            "split.client_entry",
            self.client_entry,
            f"in {CLIENT_ENTRIES}",
        )
        _check(
            self.max_target_variance == 0 or self.max_target_variance > 1,
            "split.max_target_variance",
            self.max_target_variance,
            "0 (no buffer) or > 1 (lam_s^2 is at least 1)",
        )
        _check(
            self.max_target_variance == 0 or self.objective == "exact",
            "split.max_target_variance",
            self.max_target_variance,
            "0 with objective 'original' (the buffer bounds the exact objective's target)",
        )


@dataclass(frozen=True)
class PrivacyConfig:
    """The formal-privacy mode (analytic Gaussian mechanism, latentfuse/method/privacy.py).

    With `clip_norm` > 0 every client scales each latent to L2 norm <= clip_norm before it
    releases it, so a guarantee holds and is recorded in collafuse.json. With
    `target_epsilon` > 0 too, each client's cut is raised (never lowered) to the smallest one
    whose releases are (target_epsilon, delta)-DP per image, composed over `max_releases`
    releases under `fresh` (a client then stops releasing after that many)."""

    target_epsilon: float = 0.0  # 0: no target (the configured cut is kept)
    delta: float = 1e-5
    clip_norm: float = 0.0  # 0: latents are not clipped and no guarantee holds
    max_releases: int = 0  # fresh: releases per image (0: unlimited, only without clipping)

    def __post_init__(self) -> None:
        _check(self.target_epsilon >= 0, "privacy.target_epsilon", self.target_epsilon, ">= 0")
        _check(0 < self.delta < 1, "privacy.delta", self.delta, "in (0, 1)")
        _check(self.clip_norm >= 0, "privacy.clip_norm", self.clip_norm, ">= 0")
        _check(self.max_releases >= 0, "privacy.max_releases", self.max_releases, ">= 0")
        if self.target_epsilon > 0:
            _check(
                self.clip_norm > 0,
                "privacy.clip_norm",
                self.clip_norm,
                "> 0 when privacy.target_epsilon is set (the bound needs clipped latents)",
            )

    @property
    def enforced(self) -> bool:
        """Whether releases are clipped, so that a formal guarantee holds."""
        return self.clip_norm > 0


@dataclass(frozen=True)
class ClientOverride:
    """Per-client settings that differ from the defaults (a weaker device, a smaller net)."""

    id: int
    t_cut: int | None = None
    unet: UNetConfig | None = None


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, bookkeeping and logging."""

    max_steps: int = 1000
    server_batch_size: int = 64
    client_batch_size: int = 32
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-4
    client_learning_rate: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 100
    ema_decay: float = 0.999
    label_dropout: float = 0.1
    mixed_precision: str = "no"
    checkpoint_every: int = 500
    sample_every: int = 0  # 0: only at the end
    log_every: int = 10
    num_preview_images: int = 16
    preview_inference_steps: int = 50
    seed: int = 0
    # the guidance the exported model records for sampling (previews, `latentfuse sample` and
    # `evaluate` default to it); None: 3 for a model trained with label dropout on class
    # labels, else 1
    guidance_scale: float | None = None
    # the clients take an optimiser step every `client_every`-th step (the server every step):
    # a client's low-noise task needs fewer steps than the server's, and on one machine the
    # clients' steps add up (in a deployment each client trains on its own hardware)
    client_every: int = 1
    # after the warm-up: "constant", or "cosine" decay to 0 at `max_steps` (a run whose length
    # is known in advance ends on small steps; a run resumed with a larger max_steps decays
    # anew from where the longer cosine stands)
    lr_schedule: str = "constant"
    # a denoiser with LoRA adapters is exported as adapters plus its base's reference, or (true)
    # as merged weights
    export_merged: bool = False

    def __post_init__(self) -> None:
        for name in (
            "max_steps",
            "server_batch_size",
            "client_batch_size",
            "gradient_accumulation_steps",
            "checkpoint_every",
            "log_every",
            "client_every",
        ):
            _check(getattr(self, name) >= 1, f"train.{name}", getattr(self, name), ">= 1")
        _check(self.learning_rate > 0, "train.learning_rate", self.learning_rate, "> 0")
        _check(0 <= self.ema_decay < 1, "train.ema_decay", self.ema_decay, "in [0, 1)")
        _check(0 <= self.label_dropout < 1, "train.label_dropout", self.label_dropout, "in [0, 1)")
        _check(
            self.guidance_scale is None or self.guidance_scale >= 1,
            "train.guidance_scale",
            self.guidance_scale,
            ">= 1 (or unset)",
        )
        _check(
            self.lr_schedule in LR_SCHEDULES,
            "train.lr_schedule",
            self.lr_schedule,
            f"in {LR_SCHEDULES}",
        )
        _check(
            self.mixed_precision in MIXED_PRECISION,
            "train.mixed_precision",
            self.mixed_precision,
            f"in {MIXED_PRECISION}",
        )


@dataclass(frozen=True)
class ConditioningConfig:
    """What the denoisers are conditioned on (latentfuse/conditioning.py).

    "class": one class label per image (an embedding); "attributes": the data set's binary
    attribute vector (CelebA's 40, AwA2's 85 predicates) as +-1, through a learned projection;
    "text": a prompt made of the image's attribute names (or class name) with
    `prompt_template`, encoded by the frozen transformers text encoder `text_encoder` (a local
    folder or a hub id, CLIP or T5) and read by cross-attention.
    """

    kind: str = "class"
    text_encoder: str = ""
    prompt_template: str = "{}"
    max_length: int = 32  # tokens of a prompt (padded and truncated to it)

    def __post_init__(self) -> None:
        _check(
            self.kind in CONDITIONING_KINDS,
            "conditioning.kind",
            self.kind,
            f"in {CONDITIONING_KINDS}",
        )
        if self.kind == "text":
            _check(
                bool(self.text_encoder),
                "conditioning.text_encoder",
                self.text_encoder,
                "a text encoder folder or hub id when conditioning.kind = 'text'",
            )
        _check(
            "{}" in self.prompt_template,
            "conditioning.prompt_template",
            self.prompt_template,
            "a template with one {}",
        )
        _check(self.max_length >= 2, "conditioning.max_length", self.max_length, ">= 2")


@dataclass(frozen=True)
class RunConfig:
    """Everything one training run needs."""

    vae: str = "checkpoints/cifar10-vae"
    # "config": the autoencoder's own normalisation; "auto": its scaling_factor divided by the
    # std of this data's latents (computed once from up to 1,024 training images, recorded in
    # the run folder's vae_scaling.json and in the exported model's vae/config.json)
    vae_scaling: str = "config"
    data: DataConfig = field(default_factory=DataConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    server_unet: UNetConfig = field(default_factory=UNetConfig)
    server_labels: str = "class"
    client_unet: UNetConfig = field(default_factory=lambda: UNetConfig((32, 64)))
    clients: tuple[ClientOverride, ...] = ()
    train: TrainConfig = field(default_factory=TrainConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    conditioning: ConditioningConfig = field(default_factory=ConditioningConfig)

    def __post_init__(self) -> None:
        if self.privacy.enforced and self.split.release_policy == "fresh":
            _check(
                self.privacy.max_releases >= 1,
                "privacy.max_releases",
                self.privacy.max_releases,
                ">= 1 under split.release_policy = 'fresh' with privacy.clip_norm set "
                "(the guarantee composes over a known number of releases)",
            )
        _check(
            self.vae_scaling in VAE_SCALINGS, "vae_scaling", self.vae_scaling, f"in {VAE_SCALINGS}"
        )
        _check(
            self.server_labels in SERVER_LABELS,
            "server_labels",
            self.server_labels,
            f"in {SERVER_LABELS}",
        )
        ids = [client.id for client in self.clients]
        _check(len(ids) == len(set(ids)), "clients.id", ids, "unique")
        for client in self.clients:
            _check(
                0 <= client.id < self.data.num_clients,
                "clients.id",
                client.id,
                f"in [0, {self.data.num_clients})",
            )
            if client.t_cut is not None:
                _check(
                    0 <= client.t_cut <= self.split.num_train_timesteps,
                    "clients.t_cut",
                    client.t_cut,
                    f"in [0, {self.split.num_train_timesteps}]",
                )

    def client_t_cut(self, client_id: int) -> int:
        """The cut of one client: its override, else `split.t_cut`."""
        override = next((c for c in self.clients if c.id == client_id), None)
        return override.t_cut if override and override.t_cut is not None else self.split.t_cut

    def client_unet_config(self, client_id: int) -> UNetConfig:
        """The denoiser architecture of one client."""
        override = next((c for c in self.clients if c.id == client_id), None)
        return override.unet if override and override.unet is not None else self.client_unet

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict that `from_dict` turns back into this config."""
        return dataclasses.asdict(self)


def _build(cls: type, values: Any, where: str) -> Any:
    """Build dataclass `cls` from a dict, rejecting unknown keys and wrong types by name."""
    if not isinstance(values, dict):
        raise ValueError(f"config: {where or 'root'} must be a table, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(
            f"config: unknown key(s) {unknown} in [{where or 'root'}]; "
            f"expected some of {sorted(fields)}"
        )
    kwargs = {
        name: _coerce(hints[name], value, f"{where}.{name}".strip("."))
        for name, value in values.items()
    }
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None:
            return None
        return _coerce(next(a for a in args if a is not type(None)), value, where)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ValueError(f"config: {where} must be a list, got {value!r}")
        return tuple(_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if (
        hint in (int, float, str, bool)
        and not isinstance(value, hint)
        or (hint is int and isinstance(value, bool))
    ):
        raise ValueError(f"config: {where} must be {hint.__name__}, got {value!r}")
    return value


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value parsed as TOML, or the raw string)."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like key=value (e.g. train.max_steps=10)")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> RunConfig:
    """Read a TOML config (or the defaults) and apply `key=value` overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        values = tomllib.loads(path.read_text())
    apply_overrides(values, overrides)
    return _build(RunConfig, current_names(values), "")


def apply_overrides(values: dict[str, Any], overrides: list[str] | tuple = ()) -> None:
    """Set each `a.b=value` override in the nested dict `values` (in place)."""
    for text in overrides:
        keys, value = parse_override(text)
        node = values
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {text!r}: {key} is not a table")
        node[keys[-1]] = value


def config_from_dict(values: dict[str, Any]) -> RunConfig:
    """Inverse of `RunConfig.to_dict` (also of a dict saved before a key was renamed)."""
    return _build(RunConfig, current_names(values), "")


def _rename(values: dict[str, Any], renames: dict[tuple[str, str], str]) -> dict[str, Any]:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in values.items()}
    for (table, old), new in renames.items():
        section = out.get(table)
        if isinstance(section, dict) and old in section:
            if new in section:
                raise ValueError(f"config: [{table}] sets both {new!r} and its old name {old!r}")
            section[new] = section.pop(old)
    return out


def current_names(values: dict[str, Any]) -> dict[str, Any]:
    """A copy of a config dict with renamed keys (`RENAMED_KEYS`) under their current names and
    keys added since (`ADDED_KEYS`) at their "as before" value where missing."""
    out = _rename(values, RENAMED_KEYS)
    for path, before in ADDED_KEYS.items():
        # a missing denoiser table stays missing: its defaults are RunConfig's, not UNetConfig's
        create = path[0] not in ("server_unet", "client_unet", "clients")
        for node in _tables(out, path[:-1], create=create):
            node.setdefault(path[-1], copy.deepcopy(before))
    return out


def _tables(values: dict[str, Any], path: tuple[str, ...], create: bool) -> list[dict]:
    """The tables at `path` ("*": every item of a list, skipping the None or missing ones);
    with `create`, missing tables on a path without "*" are made."""
    nodes: list[Any] = [values]
    for key in path:
        found = []
        for node in nodes:
            if key == "*":
                found += [n for n in node if isinstance(n, dict)] if isinstance(node, list) else []
            elif isinstance(node, dict):
                if create and "*" not in path:
                    found.append(node.setdefault(key, {}))
                elif key in node:
                    found.append(node[key])
        nodes = found
    return [n for n in nodes if isinstance(n, dict)]  # else malformed, which validation names


def first_form(values: dict[str, Any]) -> dict[str, Any]:
    """A copy of a config dict in the form configs were first saved in: renamed keys under
    their first names, keys added since left out while at their "as before" value. Hashes of
    saved results are made of it, so renaming or adding a key does not orphan them."""
    out = _rename(values, {(table, new): old for (table, old), new in RENAMED_KEYS.items()})
    for path, before in ADDED_KEYS.items():
        for node in _tables(out, path[:-1], create=False):
            if _plain(node.get(path[-1], before)) == _plain(before):
                node.pop(path[-1], None)
        if len(path) == 2 and out.get(path[0]) == {}:
            del out[path[0]]  # a table added whole, at its "as before" values
    return out


def _plain(value: Any) -> Any:
    """`value` as JSON holds it (tuples as lists)."""
    return json.loads(json.dumps(value))
