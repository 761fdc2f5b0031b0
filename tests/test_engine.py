"""The one training engine (latentfuse/training/engine.py): learning rate, the optimiser step,
EMA, skipped steps and the checkpoint round trip."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

from latentfuse.config import TrainConfig, UNetConfig
from latentfuse.models import build_unet
from latentfuse.training.engine import ConfigMismatch, Engine, lr_at


def tiny_engine(seed: int = 0, record: dict | None = None) -> Engine:
    """An engine over one tiny class-conditional UNet."""
    torch.manual_seed(seed)
    unet = build_unet(UNetConfig(block_out_channels=(32,), layers_per_block=1), 8, 4, 3)
    train = TrainConfig(warmup_steps=1, ema_decay=0.9)
    return Engine(Accelerator(cpu=True), {"m": unet}, {"m": 1e-3}, train, record or {"a": 1})


def batches(seed: int) -> dict:
    """A reproducible batch for model "m"."""
    g = torch.Generator().manual_seed(seed)
    return {
        "m": {
            "sample": torch.randn(2, 4, 8, 8, generator=g),
            "timestep": torch.tensor([1, 2]),
            "class_labels": torch.tensor([0, 1]),
            "target": torch.randn(2, 4, 8, 8, generator=g),
            "weight": torch.ones(2),
        }
    }


def test_lr_at_warms_up_then_holds_or_decays_by_the_cosine():
    assert [lr_at(s, 1.0, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cosine = [lr_at(s, 1.0, 4, "cosine", 14) for s in range(16)]
    assert cosine[:4] == [0.25, 0.5, 0.75, 1.0]  # the same warm-up
    assert cosine[4] == 1.0 and cosine[9] == pytest.approx(0.5) and cosine[14] == 0.0
    assert all(a > b for a, b in zip(cosine[4:14], cosine[5:15], strict=True))
    assert cosine[15] == 0.0  # past max_steps (a resumed run) it stays at the floor
    assert lr_at(14, 1.0, 4, "cosine", 14, floor=0.1) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="schedule"):
        lr_at(5, 1.0, 4, "linear", 14)


def test_a_non_finite_gradient_skips_the_step_and_keeps_the_weights():
    from accelerate import Accelerator

    from latentfuse.config import TrainConfig, UNetConfig
    from latentfuse.models import build_unet
    from latentfuse.training.engine import Engine

    torch.manual_seed(0)
    unet = build_unet(UNetConfig(block_out_channels=(32,), layers_per_block=1), 8, 4, 3)
    engine = Engine(Accelerator(cpu=True), {"m": unet}, {"m": 1e-3}, TrainConfig(), {})

    def batch(target: float) -> dict:
        return {
            "m": {
                "sample": torch.randn(2, 4, 8, 8),
                "timestep": torch.tensor([1, 2]),
                "class_labels": torch.tensor([0, 1]),
                "target": torch.full((2, 4, 8, 8), target),
                "weight": torch.ones(2),
            }
        }

    before = {k: v.clone() for k, v in engine.module("m").state_dict().items()}
    engine.train_step(lambda: batch(float("nan")))
    after = engine.module("m").state_dict()
    assert engine.skipped == {"m": 1} and engine.step == 1
    assert all(torch.equal(before[k], after[k]) for k in before)
    engine.train_step(lambda: batch(0.0))  # a finite batch trains again
    assert engine.skipped == {"m": 1}
    assert not all(torch.equal(before[k], engine.module("m").state_dict()[k]) for k in before)
    assert all(torch.isfinite(v).all() for v in engine.module("m").state_dict().values())


def test_a_checkpoint_resumes_to_the_weights_of_an_uninterrupted_engine(tmp_path):
    """Three steps straight equal two steps, save, load into a fresh engine, one more step."""
    straight = tiny_engine()
    for s in range(3):
        straight.train_step(lambda s=s: batches(s))
    first = tiny_engine()
    for s in range(2):
        first.train_step(lambda s=s: batches(s))
    first.save(tmp_path / "ckpt", {"note": "x"}, {"extra": torch.arange(3)})
    resumed = tiny_engine(seed=1)  # other initial weights: the checkpoint must replace them
    extra, tensors = resumed.load(tmp_path / "ckpt")
    assert extra["note"] == "x" and torch.equal(tensors["extra"], torch.arange(3))
    assert resumed.step == 2
    resumed.train_step(lambda: batches(2))
    for name, value in straight.module("m").state_dict().items():
        assert torch.equal(value, resumed.module("m").state_dict()[name]), name
    ema_a, ema_b = straight.ema_model("m").state_dict(), resumed.ema_model("m").state_dict()
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)


def test_a_checkpoint_of_another_config_is_refused(tmp_path):
    tiny_engine(record={"a": 1}).save(tmp_path / "ckpt")
    with pytest.raises(ConfigMismatch, match="another configuration"):
        tiny_engine(record={"a": 2}).load(tmp_path / "ckpt")
