"""Training state as safetensors plus JSON (never pickle), written atomically."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)


def atomic_write_dir(target: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_dir)` and then rename the folder into `target`; no half-written folder."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes 0700; a published folder should read like any other
    try:
        write(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def recover_dir(target: str | os.PathLike) -> Path:
    """Finish what a process killed inside `atomic_write_dir` left: the previous complete
    folder (`.<name>.old`) is renamed back when `target` is missing (it is the newest complete
    one), a leftover `.old` beside a complete `target` is removed, and unfinished temporary
    folders (`.<name>.tmp-*`, never complete, never acknowledged) are removed. Nothing else in
    the parent folder is touched."""
    target = Path(target)
    old = target.with_name(f".{target.name}.old")
    if not target.exists() and old.is_dir():
        logger.warning("%s was missing: restored the previous complete copy %s", target, old)
        old.rename(target)
    elif target.exists() and old.is_dir():
        shutil.rmtree(old)
    for tmp in target.parent.glob(f".{target.name}.tmp-*"):
        if tmp.is_dir():
            logger.warning("removing %s, an unfinished write of %s", tmp, target)
            shutil.rmtree(tmp)
    return target


def atomic_write_json(path: str | os.PathLike, payload: Any) -> None:
    """Write JSON to a temporary name and rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
    os.replace(tmp, path)


def optimizer_to_safetensors(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Split an optimizer state dict into tensors (for safetensors) and JSON metadata."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_safetensors(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict
) -> None:
    """Inverse of `optimizer_to_safetensors`: load the state into `optimizer`."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """The process's torch/numpy/python RNG states as tensors and JSON."""
    np_state = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np_state[1].copy())}
    meta = {
        "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": repr(random.getstate()),
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Restore what `rng_state` captured."""
    import ast

    torch.set_rng_state(tensors["torch"])
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["numpy_keys"].numpy(), pos, has_gauss, cached))
    random.setstate(ast.literal_eval(meta["python"]))


def save_state(
    directory: str | os.PathLike,
    modules: dict[str, torch.nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    extra: dict[str, Any],
    tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Save modules, optimizers, RNG and `extra` JSON into `directory` atomically."""

    def write(tmp: Path) -> None:
        for name, module in modules.items():
            weights = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
            save_file(weights, tmp / f"{name}.safetensors")
        meta: dict[str, Any] = {"extra": extra, "optimizers": {}}
        for name, optimizer in optimizers.items():
            opt_tensors, opt_meta = optimizer_to_safetensors(optimizer)
            save_file(opt_tensors, tmp / f"optimizer-{name}.safetensors")
            meta["optimizers"][name] = opt_meta
        rng_tensors, meta["rng"] = rng_state()
        save_file(rng_tensors, tmp / "rng.safetensors")
        if tensors:
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                tmp / "tensors.safetensors",
            )
        (tmp / "state.json").write_text(json.dumps(meta, indent=2))

    return atomic_write_dir(directory, write)


def load_state(
    directory: str | os.PathLike,
    modules: dict[str, torch.nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    restore_rng: bool = True,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Load what `save_state` wrote; return its `extra` JSON and its extra tensors."""
    directory = Path(directory)
    meta = json.loads((directory / "state.json").read_text())
    for name, module in modules.items():
        module.load_state_dict(load_file(directory / f"{name}.safetensors"))
    for name, optimizer in optimizers.items():
        opt_tensors = load_file(directory / f"optimizer-{name}.safetensors")
        optimizer_from_safetensors(optimizer, opt_tensors, meta["optimizers"][name])
    if restore_rng:
        set_rng_state(load_file(directory / "rng.safetensors"), meta["rng"])
    extra_path = directory / "tensors.safetensors"
    tensors = load_file(extra_path) if extra_path.exists() else {}
    return meta["extra"], tensors
