"""The model folder: what `save_pretrained` writes and each half of the pipeline reads.

model_index.json  vae/  scheduler/  server_unet/  clients/<id>/  collafuse.json
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import SchedulerMixin, UNet2DModel

COLLAFUSE_CONFIG = "collafuse.json"
CLIENTS_DIR = "clients"
SERVER_DIR = "server_unet"
SCHEDULER_DIR = "scheduler"
VAE_DIR = "vae"


def read_description(folder: Path) -> dict[str, Any]:
    """The `collafuse.json` of a model folder, read through `ModelDescription.from_json` (which
    fills in what older files left out) and given back complete, as the pipelines hold it."""
    from latentfuse.description import ModelDescription

    path = folder / COLLAFUSE_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {COLLAFUSE_CONFIG}: not a CollaFuse model")
    try:
        return ModelDescription.from_json(json.loads(path.read_text())).to_json()
    except (ValueError, TypeError, KeyError) as error:
        raise ValueError(f"{path}: {error}") from None


def load_scheduler(folder: Path) -> SchedulerMixin:
    """The diffusers scheduler saved in `folder/scheduler/`."""
    config_file = folder / SCHEDULER_DIR / "scheduler_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} has no {SCHEDULER_DIR}/scheduler_config.json")
    name = json.loads(config_file.read_text()).get("_class_name")
    cls = getattr(diffusers, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise ValueError(f"{config_file}: _class_name {name!r} is not a diffusers scheduler")
    return cls.from_pretrained(folder, subfolder=SCHEDULER_DIR)


UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")  # class labels; attributes or text


def load_unet(folder: Path, dtype: torch.dtype | None = None) -> UNet2DModel | None:
    """The denoiser saved in `folder` (a UNet2DModel, or a UNet2DConditionModel for attribute
    or text conditioning), or None when the folder holds none."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        return None
    if (folder / "adapter_config.json").is_file():  # LoRA adapters on a pretrained base
        from latentfuse.training.pretrained import load_adapter_folder

        unet = load_adapter_folder(folder)
        return unet.to(dtype) if dtype is not None else unet
    name = json.loads(config_file.read_text()).get("_class_name", "UNet2DModel")
    if name not in UNET_CLASSES:
        raise ValueError(f"{config_file}: _class_name {name!r} is not one of {UNET_CLASSES}")
    kwargs = {"torch_dtype": dtype} if dtype is not None else {}
    return getattr(diffusers, name).from_pretrained(folder, **kwargs).eval()
