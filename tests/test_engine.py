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


def grouped(seed: int, poison: float = 1.0) -> dict:
    """Six rows in three groups (clients 0, 1, 2); client 1's targets scaled by `poison`."""
    g = torch.Generator().manual_seed(seed)
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    target = torch.randn(6, 4, 8, 8, generator=g)
    target[groups == 1] *= poison
    return {
        "sample": torch.randn(6, 4, 8, 8, generator=g),
        "timestep": torch.tensor([1, 2, 3, 4, 5, 6]),
        "class_labels": torch.tensor([0, 1, 2, 0, 1, 2]),
        "target": target,
        "weight": torch.ones(6),
        "groups": groups,
    }


def gradient(unet: torch.nn.Module) -> torch.Tensor:
    """Every parameter's .grad in one vector (then cleared)."""
    flat = torch.cat([p.grad.flatten() for p in unet.parameters()])
    unet.zero_grad(set_to_none=True)
    return flat


def test_a_loose_per_client_clip_is_the_plain_gradient():
    from latentfuse.training.engine import denoising_loss, group_clipped_backward

    unet = tiny_engine().module("m")
    batch = grouped(0)
    denoising_loss(unet, batch).backward()
    plain = gradient(unet)
    loss = group_clipped_backward(unet, batch, clip=1e6)
    assert torch.allclose(gradient(unet), plain, rtol=1e-4, atol=1e-7)
    assert loss.item() == pytest.approx(denoising_loss(unet, batch).item(), rel=1e-5)


@pytest.mark.parametrize("poison", [10.0, 1000.0])
def test_a_per_client_clip_bounds_one_clients_pull_whatever_its_data(poison):
    """Client 1 sends targets `poison` times too large: unclipped, the step follows it; clipped
    at 1x the median, the step is at most three times the largest honest client's part."""
    from latentfuse.training.engine import denoising_loss, group_clipped_backward

    unet = tiny_engine().module("m")
    batch = grouped(1, poison)
    honest = []
    for client in (0, 2):
        rows = batch["groups"] == client
        part = {k: v[rows] for k, v in batch.items()}
        (denoising_loss(unet, part) * rows.sum() / 6).backward()
        honest.append(gradient(unet).norm())
    denoising_loss(unet, batch).backward()
    unclipped = gradient(unet).norm()
    group_clipped_backward(unet, batch, clip=1.0)
    clipped = gradient(unet).norm()
    assert unclipped > 5 * max(honest)  # the poison dominates a plain step
    assert clipped <= 3 * max(honest) * (1 + 1e-4)


def test_an_engine_clips_per_client_only_where_asked():
    from latentfuse.config import TrainConfig

    with pytest.raises(ValueError, match="no model named"):
        Engine(Accelerator(cpu=True), {}, {}, TrainConfig(), {}, group_clip={"server": 1.0})
    loose, plain = tiny_engine(), tiny_engine()
    loose.group_clip = {"m": 1e6}
    for engine in (loose, plain):
        engine.train_step(lambda: {"m": grouped(2)})
    # Adam's first step is lr * g / |g| elementwise: where a gradient is ~0 the two sums' rounding
    # can flip it, so a few elements may differ by up to 2 lr; the rest agree
    differ = [
        (loose.module("m").state_dict()[name] - value).abs().flatten()
        for name, value in plain.module("m").state_dict().items()
    ]
    differ = torch.cat(differ)
    assert differ.max() <= 2.1e-3 and (differ > 1e-6).float().mean() < 0.01
    strict = tiny_engine()
    strict.group_clip = {"m": 1.0}
    strict.train_step(lambda: {"m": grouped(2, poison=1000.0)})
    plain.train_step(lambda: {"m": grouped(2, poison=1000.0)})
    assert any(
        not torch.allclose(strict.module("m").state_dict()[k], v)
        for k, v in plain.module("m").state_dict().items()
    )
