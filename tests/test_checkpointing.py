"""Training state round trips (modules, optimizers, RNG) and atomic folder writes."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from latentfuse.checkpointing import atomic_write_dir, load_state, save_state


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.SiLU(), torch.nn.Linear(8, 2))


def _optimizer(model: torch.nn.Module, amsgrad: bool) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, amsgrad=amsgrad)


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    generator = torch.Generator().manual_seed(100 + step)
    inputs, targets = (
        torch.randn(16, 4, generator=generator),
        torch.randn(16, 2, generator=generator),
    )
    optimizer.zero_grad()
    torch.nn.functional.mse_loss(model(inputs), targets).backward()
    optimizer.step()


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("steps_before", [1, 3])
def test_save_load_continues_training_identically(
    tmp_path: Path, amsgrad: bool, steps_before: int
) -> None:
    model = _model(seed=0)
    optimizer = _optimizer(model, amsgrad)
    for step in range(steps_before):
        _step(model, optimizer, step)
    extra = {"step": steps_before, "note": "mid-run"}
    ema = {"ema.weight": torch.arange(6.0).reshape(2, 3)}
    save_state(tmp_path / "state", {"model": model}, {"opt": optimizer}, extra, tensors=ema)
    _step(model, optimizer, steps_before)  # the uninterrupted run takes one more step

    restored = _model(seed=1)  # different initial weights: everything must come from disk
    restored_optimizer = _optimizer(restored, amsgrad)
    loaded_extra, loaded_tensors = load_state(
        tmp_path / "state", {"model": restored}, {"opt": restored_optimizer}
    )
    assert loaded_extra == extra
    assert loaded_tensors.keys() == ema.keys()
    assert torch.equal(loaded_tensors["ema.weight"], ema["ema.weight"])
    _step(restored, restored_optimizer, steps_before)
    for name, value in model.state_dict().items():
        assert torch.equal(restored.state_dict()[name], value), name


def _draw_torch() -> list[float]:
    return torch.rand(4).tolist()


def _draw_numpy() -> list[float]:
    return np.random.standard_normal(3).tolist()  # odd count: leaves a cached gaussian


def _draw_python() -> list[float]:
    return [random.random(), random.gauss(0, 1), random.randint(0, 10**9)]


@pytest.mark.parametrize("draw", [_draw_torch, _draw_numpy, _draw_python])
def test_rng_round_trip(tmp_path: Path, draw: Callable[[], list[float]]) -> None:
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    draw()  # move off the seeded state, and fill the gaussian caches
    save_state(tmp_path / "state", {}, {}, {})
    expected = draw()
    draw()
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    load_state(tmp_path / "state", {}, {})
    assert draw() == expected


def test_load_state_can_leave_the_rng_alone(tmp_path: Path) -> None:
    torch.manual_seed(0)
    save_state(tmp_path / "state", {}, {}, {})
    saved_draw = torch.rand(4).tolist()
    torch.manual_seed(1)
    before = torch.get_rng_state()
    load_state(tmp_path / "state", {}, {}, restore_rng=False)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.rand(4).tolist() != saved_draw


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_atomic_write_dir_keeps_the_old_folder_when_the_writer_raises(
    tmp_path: Path, error: type[BaseException]
) -> None:
    target = tmp_path / "run" / "state"
    atomic_write_dir(target, lambda tmp: (tmp / "weights.bin").write_bytes(b"old"))

    def failing_writer(tmp: Path) -> None:
        (tmp / "weights.bin").write_bytes(b"new, half written")
        (tmp / "extra.json").write_text("{}")
        raise error("interrupted")

    with pytest.raises(error, match="interrupted"):
        atomic_write_dir(target, failing_writer)
    assert sorted(p.name for p in target.iterdir()) == ["weights.bin"]
    assert (target / "weights.bin").read_bytes() == b"old"
    assert [p.name for p in target.parent.iterdir()] == ["state"]  # no temporary left behind


@pytest.mark.parametrize("exists", [False, True])
def test_atomic_write_dir_replaces_the_folder(tmp_path: Path, exists: bool) -> None:
    target = tmp_path / "state"
    if exists:
        atomic_write_dir(target, lambda tmp: (tmp / "stale.txt").write_text("old"))
    atomic_write_dir(target, lambda tmp: (tmp / "fresh.txt").write_text("new"))
    assert sorted(p.name for p in target.iterdir()) == ["fresh.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["state"]
