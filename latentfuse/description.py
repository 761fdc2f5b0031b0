"""The model description (`collafuse.json`): one typed record, written by one function.

The in-process job, the deployment server and the deployment client each describe the model
folder they write with `model_description`; the pipelines read it back
(`latentfuse/pipelines/folder.py`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
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
    client_start: int | None = None  # under the original objective: the authors' compensation

    def to_json(self) -> dict[str, Any]:
        """The entry as collafuse.json holds it (unknown fields left out)."""
        entry = asdict(self)
        entry["classes"], entry["class_names"] = list(self.classes), list(self.class_names)
        return {k: v for k, v in entry.items() if v is not None}


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
        t_cut=split.t_cut,
        release_cut=split.release_cut,
        classes=tuple(int(c) for c in classes),
        class_names=tuple(class_names[c] for c in classes),
        num_train_images=num_train_images,
        num_eval_images=num_eval_images,
        client_start=start,
    )


def model_description(
    config: RunConfig,
    class_names: Sequence[str],
    clients: Mapping[int, ClientEntry],
    alphas_cumprod: torch.Tensor,
    vae_sha256: str | None = None,
    data: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The collafuse.json of a model folder holding `clients` (all of them, or one client's
    own entry in a deployment client's folder, or the server's view of every client)."""
    description: dict[str, Any] = {
        "format": DESCRIPTION_FORMAT,
        "class_names": list(class_names),
        "clients": {str(cid): clients[cid].to_json() for cid in sorted(clients)},
        "server_labels": config.server_labels,
        "num_train_timesteps": config.split.num_train_timesteps,
        "release_policy": config.split.release_policy,
        "objective": config.split.objective,
        "weighting": config.split.weighting,
        "privacy": guarantee_record(
            config, alphas_cumprod, {cid: e.release_cut for cid, e in clients.items()}
        ),
        "run_config": config.to_dict(),
    }
    if vae_sha256 is not None:
        description["vae_sha256"] = vae_sha256
    if data is not None:
        description["data"] = data
    return description


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
