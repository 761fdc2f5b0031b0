"""`latentfuse train`: a CollaFuse model from a folder of your own images, with sensible defaults.

    latentfuse train --data DIR --output-dir OUT [--config FILE] [section.key=value ...]

Defaults that suit a new data set (each replaced by `--config` or an override):
- the data: an ImageFolder (`DIR/<class>/*.png`), with or without a `train/` level;
- the clients: min(5, number of classes), each holding its own classes ("classes"), or IID
  shares when there are fewer classes than clients;
- the models: the small UNets of the collaboration benchmark (server 1.05M, client 0.64M
  parameters at 32x32 with the shipped autoencoder), t_cut 100, the shipped autoencoder;
- the training: learning rate 1e-3, decaying to 0 by a cosine over the run; the server draws
  its timesteps more often the noisier they are (`split.server_timesteps = "rising"`): the
  highest-noise steps decide what is drawn (bench/bench_server_bands.py);
- the autoencoder: the shipped one, fitted to this data first (`--fit-vae auto`) when it
  reconstructs the training images below 20 dB PSNR; the fitted one is saved in OUT/vae;
- the clients' steps: every client steps every `train.client_every` = 2 x (number of
  clients) steps, so that on one machine the server, whose high-noise task decides what is
  drawn, gets most of the time (clients trained 8x less changed nothing measured);
- the step budget: 400 epochs of the server's releases, at most what 20 minutes on this
  machine allow (the autoencoder's fitting included; timed before the first step), at least
  500 steps.
Before the first step it prints one summary and warns when the latents' std is far from 1.
For several processes or GPUs, `accelerate launch -m latentfuse.cli train ...` runs the same.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import tomllib
from pathlib import Path
from typing import Any

from latentfuse.cli.common import HelpFormatter
from latentfuse.config import apply_overrides, current_names
from latentfuse.paths import DEFAULT_VAE_DIR
from latentfuse.training.plan import BUDGET_SECONDS, MIN_PSNR_DB

logger = logging.getLogger(__name__)

NEW_DATA_DEFAULTS: dict[str, Any] = {
    "server_labels": "class",
    "split": {"t_cut": 100, "server_timesteps": "rising"},
    "server_unet": {"block_out_channels": [32, 64, 64], "norm_num_groups": 8},
    "client_unet": {"block_out_channels": [32, 64], "norm_num_groups": 8},
    "train": {  # the collaboration benchmark's: short runs need a larger step than long ones
        "server_batch_size": 32,
        "client_batch_size": 16,
        "learning_rate": 1e-3,
        "client_learning_rate": 1e-3,
        "ema_decay": 0.995,
        "warmup_steps": 100,
        "lr_schedule": "cosine",
        "checkpoint_every": 250,
        "log_every": 25,
        "sample_every": 500,
        "num_preview_images": 16,
        "preview_inference_steps": 25,
    },
}


def add_train_parser(commands: argparse._SubParsersAction) -> None:
    """The `train` sub-command."""
    train = commands.add_parser(
        "train",
        help="train a CollaFuse model on a folder of your own images",
        description=__doc__.split("\n\n")[0]
        + "\n\nExample: latentfuse train --data my_images --output-dir outputs/mine",
        formatter_class=HelpFormatter,
    )
    train.add_argument("--data", required=True, help="image folder (DIR/<class>/*) or archive")
    train.add_argument("--output-dir", required=True, help="run folder (resumable)")
    train.add_argument(
        "--config",
        default=None,
        help="TOML run config to start from instead of the new-data defaults",
    )
    train.add_argument(
        "--vae", default=None, help="autoencoder folder (default: the shipped cifar10-vae)"
    )
    train.add_argument(
        "--fit-vae",
        choices=("auto", "always", "never"),
        default="auto",
        help="fine-tune the autoencoder on the training images first: auto = when it "
        f"reconstructs them below {MIN_PSNR_DB:.0f} dB (an AutoencoderKL only)",
    )
    train.add_argument(
        "--fit-vae-steps", type=int, default=None, help="autoencoder fitting steps (derived)"
    )
    train.add_argument("--max-steps", type=int, default=None, help="steps (default: derived)")
    train.add_argument(
        "--minutes",
        type=float,
        default=BUDGET_SECONDS / 60,
        help="the time the derived step budget may take here (the autoencoder's fit included)",
    )
    train.add_argument(
        "--pretrained",
        default=None,
        metavar="DIR",
        help="start the server's and the clients' denoisers from this diffusers UNet (a local "
        "folder: the UNet's, a pipeline's with unet/, a CollaFuse model's; or a hub id); its "
        "config gives the architecture",
    )
    train.add_argument(
        "--adapter",
        choices=("none", "lora"),
        default=None,
        help="with --pretrained: fine-tune in full (none) or train LoRA adapters on the frozen "
        "base (lora)",
    )
    train.add_argument("--lora-rank", type=int, default=None, help="LoRA rank (default 8)")
    train.add_argument(
        "--merge",
        action="store_true",
        help="export LoRA-trained denoisers as merged weights instead of adapters",
    )
    train.add_argument("--resume", action="store_true", help="continue the run in --output-dir")
    train.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    train.set_defaults(func=run_train)


def _user_keys(overrides: list[str]) -> set[str]:
    return {text.split("=", 1)[0].strip() for text in overrides}


ARCHITECTURE_KEYS = ("block_out_channels", "layers_per_block", "attention", "norm_num_groups")


def apply_pretrained(values: dict[str, Any], args: argparse.Namespace) -> None:
    """--pretrained/--adapter/--lora-rank/--merge as config values: both sides start from the
    base, whose config gives the architecture (the new-data defaults' sizes are dropped)."""
    if args.merge:
        values.setdefault("train", {})["export_merged"] = True
    if args.pretrained is None:
        for flag in ("adapter", "lora_rank"):
            if getattr(args, flag) is not None:
                raise ValueError(f"--{flag.replace('_', '-')} needs --pretrained")
        return
    for side in ("server_unet", "client_unet"):
        table = values.setdefault(side, {})
        if not (args.resume or args.config):
            for key in ARCHITECTURE_KEYS:
                table.pop(key, None)
        table["pretrained"] = args.pretrained
        if args.adapter is not None:
            table["adapter"] = args.adapter
        if args.lora_rank is not None:
            table["lora_rank"] = table["lora_alpha"] = args.lora_rank


def base_values(args: argparse.Namespace) -> dict[str, Any]:
    """The config values before anything is derived from the data: a resumed run's recorded
    config, else `--config`, else the new-data defaults; then --data, --vae and overrides."""
    recorded = Path(args.output_dir) / "config.json"
    if args.resume and recorded.is_file():
        values = json.loads(recorded.read_text())
    elif args.config:
        path = Path(args.config)
        if not path.is_file():
            raise FileNotFoundError(f"--config: no such file: {path}")
        values = tomllib.loads(path.read_text())
    else:
        values = json.loads(json.dumps(NEW_DATA_DEFAULTS))
        values["vae"] = str(DEFAULT_VAE_DIR)
    data = Path(args.data)
    if not data.exists():
        raise FileNotFoundError(f"--data: no such folder or archive: {data}")
    values = current_names(values)
    values.setdefault("data", {})["source"] = str(data.resolve())
    if "subfolder" not in values["data"] or not (args.resume or args.config):
        # DIR/train beside DIR/test (or valid): read train/; a lone top folder is unwrapped by
        # the loader itself, and class folders at the top need no sub-folder
        tops = [p for p in data.iterdir() if p.is_dir()] if data.is_dir() else []
        values["data"]["subfolder"] = "train" if (data / "train").is_dir() and len(tops) > 1 else ""
    if args.vae:
        values["vae"] = args.vae
    apply_pretrained(values, args)
    overrides = list(args.overrides)
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    apply_overrides(values, overrides)
    return values


def run_train(args: argparse.Namespace) -> int:
    """Read the arguments, plan the run (`training.plan.plan_run`), train, export; returns the
    exit status."""
    from latentfuse.training.plan import plan_run
    from latentfuse.training.runner import train

    logging.getLogger().setLevel(logging.INFO if args.verbose else logging.WARNING)
    began = time.monotonic()  # --minutes counts from here
    if not args.minutes > 0:
        raise ValueError(f"--minutes must be > 0, got {args.minutes}")
    fixed = _user_keys(args.overrides)
    output_dir = Path(args.output_dir)
    config, dataset, deadline = plan_run(
        base_values(args),
        fixed,
        output_dir,
        resume=args.resume,
        from_config=bool(args.config),
        minutes=args.minutes,
        fit_vae=args.fit_vae,
        fit_vae_steps=args.fit_vae_steps,
        began=began,
        user_steps=args.max_steps is not None or "train.max_steps" in fixed,
    )
    model = train(config, output_dir, args.resume, dataset, deadline)
    print(
        f"model: {model}\nloss plot: {output_dir / 'loss.png'}; previews: {output_dir / 'samples'}"
        f"\nsample with: latentfuse sample --model {model} --client all --out grid.png"
    )
    return 0
