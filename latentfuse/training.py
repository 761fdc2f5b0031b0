"""The collaborative training loop under Accelerate.

How client and server steps interleave: each global step, (1) every client hands the
transport any release that is due (all its images once under `once`; anew at each of its
own epochs under `fresh`), (2) the server takes in what arrived, (3) every client with
timesteps of its own (t_cut > 0) makes one optimiser step on a batch of its own latents,
and (4) the server makes one optimiser step on a batch drawn uniformly over all releases it
holds. Clients with more images therefore weigh more in the server's batches, as they would
in central training, while each client's own steps are independent of its data set size
(each client cycles through its own epochs).

Data parallelism: every process draws the same global batch from the same generators and
keeps its shard; DDP averages the gradients, so N processes compute the same update as one.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from accelerate import Accelerator

from .checkpointing import load_state, save_state
from .models import EMA
from .setup_run import Run
from .transport import InProcessTransport

logger = logging.getLogger(__name__)


def lr_at(step: int, base: float, warmup: int) -> float:
    """Linear warm-up to `base`, then constant."""
    return base * min(1.0, (step + 1) / max(1, warmup))


def shard(
    batch: dict[str, torch.Tensor | None], accelerator: Accelerator, device: torch.device
) -> dict[str, torch.Tensor | None]:
    """This process's slice of a global batch, moved to `device`."""
    rank, world = accelerator.process_index, accelerator.num_processes
    out = {}
    for key, value in batch.items():
        if value is None:
            out[key] = None
            continue
        size = len(value) // world
        out[key] = value[rank * size : (rank + 1) * size].to(device)
    return out


def denoising_loss(unet: torch.nn.Module, batch: dict[str, torch.Tensor | None]) -> torch.Tensor:
    """Weighted eps-prediction MSE: mean_i w_i ||unet(x_i, t_i, y_i) - target_i||^2 / dim."""
    prediction = unet(batch["sample"], batch["timestep"], class_labels=batch["class_labels"]).sample
    per_sample = (prediction.float() - batch["target"].float()).pow(2).flatten(1).mean(1)
    return (batch["weight"] * per_sample).mean()


class Trainer:
    """Owns the Accelerate objects, optimisers, EMA and the step loop of one run."""

    def __init__(self, run: Run, accelerator: Accelerator, output_dir: Path):
        self.run, self.accelerator, self.output_dir = run, accelerator, Path(output_dir)
        cfg = run.config.train
        world = accelerator.num_processes
        for name in ("server_batch_size", "client_batch_size"):
            if getattr(cfg, name) % world:
                raise ValueError(
                    f"train.{name}={getattr(cfg, name)} must be divisible by the "
                    f"number of processes ({world})"
                )
        self.transport = InProcessTransport()
        self.models: dict[str, torch.nn.Module] = {}
        if run.server_unet is not None:
            self.models["server"] = run.server_unet
        for cid, unet in run.client_unets.items():
            self.models[f"client_{cid}"] = unet
        self.emas = {name: EMA(m, cfg.ema_decay) for name, m in self.models.items()}
        self.base_lr = {
            name: cfg.learning_rate if name == "server" else cfg.client_learning_rate
            for name in self.models
        }
        optimizers = {
            name: torch.optim.AdamW(
                m.parameters(), lr=self.base_lr[name], weight_decay=cfg.weight_decay
            )
            for name, m in self.models.items()
        }
        names = list(self.models)
        prepared = accelerator.prepare(
            *[self.models[n] for n in names], *[optimizers[n] for n in names]
        )
        self.wrapped = dict(zip(names, prepared[: len(names)], strict=True))
        self.optimizers = dict(zip(names, prepared[len(names) :], strict=True))
        self.step = 0
        self.clients = {c.client_id: c for c in run.clients}

    # ---- one step -------------------------------------------------------------------------
    def exchange_releases(self) -> None:
        """Clients send due releases through the transport; the server takes them in."""
        for client in self.run.clients:
            for message in client.due_releases():
                self.transport.send(message)
        for message in self.transport.receive():
            if self.run.server is not None:
                self.run.server.receive(message)

    def global_batches(self) -> dict[str, dict]:
        """This step's global batch for every model, drawn from the seeded generators."""
        cfg, batches = self.run.config.train, {}
        for name in self.models:
            if name == "server":
                batches[name] = self.run.server.draw_batch(
                    cfg.server_batch_size, cfg.label_dropout, self.run.server_null_label
                )
            else:
                client = self.clients[int(name.split("_")[1])]
                batches[name] = client.draw_batch(
                    cfg.client_batch_size, cfg.label_dropout, self.run.num_classes
                )
        return batches

    def train_step(self) -> dict[str, float]:
        """One optimiser step of every model (with gradient accumulation); returns losses."""
        accelerator, cfg = self.accelerator, self.run.config.train
        losses = {name: 0.0 for name in self.models}
        for _ in range(cfg.gradient_accumulation_steps):
            self.exchange_releases()
            batches = self.global_batches()
            with accelerator.accumulate(*self.wrapped.values()):
                total = 0.0
                for name, unet in self.wrapped.items():
                    with accelerator.autocast():
                        loss = denoising_loss(
                            unet, shard(batches[name], accelerator, accelerator.device)
                        )
                    total = total + loss
                    losses[name] += loss.detach().item() / cfg.gradient_accumulation_steps
                accelerator.backward(total)
                for name, optimizer in self.optimizers.items():
                    for group in optimizer.param_groups:
                        group["lr"] = lr_at(self.step, self.base_lr[name], cfg.warmup_steps)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
        if accelerator.sync_gradients:
            for name, ema in self.emas.items():
                ema.update(accelerator.unwrap_model(self.wrapped[name]), self.step)
            self.step += 1
        return losses

    # ---- checkpoints ----------------------------------------------------------------------
    def checkpoint_dir(self) -> Path:
        """Where the resumable state lives."""
        return self.output_dir / "checkpoint"

    def save_checkpoint(self) -> None:
        """Everything exact resume needs (weights, EMA, optimisers, generators, releases)."""
        if self.accelerator.is_main_process:
            tensors = {}
            for name, ema in self.emas.items():
                tensors.update(ema.state_tensors(f"ema.{name}"))
            for client in self.run.clients:
                tensors[f"generator.client_{client.client_id}"] = client.generator_state()
            if self.run.server is not None:
                tensors["generator.server"] = self.run.server.generator.get_state()
                for key, value in self.run.server.store.state_tensors().items():
                    tensors[f"store.{key}"] = value
            extra = {
                "step": self.step,
                "clients": {str(c.client_id): c.state() for c in self.run.clients},
            }
            modules = {n: self.accelerator.unwrap_model(m) for n, m in self.wrapped.items()}
            save_state(
                self.checkpoint_dir(),
                modules,
                {n: o.optimizer for n, o in self.optimizers.items()},
                extra,
                tensors,
            )
        self.accelerator.wait_for_everyone()

    def load_checkpoint(self) -> bool:
        """Resume from `checkpoint_dir()` if it exists; returns whether it did."""
        directory = self.checkpoint_dir()
        if not (directory / "state.json").is_file():
            return False
        modules = {n: self.accelerator.unwrap_model(m) for n, m in self.wrapped.items()}
        extra, tensors = load_state(
            directory, modules, {n: o.optimizer for n, o in self.optimizers.items()}
        )
        for name, ema in self.emas.items():
            ema.load_tensors(tensors, f"ema.{name}")
        for client in self.run.clients:
            client.load_state(
                extra["clients"][str(client.client_id)],
                tensors[f"generator.client_{client.client_id}"],
            )
        if self.run.server is not None:
            self.run.server.generator.set_state(tensors["generator.server"])
            self.run.server.store.load_tensors(
                {k[len("store.") :]: v for k, v in tensors.items() if k.startswith("store.")}
            )
        self.step = extra["step"]
        return True

    def ema_models(self) -> dict[str, torch.nn.Module]:
        """Copies of every model carrying its EMA weights."""
        import copy

        out = {}
        for name, wrapped in self.wrapped.items():
            model = copy.deepcopy(self.accelerator.unwrap_model(wrapped)).float()
            out[name] = self.emas[name].copy_to(model).eval()
        return out
