"""`latentfuse client`: encode this client's images, train its denoiser, upload its releases.

The client's images, `z0`, `eps_c` and weights stay here; only `ReleaseBatch` messages leave,
through `RemoteServer`. Training is the engine's step (`latentfuse.training.engine`) on
`Client.draw_batch`, so the releases and weights are the ones the in-process run makes.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import torch

from latentfuse.checkpointing import atomic_write_dir
from latentfuse.conditioning import TextConditioner, attribute_vectors, image_prompts, load_text
from latentfuse.config import RunConfig
from latentfuse.data.autoencoder import load_vae, vae_fingerprint
from latentfuse.data.datasets import ImageDataset, load_dataset
from latentfuse.data.latents import cached_latents
from latentfuse.data.partition import ClientShare, limit_train_images
from latentfuse.deploy.client.remote import RemoteServer
from latentfuse.deploy.conditioning import WireConditioning, attribute_order
from latentfuse.deploy.config import DeployConfig
from latentfuse.description import client_entry, conditioning_record, model_description
from latentfuse.method.client import Client
from latentfuse.method.release_key import KEY_FILE, load_or_create_release_key
from latentfuse.method.schedule import client_split, make_scheduler
from latentfuse.method.split import client_train_cut
from latentfuse.paths import resolve_path
from latentfuse.training.engine import Batch, Engine, make_accelerator
from latentfuse.training.jobs import client_denoiser
from latentfuse.training.loop import fit
from latentfuse.training.pretrained import save_denoiser

logger = logging.getLogger(__name__)


def global_labels(dataset_names: tuple[str, ...], deploy: DeployConfig) -> torch.Tensor:
    """Map local label i (the data set's class i) to its index in `deploy.class_names`."""
    unknown = sorted(set(dataset_names) - set(deploy.class_names))
    if unknown:
        raise ValueError(
            f"data classes {unknown} are not in deploy.class_names {list(deploy.class_names)}"
        )
    return torch.tensor([deploy.class_names.index(n) for n in dataset_names], dtype=torch.long)


def image_rows(
    config: RunConfig,
    deploy: DeployConfig,
    dataset: ImageDataset,
    indices: list[int],
    labels: torch.Tensor,
    text: TextConditioner | None,
) -> torch.Tensor:
    """Each image's conditioning as the deployment carries it: its global class label, its
    +-1 attribute vector in `deploy.attribute_names` order, or its prompt's token states."""
    kind = config.conditioning.kind
    if kind == "class":
        return labels
    if kind == "attributes":
        columns = attribute_order(dataset.attribute_names, deploy)
        return attribute_vectors(dataset.attributes[list(indices)][:, columns])
    prompts = image_prompts(dataset, list(indices), config.conditioning.prompt_template)
    return text.embed(prompts)


class ClientJob:
    """One client's whole job: its latents, its denoiser, its checkpoints and its uploads."""

    def __init__(
        self,
        config: RunConfig,
        deploy: DeployConfig,
        client_id: int,
        data: str | Path,
        work_dir: str | Path,
        remote: RemoteServer | None,
    ):
        self.config, self.deploy, self.client_id = config, deploy, client_id
        self.work_dir, self.remote = Path(work_dir), remote
        self.vae = load_vae(resolve_path(config.vae))
        self.vae_hash = vae_fingerprint(self.vae)
        dataset = load_dataset(data)
        everything = ClientShare(client_id, tuple(range(len(dataset))), (), ())
        limit, seed = config.data.max_images_per_client, config.data.seed
        indices = list(limit_train_images(everything, limit, seed).train_indices)
        latents = cached_latents(
            self.vae,
            dataset,
            indices,
            self.work_dir / "latents",
            config.data.resolution,
            vae_hash=self.vae_hash,
        )
        labels = global_labels(dataset.class_names, deploy)[latents.labels]
        self.conditioning = WireConditioning.of(config, deploy)
        self.text = load_text(config)
        rows = image_rows(config, deploy, dataset, indices, labels, self.text)
        self.attribute_rates = None
        if config.conditioning.kind != "class" and deploy.attribute_names:
            columns = attribute_order(dataset.attribute_names, deploy)
            present = dataset.attributes[list(indices)][:, columns]  # numpy 0/1, as in-process
            self.attribute_rates = tuple(present.mean(0).round(4).tolist())
        self.scheduler = make_scheduler(config)
        split = client_split(config, self.scheduler, client_id)
        cfg = config.train
        self.client = Client(
            client_id,
            latents.latents,
            rows,
            split,
            config.split.release_policy,
            share_labels=config.server_labels == "class",
            seed=cfg.seed,
            release_key=load_or_create_release_key(self.work_dir / KEY_FILE),
            clip_norm=config.privacy.clip_norm,
            max_releases=config.privacy.max_releases,
            train_cut=client_train_cut(split, config.split.objective, config.split.client_entry),
        )
        self.accelerator = make_accelerator(cfg, self.work_dir)
        self.model_name = f"client_{client_id}"  # the in-process job's name for this model
        models = {}
        if split.handoff_t > 0:  # the same initial weights as build_run gives this client
            spec = self.conditioning.spec
            size, channels = latents.latents.shape[-1], latents.latents.shape[1]
            models[self.model_name] = client_denoiser(config, client_id, spec, size, channels)
        self.null = self.conditioning.null(self.text)
        self.classes = sorted(set(labels.tolist()))
        self.engine = Engine(
            self.accelerator,
            models,
            {self.model_name: cfg.client_learning_rate},
            cfg,
            config.to_dict(),
        )
        self.uploaded = {"uploaded": 0, "skipped": 0}

    @property
    def step(self) -> int:
        """Optimiser steps taken."""
        return self.engine.step

    @property
    def trains(self) -> bool:
        """Whether this client has timesteps of its own (t_cut > 0)."""
        return bool(self.engine.wrapped)

    @property
    def checkpoint_dir(self) -> Path:
        """Where this client's resumable state lives."""
        return self.work_dir / "checkpoint"

    def upload_due(self) -> None:
        """Send the releases that are due (all images once: `once`; at each epoch: `fresh`)."""
        for message in self.client.due_releases():
            if self.remote is None:
                raise RuntimeError("a release is due but this job has no server")
            counts = self.remote.upload_release(
                message, self.deploy.upload_chunk_size, fp16=self.deploy.fp16_wire
            )
            for key, value in counts.items():
                self.uploaded[key] += value
            logger.info("client %d epoch %d release: %s", self.client_id, message.epoch, counts)

    def _draw(self) -> dict[str, Batch]:
        self.upload_due()
        cfg = self.config.train
        batch = self.client.draw_batch(cfg.client_batch_size, cfg.label_dropout, self.null)
        return {self.model_name: batch}

    def train_step(self) -> float:
        """One optimiser step of the local denoiser on t ~ U{0..t_cut-1}."""
        return self.engine.train_step(self._draw)[self.model_name]

    def save_checkpoint(self) -> None:
        """The engine's checkpoint plus the sampler position, generator and release record."""
        tensors = {f"generator.{self.model_name}": self.client.generator_state()}
        self.engine.save(self.checkpoint_dir, {"client": self.client.state()}, tensors)

    def load_checkpoint(self) -> bool:
        """Resume from `checkpoint_dir` if it holds a checkpoint; returns whether it did."""
        loaded = self.engine.load(self.checkpoint_dir)
        if loaded is None:
            return False
        extra, tensors = loaded
        self.client.load_state(extra["client"], tensors[f"generator.{self.model_name}"])
        return True

    def run(self, max_steps: int) -> Path:
        """Upload, train to `max_steps` (resuming a checkpoint), export; the exported folder."""
        if self.load_checkpoint():
            logger.info("client %d resumed at step %d", self.client_id, self.step)
        self.upload_due()
        if self.trains:
            every = self.config.train.checkpoint_every
            fit(self, max_steps, every, desc=f"client {self.client_id}")
        self.save_checkpoint()
        return self.export()

    def description(self) -> dict:
        """The collafuse.json of this client's model folder (its own entry only)."""
        entry = client_entry(
            self.config,
            self.client.split,
            self.classes,
            self.deploy.class_names,
            num_train_images=self.client.num_images,
        )
        entry = replace(entry, attribute_rates=self.attribute_rates)
        described = model_description(
            self.config,
            self.deploy.class_names,
            {self.client_id: entry},
            self.scheduler.alphas_cumprod,
            vae_sha256=self.vae_hash,
            conditioning=conditioning_record(self.config, self.deploy.attribute_names),
        )
        return described.to_json()

    def export(self) -> Path:
        """Write `work_dir/model`: vae/, scheduler/, clients/<id>/ (EMA weights), collafuse.json."""

        def write(tmp: Path) -> None:
            """Fill the temporary folder that becomes `work_dir/model`."""
            self.vae.save_pretrained(tmp / "vae", safe_serialization=True)
            self.scheduler.save_pretrained(tmp / "scheduler")
            if self.text is not None:  # the public encoder: prompts -> states when sampling
                self.text.save(tmp)
            if self.trains:  # LoRA: its adapters and its base's reference, or merged
                save_denoiser(
                    self.engine.ema_model(self.model_name),
                    tmp / "clients" / str(self.client_id),
                    self.config.client_unet_config(self.client_id).pretrained,
                    merge=self.config.train.export_merged,
                )
            (tmp / "collafuse.json").write_text(json.dumps(self.description(), indent=2))

        return atomic_write_dir(self.work_dir / "model", write)
