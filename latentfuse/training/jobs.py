"""What every entry point builds the same way: the denoisers and the seeds they start from.

The in-process run (`training.setup.build_run`), the deployment client (`deploy.client.job`),
the deployment server's trainer (`deploy.server.trainer`) and the Flower apps all make their
denoisers here, so one config and one seed give the same initial weights on every path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from latentfuse.conditioning import build_denoiser
from latentfuse.config import RunConfig, UNetConfig


@dataclass(frozen=True)
class DenoiserSpec:
    """What a run's denoisers see besides the latents (conditioning.kind and its sizes)."""

    kind: str  # "class", "attributes" or "text"
    num_classes: int  # class labels known to the run; the null label is the index after them
    num_attributes: int = 0  # "attributes": length of an image's attribute vector
    cross_attention_dim: int = 0  # "text": the text encoder's width
    class_names: tuple[str, ...] = ()  # matched to a pretrained base's class rows by name

    def __post_init__(self) -> None:
        if self.kind not in ("class", "attributes", "text"):
            raise ValueError(f"kind must be class, attributes or text, got {self.kind!r}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {self.num_classes}")


def client_seed(config: RunConfig, client_id: int) -> int:
    """The seed of client `client_id`'s initial weights (distinct from the server's)."""
    return config.train.seed * 1000 + client_id + 1


def server_seed(config: RunConfig) -> int:
    """The seed of the server denoiser's initial weights."""
    return config.train.seed * 1000


def client_denoiser(
    config: RunConfig, client_id: int, spec: DenoiserSpec, sample_size: int, channels: int
) -> torch.nn.Module:
    """Client `client_id`'s denoiser (its own `[[clients]]` UNet where it has one), seeded."""
    torch.manual_seed(client_seed(config, client_id))
    return make_denoiser(
        config.client_unet_config(client_id),
        spec,
        sample_size,
        channels,
        spec.kind,
        spec.num_classes + 1,
        spec.class_names or None,
        where="client_unet",
    )


def server_embeddings(config: RunConfig, spec: DenoiserSpec) -> tuple[str, int | None]:
    """(kind, embeddings) of the server denoiser: the images' conditioning under
    server_labels "class"; client ids (one embedding each plus the null) under "client";
    nothing under "none"."""
    if config.server_labels == "class":
        return spec.kind, spec.num_classes + 1
    if config.server_labels == "client":
        return "class", config.data.num_clients + 1
    return "class", None


def server_denoiser(
    config: RunConfig, spec: DenoiserSpec, sample_size: int, channels: int
) -> torch.nn.Module:
    """The shared denoiser of the high-noise timesteps, seeded."""
    kind, num_embeds = server_embeddings(config, spec)
    torch.manual_seed(server_seed(config))
    names = spec.class_names or None if config.server_labels == "class" else None
    return make_denoiser(
        config.server_unet, spec, sample_size, channels, kind, num_embeds, names, "server_unet"
    )


def make_denoiser(
    cfg: UNetConfig,
    spec: DenoiserSpec,
    sample_size: int,
    channels: int,
    kind: str,
    num_embeds: int | None,
    class_names: tuple[str, ...] | None,
    where: str,
) -> torch.nn.Module:
    """A denoiser of random weights (`conditioning.build_denoiser`), or from `cfg.pretrained`
    (`training.pretrained.denoiser_from_base`: its architecture and weights, LoRA if asked)."""
    if cfg.pretrained:
        from latentfuse.training.pretrained import denoiser_from_base

        return denoiser_from_base(
            cfg,
            kind,
            sample_size,
            channels,
            where=where,
            num_class_embeds=num_embeds,
            class_names=class_names,
            num_attributes=spec.num_attributes,
            cross_attention_dim=spec.cross_attention_dim,
        )
    return build_denoiser(
        cfg,
        kind,
        sample_size,
        channels,
        num_class_embeds=num_embeds,
        num_attributes=spec.num_attributes,
        cross_attention_dim=spec.cross_attention_dim,
    )
