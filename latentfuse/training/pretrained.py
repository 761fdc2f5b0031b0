"""Denoisers that start from a pretrained one, and LoRA adapters on them (docs/pretrained.md).

A base is a diffusers UNet folder (`config.json` + safetensors weights): a UNet's own folder, a
pipeline folder's `unet/`, or a CollaFuse model folder's `server_unet/`. Its config gives the
architecture. Its class rows are matched to the run's classes by name where the base records
names (`base.json` beside its config, or the model folder's `collafuse.json`), else by index:

- a run class the base knows starts from the base's row for it;
- a class the base does not know starts from the mean of the base's class rows (a neutral
  start: "some class");
- the run's null row (classifier-free guidance) starts from the base's null row (its last);
- a base without class rows gives a zero-initialised table: at step 0 the model is the base.

LoRA (`adapter = "lora"`, PEFT's `inject_adapter_in_model`, as diffusers' training examples
do through `add_adapter`): the base's weights are frozen, adapters with B = 0 (so training
starts from the base exactly) go on the attention projections and the ResNet convolutions and
time projections, and the class embedding, whose rows are new or remapped, trains in full. A
model folder then holds the adapters and the trained rows (`adapter_model.safetensors`: 550
kB at rank 8 against the shipped base's 4.2 MB) with the base's reference and hash
(`adapter_config.json`), or the merged weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from latentfuse.config import UNetConfig

logger = logging.getLogger(__name__)

BASE_RECORD = "base.json"  # beside a base's config.json: its class names and what it saw
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
WEIGHTS = "diffusion_pytorch_model.safetensors"
UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "time_emb_proj")
TRAINED_IN_FULL = ("class_embedding.",)  # rows that are new or remapped: never frozen


@dataclass(frozen=True)
class Base:
    """A pretrained denoiser on disk."""

    source: str  # as the config names it
    folder: Path  # the folder holding its config.json and weights
    config: dict[str, Any]
    class_names: tuple[str, ...] | None  # the names of its class rows, where recorded

    @property
    def weights(self) -> Path:
        return self.folder / WEIGHTS

    def sha256(self) -> str:
        """The hash of its weights file (what an adapter folder is tied to)."""
        digest = hashlib.sha256()
        with open(self.weights, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()


def find_base(source: str, what: str = "unet.pretrained") -> Base:
    """The base named by `source`: a local folder (the UNet's, a pipeline's `unet/`, a
    CollaFuse model's `server_unet/`) or a hub id."""
    from latentfuse.hub import resolve_model_folder
    from latentfuse.paths import check_model_path, resolve_path

    text = str(resolve_path(source))
    check_model_path(text, what)
    root = resolve_model_folder(text)
    for folder in (root, root / "unet", root / "server_unet"):
        config_file = folder / "config.json"
        if not config_file.is_file():
            continue
        config = json.loads(config_file.read_text())
        if config.get("_class_name") not in UNET_CLASSES:
            continue
        if not (folder / WEIGHTS).is_file():
            raise FileNotFoundError(f"{what} {source}: {folder} has no {WEIGHTS}")
        return Base(source, folder, config, _class_names(folder))
    raise ValueError(
        f"{what} {source}: no diffusers UNet there (a folder with config.json naming one of "
        f"{UNET_CLASSES}, or its unet/ or server_unet/ sub-folder)"
    )


def _class_names(folder: Path) -> tuple[str, ...] | None:
    for record in (folder / BASE_RECORD, folder.parent / BASE_RECORD):
        if record.is_file():
            return tuple(json.loads(record.read_text())["class_names"])
    described = folder.parent / "collafuse.json"
    if described.is_file() and folder.name == "server_unet":
        values = json.loads(described.read_text())
        if values.get("server_labels", "class") == "class":
            return tuple(values.get("class_names", ())) or None
    return None


# ---- building a denoiser from a base ---------------------------------------------------------
def _architecture(config: dict[str, Any]) -> dict[str, Any]:
    """The UNetConfig keys a base's config fixes."""
    return {
        "block_out_channels": tuple(config["block_out_channels"]),
        "layers_per_block": config["layers_per_block"],
        "norm_num_groups": config["norm_num_groups"],
        "attention": any("Attn" in b for b in config["down_block_types"]),
    }


def check_architecture(cfg: UNetConfig, base: Base, where: str) -> None:
    """ValueError naming both where a config key was set to another value than both its
    default and the base's (the base's architecture is what runs)."""
    defaults, fixed = UNetConfig(), _architecture(base.config)
    for key, value in fixed.items():
        mine = getattr(cfg, key)
        if mine != getattr(defaults, key) and mine != value:
            raise ValueError(
                f"config: {where}.{key} = {mine!r} contradicts the pretrained base "
                f"{base.source}, whose {key} is {value!r}: remove the key (the base's "
                "architecture is used) or set it to the base's value"
            )


def denoiser_from_base(
    cfg: UNetConfig,
    kind: str,
    sample_size: int,
    channels: int,
    *,
    where: str,
    num_class_embeds: int | None = None,
    class_names: tuple[str, ...] | None = None,
    num_attributes: int = 0,
    cross_attention_dim: int = 0,
) -> torch.nn.Module:
    """The denoiser of `cfg.pretrained` for this run: the base's architecture and weights, its
    class rows matched to `class_names` (module docstring), LoRA adapters if `cfg.adapter`."""
    import diffusers
    from safetensors.torch import load_file

    base = find_base(cfg.pretrained, f"{where}.pretrained")
    check_architecture(cfg, base, where)
    name = base.config["_class_name"]
    wanted = "UNet2DModel" if kind == "class" else "UNet2DConditionModel"
    if name != wanted:
        raise ValueError(
            f"{where}.pretrained {cfg.pretrained}: a {name}; conditioning.kind = {kind!r} needs "
            f"a {wanted}"
        )
    if base.config["in_channels"] != channels or base.config["out_channels"] != channels:
        raise ValueError(
            f"{where}.pretrained {cfg.pretrained}: it denoises latents of "
            f"{base.config['in_channels']} channels, this run's autoencoder gives {channels}"
        )
    config = {k: v for k, v in base.config.items() if not k.startswith("_")}
    config["sample_size"] = sample_size
    if kind == "class":
        config["num_class_embeds"] = num_class_embeds
    elif kind == "text" and config.get("cross_attention_dim") != cross_attention_dim:
        raise ValueError(
            f"{where}.pretrained {cfg.pretrained}: cross_attention_dim "
            f"{config.get('cross_attention_dim')}, the text encoder's width "
            f"{cross_attention_dim}"
        )
    elif kind == "attributes" and (
        config.get("projection_class_embeddings_input_dim") != num_attributes
    ):
        raise ValueError(
            f"{where}.pretrained {cfg.pretrained}: it projects "
            f"{config.get('projection_class_embeddings_input_dim')} attributes, this run has "
            f"{num_attributes}"
        )
    module = getattr(diffusers, name).from_config(config)
    state = load_file(base.weights)
    rows = state.pop("class_embedding.weight", None) if kind == "class" else None
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("class_embedding.")]
    if missing or unexpected:
        raise ValueError(
            f"{where}.pretrained {cfg.pretrained}: its weights do not fit its config (missing "
            f"{missing[:5]}, unexpected {unexpected[:5]})"
        )
    if kind == "class" and num_class_embeds is not None:
        weight = module.class_embedding.weight.data
        if rows is None:  # a base without class rows: at step 0 the model is the base
            weight.zero_()
        else:
            weight.copy_(class_rows(rows, num_class_embeds, class_names, base.class_names))
    if cfg.adapter == "lora":
        add_lora(module, cfg)
    return module


def class_rows(
    base_rows: torch.Tensor | None,
    num_rows: int,
    names: tuple[str, ...] | None,
    base_names: tuple[str, ...] | None,
) -> torch.Tensor:
    """The run's class-embedding table (num_rows = classes + the null, last) from the base's:
    rows by name (or by index where the base records no names), the mean of the base's class
    rows for a class it does not know, its null row for the null (`names` None: the rows are
    client ids, which no base row stands for)."""
    classes, known = base_rows[:-1], len(base_rows) - 1
    mean = classes.mean(0) if known else torch.zeros(base_rows.shape[1])
    table = mean.expand(num_rows, -1).clone()
    for i in range(num_rows - 1):
        if names is not None and base_names is not None:
            j = base_names.index(names[i]) if names[i] in base_names else None
        else:
            j = i if names is not None and i < known else None  # client ids: no match
        if j is not None:
            table[i] = classes[j]
    table[-1] = base_rows[-1]
    return table


# ---- LoRA -------------------------------------------------------------------------------------
def lora_config(cfg: UNetConfig, module: torch.nn.Module):
    """PEFT's LoraConfig for `cfg` on `module` (default targets: those the module has)."""
    from peft import LoraConfig

    targets = list(cfg.lora_targets)
    if not targets:
        names = {
            n for n, m in module.named_modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)
        }
        targets = [t for t in DEFAULT_TARGETS if any(n.endswith("." + t) for n in names)]
    return LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=targets)


def add_lora(module: torch.nn.Module, cfg: UNetConfig) -> torch.nn.Module:
    """Freeze `module` and add LoRA adapters (B = 0: it still computes the base); the class
    embedding stays trainable."""
    from peft import inject_adapter_in_model

    config = lora_config(cfg, module)
    module.requires_grad_(False)
    inject_adapter_in_model(config, module)
    for name, parameter in module.named_parameters():
        if "lora_" in name or name.startswith(TRAINED_IN_FULL):
            parameter.requires_grad_(True)
    module._latentfuse_lora = config  # what saving writes down
    return module


def has_lora(module: torch.nn.Module) -> bool:
    return getattr(module, "_latentfuse_lora", None) is not None


def merge_lora(module: torch.nn.Module) -> torch.nn.Module:
    """Fold the adapters into the base weights and drop the adapter layers, in place."""
    from peft.tuners.lora import LoraLayer

    for name, layer in list(module.named_modules()):
        if isinstance(layer, LoraLayer):
            layer.merge()
            parent, _, child = name.rpartition(".")
            setattr(
                module.get_submodule(parent) if parent else module, child, layer.get_base_layer()
            )
    module._latentfuse_lora = None
    return module


def trainable_parameters(module: torch.nn.Module) -> int:
    """Parameters the optimiser updates."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def save_denoiser(
    module: torch.nn.Module, folder: Path, base: str = "", merge: bool = False
) -> None:
    """Write a denoiser: a diffusers folder, or with LoRA the adapters and trained rows plus the
    base's reference (unless `merge`, which writes the merged weights)."""
    import copy

    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    folder = Path(folder)
    if not has_lora(module) or merge:
        plain = merge_lora(copy.deepcopy(module)) if has_lora(module) else module
        plain.save_pretrained(folder, safe_serialization=True)
        return
    config: Any = module._latentfuse_lora
    folder.mkdir(parents=True, exist_ok=True)
    module.save_config(folder)
    tensors = dict(get_peft_model_state_dict(module))
    state = module.state_dict()
    tensors.update({k: v for k, v in state.items() if k.startswith(TRAINED_IN_FULL)})
    save_file(
        {k: v.detach().float().contiguous().cpu() for k, v in tensors.items()},
        folder / ADAPTER_WEIGHTS,
    )
    peft = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.to_dict().items()}
    record = {
        "adapter": "lora",
        "base": base,
        "base_sha256": find_base(base).sha256(),
        "peft": json.loads(json.dumps(peft, default=str)),
        "trained_in_full": list(TRAINED_IN_FULL),
    }
    (folder / ADAPTER_CONFIG).write_text(json.dumps(record, indent=2))


def load_adapter_folder(folder: Path) -> torch.nn.Module:
    """The denoiser of an adapter folder: its base (checked against the recorded hash), its
    adapters and trained rows, merged for sampling."""
    import diffusers
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    record = json.loads((folder / ADAPTER_CONFIG).read_text())
    base = find_base(record["base"], f"{folder / ADAPTER_CONFIG} base")
    if base.sha256() != record["base_sha256"]:
        raise ValueError(
            f"{folder}: its adapters were trained on a base with sha256 "
            f"{record['base_sha256'][:12]}..., but {record['base']} now holds "
            f"{base.sha256()[:12]}...: restore that base or use a merged export"
        )
    config = json.loads((folder / "config.json").read_text())
    module = getattr(diffusers, config["_class_name"]).from_config(config)
    state = load_file(base.weights)
    state.pop("class_embedding.weight", None)
    module.load_state_dict(state, strict=False)
    known = set(LoraConfig.__dataclass_fields__)
    peft = LoraConfig(
        **{k: v for k, v in record["peft"].items() if k in known and k != "peft_type"}
    )
    inject_adapter_in_model(peft, module)
    tensors = load_file(folder / ADAPTER_WEIGHTS)
    full = {k: v for k, v in tensors.items() if k.startswith(TRAINED_IN_FULL)}
    set_peft_model_state_dict(module, {k: v for k, v in tensors.items() if k not in full})
    module.load_state_dict(full, strict=False)
    module._latentfuse_lora = peft
    return merge_lora(module).eval()
