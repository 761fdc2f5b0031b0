"""The model description (`collafuse.json`): one typed record, one writer, one reader.

The in-process job, the deployment server and the deployment client each describe the model
folder they write with `model_description` (a `ModelDescription`); `ModelDescription.to_json`
is the only writer of the file and `ModelDescription.from_json` the only reader: it fills in
what older files left out (in one place), so the pipelines and commands read a complete
record (`latentfuse/pipelines/folder.py: read_description`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch

from latentfuse.config import RunConfig
from latentfuse.method.privacy import guarantee_record
from latentfuse.method.split import DiffusionSplit, client_start

DESCRIPTION_FORMAT = 1


@dataclass(frozen=True)
class ClientEntry:
    """What the description says of one client: its cut and the classes it may sample."""

    t_cut: int  # the hand-off level: the client's steps are t < t_cut
    release_cut: int  # the level its releases are noised to (>= t_cut under a buffer)
    classes: tuple[int, ...]  # global class indices this client may ask for
    class_names: tuple[str, ...]
    num_train_images: int | None = None  # unknown to the server
    num_eval_images: int | None = None
    client_start: int | None = None  # where sampling starts the client, if above the cut
    attribute_rates: tuple[float, ...] | None = None  # attribute-conditioned models

    def to_json(self) -> dict[str, Any]:
        """The entry as collafuse.json holds it (unknown fields left out)."""
        entry = asdict(self)
        entry["classes"], entry["class_names"] = list(self.classes), list(self.class_names)
        if self.attribute_rates is not None:
            entry["attribute_rates"] = list(self.attribute_rates)
        return {k: v for k, v in entry.items() if v is not None}

    @classmethod
    def from_json(cls, entry: Mapping[str, Any]) -> ClientEntry:
        """Inverse of `to_json`; an entry of an older file gets release_cut = t_cut."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(entry) - known)
        if unknown:
            raise ValueError(f"a client entry has unknown keys {unknown}; known: {sorted(known)}")
        values = dict(entry)
        values.setdefault("release_cut", entry["t_cut"])
        values["classes"] = tuple(int(c) for c in values.get("classes", ()))
        values["class_names"] = tuple(values.get("class_names", ()))
        if values.get("attribute_rates") is not None:
            values["attribute_rates"] = tuple(values["attribute_rates"])
        return cls(**values)


@dataclass(frozen=True)
class ModelDescription:
    """What a model folder is: its clients and their cuts, the objective, the conditioning,
    the privacy record and the run config that made it."""

    class_names: tuple[str, ...]
    clients: Mapping[int, ClientEntry]
    server_labels: str = "class"
    num_train_timesteps: int = 1000
    release_policy: str = "once"
    objective: str = "exact"
    weighting: str = "none"
    conditioning: Mapping[str, Any] = field(default_factory=lambda: {"kind": "class"})
    privacy: Mapping[str, Any] | None = None
    run_config: Mapping[str, Any] = field(default_factory=dict)
    guidance_scale: float | None = None  # None: the rule (`guidance_rule`) on the run config
    vae_sha256: str | None = None
    data: Mapping[str, Any] | None = None
    training: Mapping[str, Any] | None = None  # steps made, planned, wall time
    metrics: Mapping[str, Any] | None = None  # evaluation figures for the model card
    format: int = DESCRIPTION_FORMAT

    def __post_init__(self) -> None:
        if not self.clients:
            raise ValueError("a model description needs at least one client")
        if self.conditioning.get("kind") not in ("class", "attributes", "text"):
            raise ValueError(
                f"conditioning.kind must be class, attributes or text, got "
                f"{self.conditioning.get('kind')!r}"
            )

    def to_json(self) -> dict[str, Any]:
        """collafuse.json's content: the only writer of the file."""
        out: dict[str, Any] = {
            "format": self.format,
            "class_names": list(self.class_names),
            "clients": {str(c): self.clients[c].to_json() for c in sorted(self.clients)},
            "server_labels": self.server_labels,
            "num_train_timesteps": self.num_train_timesteps,
            "release_policy": self.release_policy,
            "objective": self.objective,
            "weighting": self.weighting,
            "conditioning": dict(self.conditioning),
            "privacy": self.privacy,
            "run_config": dict(self.run_config),
            "guidance_scale": self.default_guidance,
        }
        for name in ("vae_sha256", "data", "training", "metrics"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out

    @classmethod
    def from_json(cls, values: Mapping[str, Any]) -> ModelDescription:
        """A description from collafuse.json: the only reader. Files written before a field
        existed get its "as before" value here and nowhere else."""
        if not isinstance(values.get("clients"), Mapping) or not values["clients"]:
            raise ValueError("collafuse.json has no 'clients' table")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:  # nothing is dropped silently: a newer file, or a hand edit
            raise ValueError(f"collafuse.json: unknown keys {unknown}; known: {sorted(known)}")
        kept = dict(values)
        kept["class_names"] = tuple(values.get("class_names", ()))
        kept["clients"] = {int(c): ClientEntry.from_json(e) for c, e in values["clients"].items()}
        kept["conditioning"] = {"kind": "class", **(values.get("conditioning") or {})}
        return cls(**kept)

    @property
    def default_guidance(self) -> float:
        """The guidance this model is sampled with unless told otherwise."""
        if self.guidance_scale is not None:
            return float(self.guidance_scale)
        train = self.run_config.get("train", {})
        return guidance_rule(train.get("label_dropout", 0), self.server_labels, None)

    def with_training(self, training: Mapping[str, Any]) -> ModelDescription:
        """A copy recording how it was trained (steps made, planned, wall time)."""
        return replace(self, training=dict(training))


def client_entry(
    config: RunConfig,
    split: DiffusionSplit,
    classes: Sequence[int],
    class_names: Sequence[str],
    num_train_images: int | None = None,
    num_eval_images: int | None = None,
) -> ClientEntry:
    """One client's entry; where sampling starts the client above the hand-off (the authors'
    compensation, `split.client_start`) it records that level."""
    start = client_start(split, config.split.objective, config.split.client_entry)
    return ClientEntry(
        t_cut=split.handoff_t,
        release_cut=split.release_cut,
        classes=tuple(int(c) for c in classes),
        class_names=tuple(class_names[c] for c in classes),
        num_train_images=num_train_images,
        num_eval_images=num_eval_images,
        client_start=start,
    )


def conditioning_record(config: RunConfig, attribute_names: Sequence[str] = ()) -> dict[str, Any]:
    """collafuse.json's "conditioning": the kind; for attribute and text kinds the attribute
    names in vector order (what sampling draws and prompts are made of); for text the prompt
    template, the prompt length and the text encoder."""
    kind = config.conditioning.kind
    record: dict[str, Any] = {"kind": kind}
    if kind != "class" and attribute_names:
        record["attribute_names"] = list(attribute_names)
    if kind == "text":
        record.update(
            prompt_template=config.conditioning.prompt_template,
            max_length=config.conditioning.max_length,
            text_encoder=config.conditioning.text_encoder,
        )
    return record


def model_description(
    config: RunConfig,
    class_names: Sequence[str],
    clients: Mapping[int, ClientEntry],
    alphas_cumprod: torch.Tensor,
    vae_sha256: str | None = None,
    data: dict[str, Any] | None = None,
    conditioning: Mapping[str, Any] | None = None,
) -> ModelDescription:
    """The description of a model folder holding `clients` (all of them, or one client's own
    entry in a deployment client's folder, or the server's view of every client)."""
    train = config.train
    return ModelDescription(
        class_names=tuple(class_names),
        clients=dict(clients),
        server_labels=config.server_labels,
        num_train_timesteps=config.split.num_train_timesteps,
        release_policy=config.split.release_policy,
        objective=config.split.objective,
        weighting=config.split.weighting,
        conditioning=dict(conditioning or conditioning_record(config)),
        privacy=guarantee_record(
            config, alphas_cumprod, {cid: e.release_cut for cid, e in clients.items()}
        ),
        run_config=config.to_dict(),
        guidance_scale=guidance_rule(
            train.label_dropout, config.server_labels, train.guidance_scale
        ),
        vae_sha256=vae_sha256,
        data=data,
    )


def guidance_rule(label_dropout: float, server_labels: str, guidance_scale: float | None) -> float:
    """The guidance a model is sampled with by default: `guidance_scale` if set, else 3 for a
    model trained with label dropout on class labels (it has learnt the unconditional score
    that classifier-free guidance needs, and looks class-like only with it), else 1."""
    guided = bool(label_dropout) and server_labels == "class"
    return float(guidance_scale or (3.0 if guided else 1.0))


def default_guidance(description: dict[str, Any]) -> float:
    """The guidance a model folder was made for: recorded in collafuse.json, else the rule
    (`guidance_rule`) applied to the run config it records."""
    if "guidance_scale" in description:
        return float(description["guidance_scale"])
    train = description.get("run_config", {}).get("train", {})
    return guidance_rule(train.get("label_dropout", 0), description.get("server_labels"), None)
