"""The one training engine: every denoiser that trains anywhere trains here.

The in-process job (train.py), the deployment server's trainer and the deployment client each
hand `Engine` their named denoisers and a function that draws a global batch per denoiser;
the engine owns AdamW, the learning-rate warm-up, the EMA, gradient accumulation, mixed
precision (all under Accelerate) and the one checkpoint layout. A checkpoint records the
configuration that rebuilds it, and a resume under a different one is refused.

Data parallelism: every process draws the same global batch and keeps its shard
(`shard`); DDP averages the gradients, so N processes compute the update of one.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration

from latentfuse.checkpointing import load_state, recover_dir, save_state
from latentfuse.conditioning import unet_inputs
from latentfuse.config import TrainConfig, current_names
from latentfuse.models import EMA

logger = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor | None]
CHECKPOINT_FORMAT = 2
# Keys a resume may change: they set how long and how visibly training runs, not what it learns.
RESUMABLE_KEYS = frozenset(
    f"train.{k}"
    for k in (
        "max_steps",
        "checkpoint_every",
        "log_every",
        "sample_every",
        "num_preview_images",
        "preview_inference_steps",
        "export_merged",
    )
)


def make_accelerator(
    train: TrainConfig, output_dir: Path | None = None, log: bool = False
) -> Accelerator:
    """An Accelerator with the run's precision and accumulation (and TensorBoard when `log`)."""
    project = None
    if output_dir is not None:
        project = ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(Path(output_dir) / "logs")
        )
    return Accelerator(
        mixed_precision=train.mixed_precision,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        log_with="tensorboard" if log else None,
        project_config=project,
    )


def lr_at(
    step: int,
    base: float,
    warmup: int,
    schedule: str = "constant",
    max_steps: int = 1,
    floor: float = 0.0,
) -> float:
    """Linear warm-up to `base`, then constant, or ("cosine") a cosine decay to `floor` at
    `max_steps`."""
    if step < warmup or schedule == "constant":
        return base * min(1.0, (step + 1) / max(1, warmup))
    if schedule != "cosine":
        raise ValueError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return floor + (base - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def shard(batch: Batch, accelerator: Accelerator, device: torch.device) -> Batch:
    """This process's slice of a global batch, moved to `device`."""
    rank, world = accelerator.process_index, accelerator.num_processes
    out: Batch = {}
    for key, value in batch.items():
        if value is None:
            out[key] = None
            continue
        size = len(value) // world
        out[key] = value[rank * size : (rank + 1) * size].to(device)
    return out


def denoising_loss(unet: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Weighted eps-prediction MSE: mean_i w_i ||unet(x_i, t_i, y_i) - target_i||^2 / dim."""
    cond = unet_inputs(unet, batch["class_labels"])
    prediction = unet(batch["sample"], batch["timestep"], **cond).sample
    per_sample = (prediction.float() - batch["target"].float()).pow(2).flatten(1).mean(1)
    return (batch["weight"] * per_sample).mean()


def group_clipped_backward(
    unet: torch.nn.Module, batch: Batch, clip: float, scale: float = 1.0
) -> torch.Tensor:
    """Backward of `denoising_loss(unet, batch)` (times `scale`) with each group's part of the
    gradient (a group: the rows of one `batch["groups"]` id, one client) clipped to norm at
    most `clip` times the median of the groups' norms, then summed into the parameters'
    `.grad` (robust aggregation by norm clipping: one client's pull on a step is at most
    `clip` times a typical client's, whatever its data; docs/deployment.md). Returns the
    unclipped loss, detached."""
    groups = batch["groups"]
    params = [p for p in unet.parameters() if p.requires_grad]
    parts, losses = [], []
    for group in groups.unique().tolist():
        rows = groups == group
        part = {k: None if v is None else v[rows] for k, v in batch.items()}
        # the group's share of the batch mean: the sum over groups is the whole batch's loss
        loss = denoising_loss(unet, part) * (rows.sum() / len(groups))
        grads = torch.autograd.grad(loss * scale, params, allow_unused=True)
        parts.append(
            [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
        )
        losses.append(loss.detach())
    norms = torch.stack(
        [torch.linalg.vector_norm(torch.stack([g.norm() for g in part])) for part in parts]
    )
    bound = clip * norms.median()
    for part, norm in zip(parts, norms, strict=True):
        factor = torch.clamp(bound / norm.clamp_min(1e-12), max=1.0)
        for p, g in zip(params, part, strict=True):
            p.grad = g * factor if p.grad is None else p.grad + g * factor
    return torch.stack(losses).sum()


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """The keys (`section.key`) whose values differ, less those a resume may change. Both sides
    are compared as JSON holds them (a tuple in memory is a list on disk)."""
    a, b = (flatten(json.loads(json.dumps(current_names(dict(x))))) for x in (saved, current))
    changed = [
        k for k in sorted(set(a) | set(b)) if k not in RESUMABLE_KEYS and a.get(k) != b.get(k)
    ]
    return [f"{k}: checkpoint {a.get(k)!r}, now {b.get(k)!r}" for k in changed]


class ConfigMismatch(ValueError):
    """A checkpoint was written under a configuration other than the one resuming it."""


class Engine:
    """Named denoisers trained together: one AdamW, warm-up and EMA each; one step loop.

    An engine with no models still keeps the step, the config record and the checkpoint
    layout (a deployment client at t_cut 0 trains nothing but checkpoints its releases).
    `ema_lock` guards the EMA against a reader in another thread (the server's sampling).
    """

    def __init__(
        self,
        accelerator: Accelerator,
        models: dict[str, torch.nn.Module],
        learning_rates: dict[str, float],
        train: TrainConfig,
        config_record: dict[str, Any],
        group_clip: dict[str, float] | None = None,
    ):
        self.accelerator, self.train, self.config_record = accelerator, train, config_record
        # models whose gradient is clipped per group of rows (`group_clipped_backward`)
        self.group_clip = {n: c for n, c in (group_clip or {}).items() if c > 0}
        unknown = sorted(set(self.group_clip) - set(models))
        if unknown:
            raise ValueError(f"group_clip: no model named {unknown} (models: {list(models)})")
        if self.group_clip and train.mixed_precision == "fp16":
            raise ValueError(
                "a per-client gradient clip (deploy.client_gradient_clip) does not combine with "
                "train.mixed_precision='fp16' (its loss scaling); use 'bf16' or 'no'"
            )
        self.learning_rates = dict(learning_rates)
        names = list(models)
        optimizers = [  # a frozen base's weights (LoRA) are no optimiser's
            torch.optim.AdamW(
                [p for p in models[n].parameters() if p.requires_grad],
                lr=self.learning_rates[n],
                weight_decay=train.weight_decay,
            )
            for n in names
        ]
        prepared = accelerator.prepare(*[models[n] for n in names], *optimizers) if names else ()
        self.wrapped = dict(zip(names, prepared[: len(names)], strict=True))
        self.optimizers = dict(zip(names, prepared[len(names) :], strict=True))
        self.emas = {
            n: EMA(accelerator.unwrap_model(m), train.ema_decay) for n, m in self.wrapped.items()
        }
        self.ema_lock = threading.Lock()
        self.step = 0
        self.skipped = dict.fromkeys(names, 0)  # optimiser steps skipped for a non-finite gradient

    def _finite_gradients(self, name: str) -> bool:
        """Whether every gradient of model `name` is finite (after DDP's all-reduce the same
        answer on every process, so all skip together)."""
        grads = [p.grad for p in self.wrapped[name].parameters() if p.grad is not None]
        return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()) if grads else True

    def _average_clipped_gradients(self, names: list[str]) -> None:
        """Average the gradients of the group-clipped models over the processes (what DDP does
        for the others): each process clipped its own shard's groups, so one client's pull on
        the average is still at most its bound."""
        if self.accelerator.num_processes == 1:
            return
        for name in (n for n in names if n in self.group_clip):
            for p in self.module(name).parameters():
                if p.requires_grad:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    p.grad = self.accelerator.reduce(p.grad, reduction="mean")

    def module(self, name: str) -> torch.nn.Module:
        """The trained (unwrapped) module `name`."""
        return self.accelerator.unwrap_model(self.wrapped[name])

    def train_step(
        self, draw: Callable[[], dict[str, Batch]], names: Sequence[str] | None = None
    ) -> dict[str, float]:
        """One optimiser step of the models `names` (default: every model); `draw()` gives
        each of them its global micro-batch. The others keep their weights and EMA this step.

        Returns each trained model's loss on this process's shards, averaged over the
        micro-batches.
        """
        if not self.wrapped:
            raise RuntimeError("this engine holds no model to train")
        names = list(self.wrapped) if names is None else list(names)
        unknown = [n for n in names if n not in self.wrapped]
        if unknown or not names:
            raise ValueError(f"names: expected some of {list(self.wrapped)}, got {names}")
        accelerator, train = self.accelerator, self.train
        accumulation = train.gradient_accumulation_steps
        stepping = {n: self.wrapped[n] for n in names}
        losses = dict.fromkeys(stepping, 0.0)
        for _ in range(accumulation):
            batches = draw()
            with accelerator.accumulate(*stepping.values()):
                # accumulate: one backward over the sum of the models' losses
                total = 0.0
                for name, unet in stepping.items():
                    batch = shard(batches[name], accelerator, accelerator.device)
                    with accelerator.autocast():
                        if name in self.group_clip:  # its own backward, outside DDP
                            loss = group_clipped_backward(
                                self.module(name), batch, self.group_clip[name], 1 / accumulation
                            )
                        else:
                            loss = denoising_loss(unet, batch)
                            total = total + loss
                    losses[name] += loss.detach().item() / accumulation
                if torch.is_tensor(total):
                    accelerator.backward(total)
                if accelerator.sync_gradients:
                    self._average_clipped_gradients(list(stepping))
                # update weights (Accelerate skips the step until the last micro-batch); a
                # model whose gradient is not finite keeps its last good weights
                for name in stepping:
                    optimizer = self.optimizers[name]
                    if accelerator.sync_gradients and not self._finite_gradients(name):
                        self.skipped[name] += 1
                        logger.warning(
                            "%s: non-finite gradient at step %d, step skipped (%d so far)",
                            name,
                            self.step,
                            self.skipped[name],
                        )
                        optimizer.zero_grad(set_to_none=True)
                        continue
                    for group in optimizer.param_groups:
                        group["lr"] = lr_at(
                            self.step,
                            self.learning_rates[name],
                            train.warmup_steps,
                            train.lr_schedule,
                            train.max_steps,
                        )
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
        if accelerator.sync_gradients:  # update EMA, once per optimiser step
            with self.ema_lock:
                for name in stepping:
                    self.emas[name].update(self.module(name), self.step)
                self.step += 1
        return losses

    # ---- checkpoints ---------------------------------------------------------------------------
    def save(
        self,
        directory: str | Path,
        extra: dict[str, Any] | None = None,
        tensors: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Weights, optimisers, EMA, RNG, step and config, plus the caller's `extra` JSON and
        `tensors`, written atomically by the main process."""
        if self.accelerator.is_main_process:
            payload = dict(tensors or {})
            with self.ema_lock:
                for name, ema in self.emas.items():
                    payload.update(ema.state_tensors(f"ema.{name}"))
            record = {
                "format": CHECKPOINT_FORMAT,
                "step": self.step,
                "config": self.config_record,
                **(extra or {}),
            }
            save_state(
                directory,
                {n: self.module(n) for n in self.wrapped},
                {n: o.optimizer for n, o in self.optimizers.items()},
                record,
                payload,
            )
        self.accelerator.wait_for_everyone()

    def load(self, directory: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
        """Resume from `directory` if it holds a checkpoint: its extra JSON and tensors, else None.

        ConfigMismatch if the checkpoint was written under a different configuration.
        """
        directory = recover_dir(directory)
        if not (directory / "state.json").is_file():
            return None
        try:
            saved = json.loads((directory / "state.json").read_text())["extra"]
        except (ValueError, KeyError) as error:
            raise ValueError(
                f"{directory / 'state.json'} is corrupt ({error}): restore the checkpoint "
                "from a backup, or move the folder aside to start training over"
            ) from None
        if "config" in saved:
            differences = config_differences(saved["config"], self.config_record)
            if differences:
                raise ConfigMismatch(
                    f"{directory} was written under another configuration; resume it with the "
                    f"one it records, or start a new run folder. Differences: "
                    + "; ".join(differences)
                )
        else:
            logger.warning("%s records no configuration: it cannot be checked", directory)
        missing = [n for n in self.wrapped if not (directory / f"{n}.safetensors").is_file()]
        if missing:
            held = sorted(p.stem for p in directory.glob("*.safetensors"))
            raise ConfigMismatch(
                f"{directory} holds no weights for {missing} (it holds {held}): it was written "
                "by another run or an older layout; start a new folder"
            )
        try:
            extra, tensors = load_state(
                directory,
                {n: self.module(n) for n in self.wrapped},
                {n: o.optimizer for n, o in self.optimizers.items()},
            )
        except (OSError, RuntimeError, ValueError, KeyError) as error:  # safetensors, shapes
            raise ValueError(
                f"checkpoint {directory} cannot be read ({type(error).__name__}: {error}): "
                "restore it from a backup, or move it aside to start training over"
            ) from None
        device = self.accelerator.device
        for name, ema in self.emas.items():  # the EMA lives where its model lives
            ema.load_tensors(tensors, f"ema.{name}")
            ema.shadow = {k: v.to(device) for k, v in ema.shadow.items()}
        self.step = int(extra["step"])
        return extra, tensors

    def ema_model(self, name: str) -> torch.nn.Module:
        """A float32 copy of model `name` carrying its EMA weights, in eval mode."""
        model = copy.deepcopy(self.module(name)).float()
        with self.ema_lock:
            return self.emas[name].copy_to(model).eval().requires_grad_(False)
