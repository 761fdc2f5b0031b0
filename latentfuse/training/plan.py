"""What `latentfuse train` decides before its first step, from the data and this machine.

The clients and their partition from the number of classes (`choose_clients`); whether the
shipped autoencoder fits the data, fitting it when it does not (`fit_vae_to_data`); the step
budget from a timed probe (`step_seconds`, `derive_steps`) and the deadline `--minutes`
promises; the summary printed and written as `plan.json` (`write_plan`). `plan_run` does all
of it, in this order, before anything is written into the run folder but the plan, and
returns what training needs. The command line (`latentfuse.cli.train`) only reads arguments.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

from latentfuse.config import RunConfig, config_from_dict

logger = logging.getLogger(__name__)

EPOCHS = 400  # epochs of the server's releases the step budget aims for
BUDGET_SECONDS = 20 * 60  # ... unless that takes longer than this here
MIN_STEPS = 500
MIN_IMAGES_PER_CLIENT = 8  # fewer training images a client: refused before any work
STD_RANGE = (0.5, 2.0)  # latent std outside this: warn and offer vae_scaling = "auto"
MIN_PSNR_DB = 20.0  # reconstructions worse than this: the autoencoder does not fit the data
FIT_SECONDS = 5 * 60  # the autoencoder's fitting: at most this much of the budget ...
FIT_STEPS = (100, 500)  # ... and between this many steps
FIT_BATCH = 32
FIT_PROBE_IMAGES = 256  # images the fit decision and its before/after figures are measured on


def choose_clients(values: dict[str, Any], num_classes: int, fixed: set[str]) -> list[str]:
    """Set the number of clients and the partition from the number of classes (unless the user
    set them); the reasons, as lines for the summary."""
    data, notes = values.setdefault("data", {}), []
    if "data.num_clients" not in fixed and "num_clients" not in data:
        data["num_clients"] = max(1, min(5, num_classes))
        notes.append(f"{data['num_clients']} clients: min(5, {num_classes} classes)")
    if "data.partition" not in fixed and "partition" not in data:
        own = num_classes >= data["num_clients"]
        data["partition"] = "classes" if own else "iid"
        notes.append(
            "each client holds its own classes" if own else "IID shares: fewer classes than clients"
        )
    train = values.setdefault("train", {})
    if "train.client_every" not in fixed:  # (current_names filled in the "as before" 1)
        train["client_every"] = 2 * data["num_clients"]
        notes.append(
            f"each client steps every {train['client_every']} steps, the server every step "
            "(the clients' low-noise task needs fewer)"
        )
    return notes


def step_seconds(run) -> tuple[float, float]:
    """(seconds a training step takes here, all in; seconds of the run's last preview): real
    steps of a throw-away trainer on `run` (the run is rebuilt before training, so its weights
    do not matter), 2 x `train.client_every` of them timed after one warm-up (so the clients'
    steps count as often as they come), plus one checkpoint every `train.checkpoint_every`
    steps and one preview every `train.sample_every` steps, each timed once."""
    import tempfile

    from latentfuse.training.engine import make_accelerator
    from latentfuse.training.runner import write_previews
    from latentfuse.training.trainer import Trainer

    cfg = run.config.train
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(run, make_accelerator(cfg), Path(tmp))
        trainer.train_step()  # the first releases, the allocations
        count = 2 * cfg.client_every
        start = time.perf_counter()
        for _ in range(count):
            trainer.train_step()
        step = (time.perf_counter() - start) / count
        start = time.perf_counter()
        trainer.save_checkpoint()
        checkpoint = time.perf_counter() - start
        start = time.perf_counter()
        write_previews(run, trainer, Path(tmp) / "samples")
        preview = time.perf_counter() - start
    every = step + checkpoint / cfg.checkpoint_every
    if cfg.sample_every:
        every += preview / cfg.sample_every
    return every, preview


def reconstruction_psnr(run, count: int) -> float:
    """Mean PSNR (dB) of the autoencoder's reconstructions of up to `count` training images."""
    import torch

    from latentfuse.data.autoencoder import decode, encode, psnr
    from latentfuse.data.datasets import load_image

    indices = [i for share in run.shares for i in share.train_indices][:count]
    resolution = run.config.data.resolution
    images = torch.stack([load_image(run.dataset.records[i].path, resolution) for i in indices])
    return psnr(images, decode(run.vae, encode(run.vae, images)).float()).mean().item()


def fit_vae_to_data(
    config: RunConfig, dataset, output_dir: Path, policy: str, steps: int | None
) -> tuple[RunConfig, float]:
    """`--fit-vae`: fine-tune the run's autoencoder on the clients' training images when it
    reconstructs held-out ones below MIN_PSNR_DB ("auto") or always, save it in OUT/vae and
    return the config that names it, with the seconds spent. Prints what it measured."""
    import random

    import torch

    from latentfuse.checkpointing import atomic_write_dir, atomic_write_json
    from latentfuse.data.autoencoder import load_vae
    from latentfuse.data.datasets import load_image
    from latentfuse.paths import resolve_path
    from latentfuse.training.autoencoder import (
        fit_autoencoder,
        reconstruction_metrics,
        seconds_per_step,
    )
    from latentfuse.training.setup import partition_clients

    start = time.time()
    shares = partition_clients(config, dataset)
    pool = sorted(i for share in shares for i in share.train_indices)
    held_out = sorted(i for share in shares for i in share.eval_indices) or pool
    rng = random.Random(config.data.seed)
    probe_indices = rng.sample(held_out, min(FIT_PROBE_IMAGES, len(held_out)))
    fit_indices = rng.sample(pool, min(5000, len(pool)))  # 5,000 images are plenty to fit
    resolution = config.data.resolution
    load = lambda indices: torch.stack(  # noqa: E731
        [load_image(dataset.records[i].path, resolution) for i in indices]
    )
    probe = load(probe_indices)
    vae = load_vae(resolve_path(config.vae))
    before = reconstruction_metrics(vae, probe)["psnr"]
    where = "held-out" if held_out is not pool else "training"
    if policy == "auto" and before >= MIN_PSNR_DB:
        return config, time.time() - start
    if type(vae).__name__ != "AutoencoderKL":
        print(
            f"warning: --fit-vae {policy}: only an AutoencoderKL can be fitted here, not "
            f"{type(vae).__name__}; training with it as it is ({before:.1f} dB)",
            file=sys.stderr,
            flush=True,
        )
        return config, time.time() - start
    if steps is None:
        per_step = seconds_per_step(vae, FIT_BATCH, resolution)
        steps = int(min(max(FIT_SECONDS / per_step, FIT_STEPS[0]), FIT_STEPS[1]))
    print(
        f"autoencoder: reconstructs {len(probe)} {where} images at {before:.1f} dB; fitting it "
        f"to {len(fit_indices)} training images for {steps} steps first (--fit-vae {policy})",
        flush=True,
    )
    fit_autoencoder(vae, load(fit_indices), steps, FIT_BATCH, 1e-3, seed=config.train.seed)
    after = reconstruction_metrics(vae, probe)
    if vae.config.shift_factor is None and vae.config.latents_mean is None:
        vae.register_to_config(scaling_factor=1.0 / after["latent_std"])  # as the shipped one
    seconds = time.time() - start
    record = {
        "fitted_from": str(config.vae),
        "steps": steps,
        "batch_size": FIT_BATCH,
        "training_images": len(fit_indices),
        "psnr_before_db": before,
        "psnr_after_db": after["psnr"],
        "measured_on": f"{len(probe)} {where} images",
        "seconds": seconds,
    }

    def write(folder: Path) -> None:
        vae.save_pretrained(folder, safe_serialization=True)
        atomic_write_json(folder / "fit.json", record)

    target = atomic_write_dir(output_dir / "vae", write).resolve()
    print(
        f"autoencoder: fitted in {seconds / 60:.1f} min: {before:.1f} -> {after['psnr']:.1f} dB "
        f"on the {where} images; saved to {target}. It has seen every client's training images: "
        "in a deployment, fit it on images all clients may share (docs: README, Train on your "
        "own images).",
        flush=True,
    )
    return dataclasses.replace(config, vae=str(target)), seconds


def derive_steps(run, seconds: float, budget: float = BUDGET_SECONDS) -> tuple[int, str]:
    """The step budget (`budget` seconds of training at most) and its reason."""
    cfg = run.config.train
    images = sum(c.num_images for c in run.clients)
    epochs = math.ceil(EPOCHS * images / cfg.server_batch_size)
    affordable = int(budget / max(seconds, 1e-6))
    steps = max(MIN_STEPS, min(epochs, affordable))
    if steps == epochs:
        why = f"{EPOCHS} epochs of {images} releases at the server's batch {cfg.server_batch_size}"
    elif steps == affordable:
        why = (
            f"{EPOCHS} epochs would take {epochs} steps; {affordable} fit in "
            f"{budget / 60:.0f} minutes at {seconds:.2f} s a step here"
        )
    else:
        why = f"the minimum ({EPOCHS} epochs take only {epochs} steps)"
    return steps, why


def summary(run, steps: int, why: str, seconds: float, std: tuple, notes: list[str]) -> str:
    """The lines printed before the first step."""
    names, cfg = run.dataset.class_names, run.config
    lines = [
        f"data: {cfg.data.source} ({len(run.dataset)} images, {len(names)} classes)",
        *(f"  {note}" for note in notes),
    ]
    for share, client in zip(run.shares, run.clients, strict=True):
        classes = ", ".join(names[c] for c in share.classes[:6])
        more = f" and {len(share.classes) - 6} more" if len(share.classes) > 6 else ""
        lines.append(
            f"  client {client.client_id}: {client.num_images} training images, "
            f"{len(share.eval_indices)} held out; classes {classes}{more}"
        )
    z = run.clients[0].z0
    overall, per_channel = std
    lines += [
        f"latents: {tuple(z.shape[1:])} per image; std after the autoencoder's scaling "
        f"{overall:.2f} (per channel {', '.join(f'{s:.2f}' for s in per_channel)})",
        f"steps: {steps} ({why}); about {seconds:.2f} s a step here (timed on real steps; "
        f"previews and checkpoints included), {steps * seconds / 60:.0f} minutes in all",
        f"t_cut {cfg.split.t_cut}: the server learns t >= {cfg.split.t_cut}"
        + (
            " (its timesteps rising towards T: split.server_timesteps)"
            if cfg.split.server_timesteps == "rising"
            else ""
        )
        + f", each client below; learning rate {cfg.train.learning_rate:g} after "
        f"{cfg.train.warmup_steps} warm-up steps, "
        + ("decaying to 0 by a cosine" if cfg.train.lr_schedule == "cosine" else "constant"),
    ]
    kind = cfg.conditioning.kind
    if kind != "class":
        what = f"{len(run.dataset.attribute_names)} attributes"
        if kind == "text":
            what = f"prompts of the attribute names, through {cfg.conditioning.text_encoder}"
        lines.append(f"conditioning: {kind} ({what}); server_labels {cfg.server_labels}")
    return "\n".join(lines)


PLAN = "plan.json"  # what `latentfuse train` decided before the first step, for people and tests


def write_plan(
    output_dir: Path,
    run,
    steps: int,
    why: str,
    seconds: float,
    std: tuple,
    notes: list[str],
    reconstruction_db: float,
    deadline: float | None,
) -> None:
    """The summary as data (`plan.json` in the run folder): clients, steps and why, the
    latents' std, the autoencoder's PSNR on this data, the time budget."""
    names = run.dataset.class_names
    clients = [
        {
            "client_id": client.client_id,
            "train_images": client.num_images,
            "held_out": len(share.eval_indices),
            "classes": [names[c] for c in share.classes],
        }
        for share, client in zip(run.shares, run.clients, strict=True)
    ]
    plan = {
        "data": {"source": run.config.data.source, "images": len(run.dataset), "classes": names},
        "notes": notes,
        "clients": clients,
        "steps": steps,
        "why": why,
        "seconds_per_step": seconds,
        "latent_std": std[0],
        "latent_std_per_channel": list(std[1]),
        "reconstruction_psnr_db": reconstruction_db,
        "time_budget_seconds": None if deadline is None else deadline - time.monotonic(),
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    from latentfuse.checkpointing import atomic_write_json

    atomic_write_json(output_dir / PLAN, plan)


def plan_run(
    values: dict[str, Any],
    fixed: set[str],
    output_dir: Path,
    *,
    resume: bool,
    from_config: bool,
    minutes: float,
    fit_vae: str,
    fit_vae_steps: int | None,
    began: float,
    user_steps: bool,
) -> tuple[RunConfig, Any, float | None]:
    """Decide the run before its first step: (the config to train, the data set loaded once,
    the deadline (time.monotonic) or None when the steps are the user's)."""
    import torch

    from latentfuse.training.runner import check_run_folder
    from latentfuse.training.setup import build_run, latent_stats, load_run_dataset

    values.setdefault("train", {}).setdefault("max_steps", MIN_STEPS)  # replaced below
    probe = config_from_dict(values)  # validates every key before any work
    dataset = load_run_dataset(probe)
    notes = []
    if not (resume or from_config):
        notes = choose_clients(values, len(dataset.class_names), fixed)
    config: RunConfig = config_from_dict(values)
    check_run_folder(config, output_dir, resume)  # before anything is written there
    check_data(config, dataset)  # every image read, every client big enough: before any work
    done = checkpoint_step(output_dir) if resume else None
    if done is not None and done >= config.train.max_steps:  # nothing to time or train
        print(
            f"{output_dir}: {done} of {config.train.max_steps} steps are done: exporting the "
            "model without training (--max-steps N continues past them)",
            flush=True,
        )
        return config, dataset, None
    fit_seconds = 0.0
    if fit_vae != "never" and not resume:
        config, fit_seconds = fit_vae_to_data(config, dataset, output_dir, fit_vae, fit_vae_steps)
    run = build_run(config, output_dir, dataset)
    std = latent_stats(torch.cat([client.z0 for client in run.clients]))  # already encoded
    reconstruction_db = reconstruction_psnr(run, 64)
    start = time.perf_counter()
    seconds, last_preview = step_seconds(run)
    probe_seconds = time.perf_counter() - start + last_preview  # the run ends on a preview
    deadline = None
    if user_steps or resume or from_config:
        steps, why = config.train.max_steps, "as configured"
    else:
        # The steps are an estimate; the deadline is the promise: the loop stops there
        # (checkpoint, final preview, export) however fast the steps turn out to be.
        deadline = began + minutes * 60 - last_preview
        budget = minutes * 60 - fit_seconds - probe_seconds
        steps, why = derive_steps(run, seconds, budget)
        config = dataclasses.replace(
            config, train=dataclasses.replace(config.train, max_steps=steps)
        )
    print(summary(run, steps, why, seconds, std, notes), flush=True)
    print(f"autoencoder: reconstructs this data at {reconstruction_db:.1f} dB PSNR", flush=True)
    write_plan(output_dir, run, steps, why, seconds, std, notes, reconstruction_db, deadline)
    warn_about(config, reconstruction_db, std)
    return config, dataset, deadline


def checkpoint_step(output_dir: Path) -> int | None:
    """The step a run folder's checkpoint holds, or None without a readable one."""
    import json

    record = Path(output_dir) / "checkpoint" / "state.json"
    try:
        return int(json.loads(record.read_text())["extra"]["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_data(config: RunConfig, dataset: Any) -> None:
    """Refuse data a run cannot learn from, before any work: a client with fewer than
    MIN_IMAGES_PER_CLIENT training images, or an image that cannot be read (each is opened
    and verified); warn when no image is held out (nothing for `latentfuse evaluate`)."""
    from PIL import Image, UnidentifiedImageError

    from latentfuse.training.setup import partition_clients

    shares = partition_clients(config, dataset)
    small = [
        (s.client_id, len(s.train_indices))
        for s in shares
        if len(s.train_indices) < MIN_IMAGES_PER_CLIENT
    ]
    if small:
        listed = ", ".join(f"client {c}: {n}" for c, n in small)
        raise ValueError(
            f"too few training images ({listed}; at least {MIN_IMAGES_PER_CLIENT} a client): add "
            f"images, or fewer clients (data.num_clients={config.data.num_clients})"
        )
    used = sorted({i for s in shares for i in (*s.train_indices, *s.eval_indices)})
    bad = []
    for i in used:
        path = dataset.records[i].path
        try:
            with Image.open(path) as image:
                image.verify()
        except (UnidentifiedImageError, OSError, SyntaxError) as error:
            bad.append(f"{path} ({error})")
    if bad:
        shown = "; ".join(bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ValueError(f"{len(bad)} image(s) cannot be read: {shown}")
    if not any(s.eval_indices for s in shares):
        print(
            "warning: no image is held out (data.eval_fraction = "
            f"{config.data.eval_fraction:g} of {len(used)} images): `latentfuse evaluate` will "
            "have no real images to compare the samples with",
            file=sys.stderr,
            flush=True,
        )


def warn_about(config: RunConfig, reconstruction_db: float, std: tuple) -> None:
    """Warnings (stderr) for an autoencoder that does not fit the data, or latents whose std
    is far from the 1 the noise schedule assumes."""
    if reconstruction_db < MIN_PSNR_DB:
        print(
            f"warning: the autoencoder reconstructs these images at only {reconstruction_db:.1f} "
            f"dB (below {MIN_PSNR_DB:.0f}): samples cannot be sharper than its reconstructions "
            "(`latentfuse reconstruct --vae ... --data ...` shows them). Pass --vae with an "
            "autoencoder that fits this data.",
            file=sys.stderr,
            flush=True,
        )
    low, high = STD_RANGE
    if config.vae_scaling == "config" and not low <= std[0] <= high:
        print(
            f"warning: the latents' std is {std[0]:.2f}, far from the 1 the noise schedule "
            "assumes; training may give saturated noise. Rerun with vae_scaling=auto to scale "
            "by this data (computed once, recorded in the model).",
            file=sys.stderr,
            flush=True,
        )
