"""Run a whole training job: build, resume, loop, log, preview, export."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch
from accelerate import Accelerator

from latentfuse.checkpointing import atomic_write_dir, atomic_write_json
from latentfuse.config import RunConfig
from latentfuse.data.imaging import make_grid, save_image
from latentfuse.description import (
    client_entry,
    conditioning_record,
    guidance_rule,
    model_description,
)
from latentfuse.training.engine import config_differences, make_accelerator
from latentfuse.training.loop import Hooks, fit
from latentfuse.training.setup import Run, build_run
from latentfuse.training.trainer import Trainer

logger = logging.getLogger(__name__)


def collafuse_description(run: Run, training: dict | None = None) -> dict:
    """What `collafuse.json` records: the split, the clients and their label sets, the data,
    the conditioning (with each client's attribute rates: what sampling draws from when no
    attributes are given) and, once known, how it was trained."""
    cfg, names = run.config, run.dataset.class_names
    kind, attributes = cfg.conditioning.kind, run.dataset.attributes
    with_rates = kind != "class" and bool(run.dataset.attribute_names)
    entries = {}
    for share, client in zip(run.shares, run.clients, strict=True):
        rates = None
        if with_rates:
            rows = attributes[list(share.train_indices)]
            rates = rows.mean(0).round(4).tolist() if len(rows) else [0.0] * rows.shape[1]
        entries[client.client_id] = replace(
            client_entry(
                cfg,
                client.split,
                share.classes,
                names,
                num_train_images=client.num_images,
                num_eval_images=len(share.eval_indices),
            ),
            attribute_rates=tuple(rates) if rates is not None else None,
        )
    conditioning = conditioning_record(cfg, run.dataset.attribute_names if with_rates else ())
    data = {"source": cfg.data.source, "partition": cfg.data.partition}
    data["num_clients"] = cfg.data.num_clients
    alphas = run.scheduler.alphas_cumprod
    described = model_description(
        cfg, names, entries, alphas, vae_sha256=run.vae_hash, data=data, conditioning=conditioning
    )
    return (described.with_training(training) if training else described).to_json()


def build_pipeline(
    run: Run,
    trainer: Trainer,
    description: dict | None = None,
    models: dict[str, torch.nn.Module] | None = None,
):
    """A CollaFusePipeline over the EMA weights of the current models (or `models`), described
    by `description` (default `collafuse_description(run)`)."""
    from latentfuse.pipelines import CollaFusePipeline

    models = trainer.ema_models() if models is None else models
    clients = {int(n.split("_")[1]): m for n, m in models.items() if n.startswith("client_")}
    scheduler = type(run.scheduler).from_config(run.scheduler.config)
    text = {}
    if run.text is not None:
        text = {"tokenizer": run.text.tokenizer, "text_encoder": run.text.text_encoder}
    return CollaFusePipeline(
        run.vae,
        scheduler,
        models.get("server"),
        clients,
        description or collafuse_description(run),
        **text,
    )


def sampling_guidance(config: RunConfig) -> float:
    """The guidance the model is sampled with by default (`description.guidance_rule`)."""
    train = config.train
    return guidance_rule(train.label_dropout, config.server_labels, train.guidance_scale)


def write_previews(run: Run, trainer: Trainer, directory: Path) -> None:
    """One PNG grid per client from the EMA weights, same seeds every time: a row per class
    the client holds (at most 4), each row labelled with its class name."""
    cfg = run.config.train
    pipe = build_pipeline(run, trainer)
    pipe.set_progress_bar_config(disable=True)
    names, guidance = run.dataset.class_names, sampling_guidance(run.config)
    by_class = run.config.conditioning.kind == "class"
    for client, share in zip(run.clients, run.shares, strict=True):
        classes = list(share.classes)[:4] if by_class else []
        classes = classes or [0]
        per_row = max(1, cfg.num_preview_images // len(classes))
        labels = [c for c in classes for _ in range(per_row)]
        seeds = range(cfg.seed * 1000, cfg.seed * 1000 + len(labels))
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        images = pipe(
            client_id=client.client_id,
            class_labels=labels if by_class else None,  # else drawn from the client's rates
            generator=generators,
            output_type="pt",
            num_inference_steps=cfg.preview_inference_steps,
            guidance_scale=guidance,
        ).images
        columns = min(8, per_row)
        rows_per_class = math.ceil(per_row / columns)
        row_names = [
            names[c] if by_class else "drawn" for c in classes for _ in range(rows_per_class)
        ]
        grid = labelled_grid(images * 2 - 1, row_names, columns)
        title = f"client {client.client_id}, step {trainer.step}, guidance {guidance:g}"
        save_image(
            titled(grid, title),
            directory / f"step-{trainer.step:06d}-client-{client.client_id}.png",
        )


def labelled_grid(images: torch.Tensor, row_names: list[str], columns: int):
    """`make_grid` with each row's name written at its left."""
    from PIL import Image, ImageDraw

    grid = make_grid(images, columns=columns)
    margin = 8 + 6 * max(len(n) for n in row_names)
    out = Image.new("RGB", (grid.width + margin, grid.height), "white")
    out.paste(grid, (margin, 0))
    draw, row_height = ImageDraw.Draw(out), grid.height / len(row_names)
    for row, name in enumerate(row_names):
        draw.text((4, int(row * row_height + row_height / 2 - 5)), name, fill="black")
    return out


def titled(image, title: str):
    """`image` with a line of text above it."""
    from PIL import Image, ImageDraw

    out = Image.new("RGB", (max(image.width, 8 + 6 * len(title)), image.height + 14), "white")
    out.paste(image, (0, 14))
    ImageDraw.Draw(out).text((4, 2), title, fill="black")
    return out


def plot_losses(history: Path, out: Path) -> None:
    """The loss curves of `losses.jsonl` (one line per network, log scale) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in history.read_text().splitlines() if line.strip()]
    if not rows:
        return
    figure, axis = plt.subplots(figsize=(6, 3.5))
    for name in sorted({k for row in rows for k in row if k != "step"}):
        points = [(row["step"], row[name]) for row in rows if name in row]
        axis.plot(*zip(*points, strict=True), label=name, linewidth=1)
    axis.set(xlabel="step", ylabel="loss", yscale="log", title="training loss")
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    tmp = out.with_name(f".{out.stem}.tmp.png")
    figure.savefig(tmp, dpi=100)
    plt.close(figure)
    tmp.replace(out)


def export(run: Run, trainer: Trainer, output_dir: Path, extra: dict) -> Path:
    """Write the diffusers-layout model folder (atomically) into `output_dir/model`; a
    denoiser with LoRA adapters as its adapters and base reference unless
    `train.export_merged` (training.pretrained.save_denoiser)."""
    import copy

    from latentfuse.training.pretrained import has_lora, merge_lora, save_denoiser

    models = trainer.ema_models()
    plain = {n: merge_lora(copy.deepcopy(m)) if has_lora(m) else m for n, m in models.items()}
    pipe = build_pipeline(run, trainer, collafuse_description(run, extra), plain)
    cfg = run.config
    adapters = {} if cfg.train.export_merged else {n: m for n, m in models.items() if has_lora(m)}

    def write(tmp: Path) -> None:
        pipe.save_pretrained(tmp)
        for name, module in adapters.items():
            if name == "server":
                folder, base = tmp / "server_unet", cfg.server_unet.pretrained
            else:
                cid = int(name.split("_")[1])
                folder, base = tmp / "clients" / str(cid), cfg.client_unet_config(cid).pretrained
            shutil.rmtree(folder)
            save_denoiser(module, folder, base)

    return atomic_write_dir(output_dir / "model", write)


RUN_RECORD = "run.json"  # what a resume must match beyond config.json: the autoencoder's hash


def check_run_folder(config: RunConfig, output_dir: Path, resume: bool) -> None:
    """Refuse to start over a checkpoint without `resume`, or to resume under another config
    than the run folder's config.json records (ValueError naming the differing keys). Call it
    before anything is written into `output_dir`."""
    held = (output_dir / "checkpoint" / "state.json").exists()
    if held and not resume:
        raise FileExistsError(
            f"{output_dir} already holds a checkpoint: pass --resume to continue "
            "it, or choose another --output-dir"
        )
    recorded = output_dir / "config.json"
    if resume and held and recorded.is_file():
        differences = config_differences(json.loads(recorded.read_text()), config.to_dict())
        if differences:
            raise ValueError(
                f"--resume: {output_dir} was trained under another configuration "
                f"({recorded}); differences: " + "; ".join(differences)
            )


def check_autoencoder(run: Run, output_dir: Path, resume: bool) -> None:
    """On resume, refuse an autoencoder other than the one the checkpoint was trained on (its
    weights' hash, recorded in run.json): latents of another autoencoder would silently
    continue a model that has never seen them."""
    record = output_dir / RUN_RECORD
    if not (resume and record.is_file() and (output_dir / "checkpoint").is_dir()):
        return
    trained_on = json.loads(record.read_text()).get("vae_sha256")
    if trained_on and trained_on != run.vae_hash:
        raise ValueError(
            f"--resume: {output_dir} was trained on the autoencoder with hash "
            f"{trained_on[:12]}, but {run.config.vae} hashes to {run.vae_hash[:12]}: resume "
            "with the autoencoder it was trained on, or train into another --output-dir"
        )


def train(
    config: RunConfig,
    output_dir: str | Path,
    resume: bool = False,
    dataset=None,
    deadline: float | None = None,
) -> Path:
    """Train every client and the server; returns the exported model folder. `dataset`: the
    loaded data of `config.data`, if the caller has it; `deadline` (time.monotonic()): stop
    there (checkpoint and export) even if steps remain."""
    output_dir = Path(output_dir)
    check_run_folder(config, output_dir, resume)
    accelerator = make_accelerator(config.train, output_dir, log=True)
    with accelerator.main_process_first():  # one process encodes, the others read the cache
        run = build_run(config, output_dir, dataset)  # data, autoencoder: checked before output
    check_autoencoder(run, output_dir, resume)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(output_dir / "config.json", config.to_dict())
        atomic_write_json(output_dir / RUN_RECORD, {"vae_sha256": run.vae_hash})
    trainer = Trainer(run, accelerator, output_dir)
    if resume and trainer.load_checkpoint():
        logger.info("resumed from %s at step %d", trainer.checkpoint_dir(), trainer.step)
    accelerator.init_trackers("latentfuse", config={"t_cut": config.split.t_cut})
    _loop(run, trainer, output_dir, deadline)
    accelerator.end_training()
    return output_dir / "model"


def global_losses(accelerator: Accelerator, losses: dict[str, float]) -> dict[str, float]:
    """Each process's shard losses averaged over processes (the global batch's loss)."""
    names = sorted(losses)
    local = torch.tensor([losses[n] for n in names], device=accelerator.device)
    return dict(zip(names, accelerator.reduce(local, reduction="mean").tolist(), strict=True))


class StopRequest:
    """Set by SIGINT/SIGTERM during training: the loop finishes its step, checkpoints and stops.

    A step is never cut in half (server and clients update together), so the checkpoint written
    on the way out is consistent and `--resume` continues from exactly that step. A second
    signal stops at once, as the default handler would."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def __call__(self, signum: int, frame) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum
        logger.warning(
            "%s: finishing this step, then checkpointing (send it again to stop at once)",
            signal.Signals(signum).name,
        )

    def agreed(self, accelerator: Accelerator) -> bool:
        """Whether any process was asked to stop (every process checks the same step)."""
        return _any_process(accelerator, self.signal is not None)


def _any_process(accelerator: Accelerator, flag: bool) -> bool:
    """Whether `flag` is set on any process (every process calls it at the same step)."""
    if accelerator.num_processes > 1:
        local = torch.tensor([float(flag)], device=accelerator.device)
        flag = bool(accelerator.reduce(local, reduction="sum").item() > 0)
    return flag


@contextlib.contextmanager
def stop_on_signal() -> Iterator[StopRequest]:
    """Route SIGINT and SIGTERM to a StopRequest while training (main thread only)."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request  # signal handlers can only be installed from the main thread
        return
    previous = {s: signal.signal(s, request) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _loop(run: Run, trainer: Trainer, output_dir: Path, deadline: float | None = None) -> None:
    """`fit` with this job's hooks: losses logged, previews, a signal or the deadline stops
    it with a checkpoint; at the end, previews, the loss plot and the exported model."""
    cfg, accelerator = run.config.train, trainer.accelerator
    main = accelerator.is_main_process
    start = time.time()

    def after_step(step: int, losses: dict[str, float]) -> None:
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            losses = global_losses(accelerator, losses)
            accelerator.log({f"loss/{k}": v for k, v in losses.items()}, step=step)
            if main:
                with open(output_dir / "losses.jsonl", "a") as f:
                    f.write(json.dumps({"step": step, **losses}) + "\n")
        if main and cfg.sample_every and step % cfg.sample_every == 0:
            write_previews(run, trainer, output_dir / "samples")
            plot_losses(output_dir / "losses.jsonl", output_dir / "loss.png")

    with stop_on_signal() as stop:
        hooks = Hooks(
            should_stop=lambda: stop.agreed(accelerator),
            after_step=after_step,
            deadline_passed=(
                None
                if deadline is None
                else lambda: _any_process(accelerator, time.monotonic() >= deadline)
            ),
        )
        outcome = fit(trainer, cfg.max_steps, cfg.checkpoint_every, hooks, progress=main)
    training = {
        "steps": trainer.step,
        "planned_steps": cfg.max_steps,
        "wall_seconds_this_session": time.time() - start,
    }
    if outcome == "stopped":  # a model of the steps made, then out (a second signal: at once)
        name = signal.Signals(stop.signal or signal.SIGINT).name
        if main:
            model = export(run, trainer, output_dir, {**training, "stopped_by": name})
        accelerator.wait_for_everyone()
        raise KeyboardInterrupt(
            f"training stopped by {name} at step {trainer.step} of {cfg.max_steps}; "
            f"{'the model of those steps is in ' + str(model) + '; ' if main else ''}"
            f"the checkpoint in {trainer.checkpoint_dir()} holds them: run again with --resume "
            "to continue"
        )
    if outcome == "deadline":
        logger.warning(
            "the time budget is spent: stopped after step %d of %d (checkpointed; "
            "--resume --max-steps N continues it)",
            trainer.step,
            cfg.max_steps,
        )
    if main:
        write_previews(run, trainer, output_dir / "samples")
        if (output_dir / "losses.jsonl").is_file():
            plot_losses(output_dir / "losses.jsonl", output_dir / "loss.png")
        export(run, trainer, output_dir, training)
    accelerator.wait_for_everyone()
