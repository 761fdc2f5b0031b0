"""Everything a run builds before its first step: data, latents, clients, server, models."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel

from latentfuse.checkpointing import atomic_write_json
from latentfuse.conditioning import (
    TextConditioner,
    attribute_vectors,
    image_prompts,
    load_text,
    null_condition,
)
from latentfuse.config import RunConfig
from latentfuse.data.autoencoder import Autoencoder, latent_geometry, load_vae, vae_fingerprint
from latentfuse.data.datasets import ImageDataset, load_cifar10, load_dataset
from latentfuse.data.latents import cached_latents, dataset_fingerprint
from latentfuse.data.partition import ClientShare, limit_train_images, partition
from latentfuse.method.client import Client
from latentfuse.method.release_key import (
    client_key_path,
    load_or_create_release_key,
    new_release_key,
)
from latentfuse.method.schedule import client_split, make_scheduler
from latentfuse.method.server import Server
from latentfuse.method.split import client_train_cut
from latentfuse.paths import cache_dir, resolve_path
from latentfuse.training.jobs import DenoiserSpec, client_denoiser, server_denoiser

logger = logging.getLogger(__name__)


@dataclass
class Run:
    """The built pieces of a training run."""

    config: RunConfig
    dataset: ImageDataset
    shares: list[ClientShare]  # each client's images (not its cut: client.split)
    vae: Autoencoder
    vae_hash: str
    scheduler: DDPMScheduler
    clients: list[Client]
    server: Server | None
    server_unet: UNet2DModel | None
    client_unets: dict[int, UNet2DModel] = field(default_factory=dict)
    text: TextConditioner | None = None  # conditioning.kind = "text": the frozen encoder

    @property
    def num_classes(self) -> int:
        """Number of class labels in the data set (the null label is this index)."""
        return len(self.dataset.class_names)

    @property
    def client_null(self) -> torch.Tensor:
        """The clients' null conditioning (label dropout, classifier-free guidance)."""
        return null_condition(
            self.config.conditioning.kind,
            num_classes=self.num_classes,
            num_attributes=len(self.dataset.attribute_names),
            text=self.text,
        )

    @property
    def server_null_label(self) -> int | torch.Tensor:
        """The server's null conditioning: after the real clients (server_labels "client"),
        else the clients' null (unused under "none")."""
        if self.config.server_labels == "client":
            return self.config.data.num_clients
        return self.client_null


def load_run_dataset(config: RunConfig) -> ImageDataset:
    """The data set named by `config.data.source`."""
    data = config.data
    if data.source == "cifar10":
        dataset = load_cifar10(data.subfolder)
    else:
        extra = {"label_attribute": data.label_attribute} if data.label_attribute else {}
        dataset = load_dataset(
            resolve_path(data.source), format=data.format, subfolder=data.subfolder or None, **extra
        )
    return dataset.only_classes(data.classes) if data.classes else dataset


def partition_clients(config: RunConfig, dataset: ImageDataset) -> list[ClientShare]:
    """The clients' shares exactly as the run's data config deals them."""
    data = config.data
    shares = partition(
        dataset,
        data.num_clients,
        data.partition,
        seed=data.seed,
        alpha=data.alpha,
        eval_fraction=data.eval_fraction,
        groups=[list(g) for g in data.groups] or None,
        overlap=data.overlap,
    )
    return [limit_train_images(s, data.max_images_per_client, data.seed) for s in shares]


SCALING_RECORD = "vae_scaling.json"


def latent_std(vae: Autoencoder, dataset: ImageDataset, indices: list[int], resolution: int):
    """(std over all elements, std per channel) of the normalised latents of `indices`."""
    from latentfuse.data.latents import encode_images

    return latent_stats(encode_images(vae, dataset, indices, resolution))


def latent_stats(latents: torch.Tensor) -> tuple[float, list[float]]:
    """(std over all elements, std per channel) of latents (n, c, h, w)."""
    return latents.std().item(), latents.transpose(0, 1).flatten(1).std(1).tolist()


def data_scaling(
    vae: Autoencoder,
    dataset: ImageDataset,
    shares: list[ClientShare],
    config: RunConfig,
    run_dir: str | Path | None,
) -> float:
    """`vae_scaling = "auto"`: the scaling_factor that gives this data's latents std 1, read
    from the run folder's record when there is one (a resume keeps it), else computed from up
    to 1,024 training images and recorded."""
    record = Path(run_dir) / SCALING_RECORD if run_dir is not None else None
    if record is not None and record.is_file():
        return float(json.loads(record.read_text())["scaling_factor"])
    pool = sorted(i for share in shares for i in share.train_indices)
    generator = torch.Generator().manual_seed(config.data.seed)
    picks = [pool[i] for i in torch.randperm(len(pool), generator=generator)[:1024].tolist()]
    before = float(vae.config.scaling_factor or 1.0)
    std, per_channel = latent_std(vae, dataset, picks, config.data.resolution)
    factor = before / std
    logger.info("vae_scaling auto: latent std %.3f -> scaling_factor %.5g", std, factor)
    if record is not None:
        record.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(
            record,
            {
                "scaling_factor": factor,
                "autoencoder_scaling_factor": before,
                "latent_std_before": std,
                "latent_std_per_channel_before": per_channel,
                "num_images": len(picks),
            },
        )
    return factor


def simulated_release_key(run_dir: str | Path | None, client_id: int) -> bytes:
    """A simulated client's secret key: kept in its own part of `run_dir` (made on first use),
    or, without a run folder, a fresh CSPRNG key that lives only in this process."""
    if run_dir is None:
        return new_release_key()
    return load_or_create_release_key(client_key_path(run_dir, client_id))


def build_run(
    config: RunConfig, run_dir: str | Path | None = None, dataset: ImageDataset | None = None
) -> Run:
    """Load data and autoencoder, partition, encode (cached) and build clients and models.

    Each client's release key comes from `run_dir` (`simulated_release_key`): a resumed run
    reproduces its releases, and two runs in different folders never share noise. `dataset`,
    when the caller has already loaded `config.data`, is used instead of loading it again.
    """
    dataset = load_run_dataset(config) if dataset is None else dataset
    shares = partition_clients(config, dataset)
    vae = load_vae(resolve_path(config.vae))
    if config.vae_scaling == "auto":
        vae.register_to_config(scaling_factor=data_scaling(vae, dataset, shares, config, run_dir))
    vae_hash = vae_fingerprint(vae)
    scheduler = make_scheduler(config)
    fingerprint = dataset_fingerprint(dataset)[:12]
    clients, client_unets, cuts = [], {}, {}
    channels, factor = latent_geometry(vae.config)
    latent_size = config.data.resolution // factor
    kind = config.conditioning.kind
    if kind == "attributes" and not dataset.attribute_names:
        raise ValueError(
            f"conditioning.kind = 'attributes' needs a data set with attributes (the CelebA or "
            f"AwA2 format); {config.data.source} has none"
        )
    text = load_text(config)
    spec = DenoiserSpec(
        kind,
        len(dataset.class_names),
        num_attributes=len(dataset.attribute_names),
        cross_attention_dim=text.hidden_size if text is not None else 0,
        class_names=tuple(dataset.class_names),
    )
    for share in shares:
        cid = share.client_id
        indices = share.train_indices  # data.max_images_per_client applied by the partition
        cache = cache_dir() / "latents" / f"{fingerprint}-client{cid}-{len(indices)}"
        latents = cached_latents(
            vae,
            dataset,
            indices,
            cache,
            config.data.resolution,
            vae_hash=vae_hash,
            desc=f"encoding client {cid}'s {len(indices)} images",
        )
        cuts[cid] = client_split(config, scheduler, cid)
        clients.append(
            Client(
                cid,
                latents.latents,
                image_conditioning(config, dataset, indices, latents.labels, text),
                cuts[cid],
                config.split.release_policy,
                share_labels=config.server_labels == "class",
                seed=config.train.seed,
                release_key=simulated_release_key(run_dir, cid),
                clip_norm=config.privacy.clip_norm,
                max_releases=config.privacy.max_releases,
                train_cut=client_train_cut(
                    cuts[cid], config.split.objective, config.split.client_entry
                ),
            )
        )
        if cuts[cid].handoff_t > 0:
            client_unets[cid] = client_denoiser(config, cid, spec, latent_size, channels)
    server, server_unet = None, None
    if any(not s.is_independent for s in cuts.values()):
        server = Server(
            cuts,
            config.split.objective,
            config.split.weighting,
            config.server_labels,
            seed=config.train.seed,
            timestep_density=config.split.server_timesteps,
        )
        server_unet = server_denoiser(config, spec, latent_size, channels)
    return Run(
        config,
        dataset,
        shares,
        vae,
        vae_hash,
        scheduler,
        clients,
        server,
        server_unet,
        client_unets,
        text,
    )


def image_conditioning(
    config: RunConfig,
    dataset: ImageDataset,
    indices: list[int],
    labels: torch.Tensor,
    text: TextConditioner | None,
) -> torch.Tensor:
    """Each image's conditioning of kind `conditioning.kind`: its class label, its attribute
    vector (+-1), or its prompt's token states (latentfuse/conditioning.py)."""
    kind = config.conditioning.kind
    if kind == "class":
        return labels
    if kind == "attributes":
        return attribute_vectors(dataset.attributes[list(indices)])
    prompts = image_prompts(dataset, list(indices), config.conditioning.prompt_template)
    return text.embed(prompts)
