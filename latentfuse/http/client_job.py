"""`latentfuse client`: encode this client's images, train its denoiser, upload its releases.

The client's images, `z0`, `eps_c` and weights stay here; only `ReleaseBatch` messages leave,
through `RemoteServer`. Training is train.py's client step (`Client.draw_batch` and
`denoising_loss` under Accelerate), so the releases are the ones the in-process run makes.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..autoencoder import load_vae, vae_fingerprint
from ..checkpointing import atomic_write_dir, load_state, save_state
from ..client import Client
from ..config import RunConfig
from ..datasets import load_dataset
from ..latents import cached_latents
from ..models import EMA, build_unet
from ..partition import ClientSplit, limit_train_images
from ..privacy import guarantee_record
from ..release_key import KEY_FILE, load_or_create_release_key
from ..runner import _client_start, make_accelerator
from ..setup_run import client_split, make_scheduler, resolve_path
from ..training import denoising_loss, lr_at, shard
from .deploy import DeployConfig
from .remote import RemoteServer

logger = logging.getLogger(__name__)


def global_labels(dataset_names: tuple[str, ...], deploy: DeployConfig) -> torch.Tensor:
    """Map local label i (the data set's class i) to its index in `deploy.class_names`."""
    unknown = sorted(set(dataset_names) - set(deploy.class_names))
    if unknown:
        raise ValueError(
            f"data classes {unknown} are not in deploy.class_names {list(deploy.class_names)}"
        )
    return torch.tensor([deploy.class_names.index(n) for n in dataset_names], dtype=torch.long)


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
        everything = ClientSplit(client_id, tuple(range(len(dataset))), (), ())
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
        self.scheduler = make_scheduler(config)
        split = client_split(config, self.scheduler, client_id)
        cfg = config.train
        self.client = Client(
            client_id,
            latents.latents,
            labels,
            split,
            config.split.release_policy,
            share_labels=config.server_labels == "class",
            seed=cfg.seed,
            release_key=load_or_create_release_key(self.work_dir / KEY_FILE),
            clip_norm=config.privacy.clip_norm,
            max_releases=config.privacy.max_releases,
        )
        self.accelerator = make_accelerator(config, self.work_dir, log=False)
        self.unet = self.ema = self.optimizer = None
        if split.t_cut > 0:  # the same initial weights as build_run gives this client
            torch.manual_seed(cfg.seed * 1000 + client_id + 1)
            unet = build_unet(
                config.client_unet_config(client_id),
                latents.latents.shape[-1],
                latents.latents.shape[1],
                deploy.num_classes + 1,
            )
            optimizer = torch.optim.AdamW(
                unet.parameters(), lr=cfg.client_learning_rate, weight_decay=cfg.weight_decay
            )
            self.unet, self.optimizer = self.accelerator.prepare(unet, optimizer)
            self.ema = EMA(self.accelerator.unwrap_model(self.unet), cfg.ema_decay)
        self.step = 0
        self.uploaded = {"uploaded": 0, "skipped": 0}

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

    def train_step(self) -> float:
        """One optimiser step of the local denoiser on t ~ U{0..t_cut-1}."""
        accelerator, cfg = self.accelerator, self.config.train
        total = 0.0
        for _ in range(cfg.gradient_accumulation_steps):
            self.upload_due()
            batch = self.client.draw_batch(
                cfg.client_batch_size, cfg.label_dropout, self.deploy.num_classes
            )
            with accelerator.accumulate(self.unet):
                with accelerator.autocast():
                    loss = denoising_loss(self.unet, shard(batch, accelerator, accelerator.device))
                accelerator.backward(loss)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr_at(self.step, cfg.client_learning_rate, cfg.warmup_steps)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            total += loss.detach().item() / cfg.gradient_accumulation_steps
        if accelerator.sync_gradients:
            self.ema.update(accelerator.unwrap_model(self.unet), self.step)
            self.step += 1
        return total

    def save_checkpoint(self) -> None:
        """Weights, optimiser, EMA, sampler position, generator and release bookkeeping."""
        tensors = {"generator": self.client.generator_state()}
        modules, optimizers = {}, {}
        if self.unet is not None:
            tensors.update(self.ema.state_tensors("ema.unet"))
            modules["unet"] = self.accelerator.unwrap_model(self.unet)
            optimizers["unet"] = self.optimizer.optimizer
        extra = {"step": self.step, "client": self.client.state()}
        save_state(self.checkpoint_dir, modules, optimizers, extra, tensors)

    def load_checkpoint(self) -> bool:
        """Resume from `checkpoint_dir` if it holds a checkpoint; returns whether it did."""
        if not (self.checkpoint_dir / "state.json").is_file():
            return False
        modules = {} if self.unet is None else {"unet": self.accelerator.unwrap_model(self.unet)}
        optimizers = {} if self.unet is None else {"unet": self.optimizer.optimizer}
        extra, tensors = load_state(self.checkpoint_dir, modules, optimizers)
        if self.unet is not None:
            self.ema.load_tensors(tensors, "ema.unet")
            device = self.accelerator.device
            self.ema.shadow = {k: v.to(device) for k, v in self.ema.shadow.items()}
        self.client.load_state(extra["client"], tensors["generator"])
        self.step = int(extra["step"])
        return True

    def run(self, max_steps: int) -> Path:
        """Upload, train to `max_steps` (resuming a checkpoint), export; the exported folder."""
        if self.load_checkpoint():
            logger.info("client %d resumed at step %d", self.client_id, self.step)
        self.upload_due()
        if self.unet is not None:
            every = self.config.train.checkpoint_every
            bar = tqdm(total=max_steps, initial=self.step, desc=f"client {self.client_id}")
            while self.step < max_steps:
                loss = self.train_step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}")
                if self.step % every == 0:
                    self.save_checkpoint()
            bar.close()
        self.save_checkpoint()
        return self.export()

    def description(self) -> dict:
        """The collafuse.json of this client's model folder (its own entry only)."""
        classes = sorted(set(self.client.labels.tolist()))
        entry = {
            "t_cut": self.client.split.t_cut,
            "release_cut": self.client.split.release_cut,
            **_client_start(self.config, self.client.split),
            "classes": classes,
            "class_names": [self.deploy.class_names[c] for c in classes],
            "num_train_images": self.client.num_images,
        }
        cfg = self.config
        return {
            "format": 1,
            "class_names": list(self.deploy.class_names),
            "clients": {str(self.client_id): entry},
            "server_labels": cfg.server_labels,
            "num_train_timesteps": cfg.split.num_train_timesteps,
            "release_policy": cfg.split.release_policy,
            "objective": cfg.split.objective,
            "weighting": cfg.split.weighting,
            "vae_sha256": self.vae_hash,
            "privacy": guarantee_record(
                cfg, self.scheduler.alphas_cumprod, {self.client_id: self.client.split.release_cut}
            ),
        }

    def export(self) -> Path:
        """Write `work_dir/model`: vae/, scheduler/, clients/<id>/ (EMA weights), collafuse.json."""

        def write(tmp: Path) -> None:
            """Fill the temporary folder that becomes `work_dir/model`."""
            self.vae.save_pretrained(tmp / "vae", safe_serialization=True)
            self.scheduler.save_pretrained(tmp / "scheduler")
            if self.unet is not None:
                model = copy.deepcopy(self.accelerator.unwrap_model(self.unet)).float()
                self.ema.copy_to(model).save_pretrained(
                    tmp / "clients" / str(self.client_id), safe_serialization=True
                )
            (tmp / "collafuse.json").write_text(json.dumps(self.description(), indent=2))

        return atomic_write_dir(self.work_dir / "model", write)
