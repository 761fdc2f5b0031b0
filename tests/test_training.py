"""End-to-end training on a tiny data set and a tiny autoencoder (CPU, seconds)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from latentfuse.training.engine import lr_at, make_accelerator
from latentfuse.training.runner import train
from latentfuse.training.setup import build_run
from latentfuse.training.trainer import Trainer
from tests.worlds import tiny_config

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def isolated(tiny_world: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LATENTFUSE_CACHE", str(tiny_world["cache"]))


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of every safetensors file under `folder`, keyed by relative path."""
    out = {}
    for file in sorted(folder.rglob("*.safetensors")):
        for key, value in load_file(file).items():
            out[f"{file.relative_to(folder)}:{key}"] = value
    return out


@pytest.mark.parametrize(
    ("t_cut", "has_server", "num_clients_with_unet"),
    [(0, True, 0), (100, True, 2), (1000, False, 2)],
    ids=["GM", "split", "ICM"],
)
def test_cut_points_train_and_export(
    tiny_world, tmp_path, t_cut, has_server, num_clients_with_unet
):
    model = train(tiny_config(tiny_world, f"split.t_cut={t_cut}"), tmp_path / "run")
    index = json.loads((model / "model_index.json").read_text())
    assert index["_class_name"] == "CollaFusePipeline"
    assert (model / "server_unet" / "config.json").is_file() == has_server
    assert len(list((model / "clients").glob("*/config.json"))) == num_clients_with_unet
    losses = [
        json.loads(line) for line in (tmp_path / "run" / "losses.jsonl").read_text().splitlines()
    ]
    assert [row["step"] for row in losses] == [1, 2, 3, 4]
    assert all(np.isfinite(v) for row in losses for k, v in row.items() if k != "step")
    assert len(list((tmp_path / "run" / "samples").glob("*.png"))) == 2


def test_resume_equals_uninterrupted(tiny_world, tmp_path):
    straight = train(tiny_config(tiny_world), tmp_path / "straight")
    # The same clients: the same secret release keys (a resumed run reads its own).
    shutil.copytree(tmp_path / "straight" / "clients", tmp_path / "resumed" / "clients")
    train(tiny_config(tiny_world, "train.max_steps=2"), tmp_path / "resumed")
    resumed = train(tiny_config(tiny_world), tmp_path / "resumed", resume=True)
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_clients_step_every_client_every_steps_and_the_server_every_step(tiny_world, tmp_path):
    run = build_run(tiny_config(tiny_world, "train.client_every=3", "train.max_steps=7"))
    trainer = Trainer(run, make_accelerator(run.config.train), tmp_path / "run")

    def snapshot() -> dict[str, torch.Tensor]:
        return {
            name: torch.cat(
                [p.detach().flatten() for p in trainer.engine.module(name).parameters()]
            )
            for name in trainer.engine.wrapped
        }

    moved = []
    for _ in range(7):
        before = snapshot()
        losses = trainer.train_step()
        after = snapshot()
        moved.append({n for n in before if not torch.equal(before[n], after[n])})
        assert set(losses) == set(trainer.engine.wrapped)  # the clients' latest losses too
    clients = {n for n in trainer.engine.wrapped if n != "server"}
    assert clients
    assert moved == [{"server", *clients} if step % 3 == 0 else {"server"} for step in range(7)]


def test_resume_equals_uninterrupted_when_clients_step_less_often(tiny_world, tmp_path):
    every = "train.client_every=2"
    straight = train(tiny_config(tiny_world, every, "train.max_steps=5"), tmp_path / "straight")
    shutil.copytree(tmp_path / "straight" / "clients", tmp_path / "resumed" / "clients")
    train(tiny_config(tiny_world, every, "train.max_steps=3"), tmp_path / "resumed")
    resumed = train(
        tiny_config(tiny_world, every, "train.max_steps=5"), tmp_path / "resumed", resume=True
    )
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_existing_checkpoint_needs_resume(tiny_world, tmp_path):
    train(tiny_config(tiny_world, "train.max_steps=2"), tmp_path / "run")
    with pytest.raises(FileExistsError, match="--resume"):
        train(tiny_config(tiny_world, "train.max_steps=2"), tmp_path / "run")


def test_resume_under_another_config_is_refused_and_the_record_kept(tiny_world, tmp_path):
    train(tiny_config(tiny_world, "train.max_steps=2"), tmp_path / "run")
    recorded = (tmp_path / "run" / "config.json").read_text()
    with pytest.raises(ValueError, match=r"split\.t_cut: checkpoint 100, now 200"):
        train(tiny_config(tiny_world, "split.t_cut=200"), tmp_path / "run", resume=True)
    assert (tmp_path / "run" / "config.json").read_text() == recorded
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert state["extra"]["config"]["split"]["t_cut"] == 100  # the checkpoint records it too


@pytest.mark.parametrize("policy", ["once", "fresh"])
def test_transport_carries_only_releases(tiny_world, tmp_path, policy):
    config = tiny_config(tiny_world, f'split.release_policy="{policy}"', "train.max_steps=12")
    run = build_run(config)
    trainer = Trainer(run, make_accelerator(config.train), tmp_path, keep_transport_log=True)
    for _ in range(config.train.max_steps):
        trainer.train_step()
    clients = {c.client_id: c for c in run.clients}
    for message in trainer.transport.log:
        client = clients[message.client_id]
        z0 = client._z0
        eps_c = client.release_noise(message.epoch)
        torch.testing.assert_close(message.latents, client.split.release(z0, eps_c))
        assert not torch.allclose(message.latents, z0)
        assert not torch.allclose(message.latents, eps_c)
    per_client = [m.client_id for m in trainer.transport.log]
    epochs = {c.client_id: c.sampler.epoch for c in run.clients}
    assert min(epochs.values()) >= 1, "the run must cross an epoch boundary to test re-release"
    for cid, epoch in epochs.items():
        expected = 1 if policy == "once" else epoch + 1
        assert per_client.count(cid) == expected


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.bogus=1", "unknown key"),
        ("split.t_cut=1001", "split.t_cut"),
        ('data.partition="nope"', "data.partition"),
    ],
)
def test_bad_config_fails_before_any_work(tiny_world, tmp_path, capsys, override, message):
    from train import main

    out = tmp_path / "never"
    config = tmp_path / "c.toml"
    config.write_text("")
    code = main(["--config", str(config), "--output-dir", str(out), override])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.e2e
def test_missing_data_fails_before_output(tiny_world, tmp_path, capsys):
    from train import main

    config = tmp_path / "c.toml"
    config.write_text(f'vae = "{tiny_world["vae"]}"\n[data]\nsource = "{tmp_path / "nothing"}"\n')
    assert main(["--config", str(config), "--output-dir", str(tmp_path / "out")]) == 2
    assert "not found" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def launch(tiny_world: dict[str, Path], out: Path, processes: int) -> Path:
    """Run train.py under `accelerate launch` on the CPU with `processes` processes."""
    config = tiny_config(tiny_world)
    toml = out.parent / f"{out.name}.toml"
    lines = [
        f'vae = "{config.vae}"',
        "[data]",
        f'source = "{config.data.source}"',
        'split = ""',
        "num_clients = 2",
        "[server_unet]",
        "block_out_channels = [32]",
        "[client_unet]",
        "block_out_channels = [32]",
        "[train]",
        "server_batch_size = 8",
        "client_batch_size = 4",
        "max_steps = 3",
        "warmup_steps = 1",
        "num_preview_images = 1",
        "preview_inference_steps = 2",
    ]
    toml.write_text("\n".join(lines) + "\n")
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    multi = ["--multi_gpu"] if processes > 1 else []
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        *multi,
        str(REPO / "train.py"),
        "--config",
        str(toml),
        "--output-dir",
        str(out),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "model"


@pytest.mark.slow
def test_two_processes_match_one(tiny_world, tmp_path):
    # Adam turns float noise in a ~zero gradient into a full step, so the nets use groups of
    # 4 channels (the default): no parameter's gradient is identically zero.
    one_dir = launch(tiny_world, tmp_path / "one", 1)
    # The same clients, so the same secret release keys: the same releases.
    shutil.copytree(tmp_path / "one" / "clients", tmp_path / "two" / "clients")
    two_dir = launch(tiny_world, tmp_path / "two", 2)
    one, two = weights(one_dir), weights(two_dir)
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(one[key], two[key], rtol=1e-4, atol=2e-5, msg=key)
    losses = [
        [json.loads(line) for line in (d.parent / "losses.jsonl").read_text().splitlines()]
        for d in (one_dir, two_dir)
    ]
    assert [row["step"] for row in losses[0]] == [row["step"] for row in losses[1]]
    for row_one, row_two in zip(*losses, strict=True):
        for key in row_one:
            assert row_two[key] == pytest.approx(row_one[key], rel=1e-4)


def test_clients_of_different_sizes(tiny_world, tmp_path):
    config = tiny_config(tiny_world, 'data.partition="dirichlet"', "data.alpha=0.3")
    run = build_run(config)
    sizes = sorted(c.num_images for c in run.clients)
    assert sizes[0] != sizes[-1], "the dirichlet partition should give unequal clients"
    model = train(config, tmp_path / "run")
    described = json.loads((model / "collafuse.json").read_text())["clients"]
    assert sorted(c["num_train_images"] for c in described.values()) == sizes


def test_a_signal_checkpoints_the_finished_step_and_resume_continues(
    tiny_world, tmp_path, monkeypatch
):
    """SIGTERM mid-run: the step in progress finishes and is checkpointed, then training stops;
    --resume from there gives the same weights as a run that was never stopped."""
    import signal

    from latentfuse.training.trainer import Trainer

    original = Trainer.train_step

    def step_then_signal(self):
        losses = original(self)
        if self.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives after step 3 has fully run
        return losses

    config = tiny_config(tiny_world, "train.max_steps=6", "train.checkpoint_every=100")
    monkeypatch.setattr(Trainer, "train_step", step_then_signal)
    with pytest.raises(KeyboardInterrupt, match="SIGTERM at step 3 of 6.*model.*--resume"):
        train(config, tmp_path / "stopped")
    state = json.loads((tmp_path / "stopped" / "checkpoint" / "state.json").read_text())
    assert state["extra"]["step"] == 3
    # the stop leaves a model of the steps made, marked as such
    described = json.loads((tmp_path / "stopped" / "model" / "collafuse.json").read_text())
    assert described["training"]["steps"] == 3 and described["training"]["planned_steps"] == 6
    assert described["training"]["stopped_by"] == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is put back
    monkeypatch.setattr(Trainer, "train_step", original)
    resumed = train(config, tmp_path / "stopped", resume=True)
    shutil.copytree(tmp_path / "stopped" / "clients", tmp_path / "straight" / "clients")
    straight = train(config, tmp_path / "straight")  # the same clients: the same keys
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_a_buffered_run_releases_at_the_cut_and_hands_off_above_it(tiny_world, tmp_path):
    """split.max_target_variance: the release level and the privacy record stay at the
    configured cut; the server trains and samples only from the hand-off up."""
    from latentfuse.method.privacy import release_guarantee
    from latentfuse.method.split import buffered_cut

    config = tiny_config(tiny_world, "split.max_target_variance=4.0", "privacy.clip_norm=20")
    run = build_run(config, tmp_path / "run")
    alphas = run.scheduler.alphas_cumprod.double()
    handoff = buffered_cut(alphas, 100, 4.0)
    for client in run.clients:
        assert client.split.handoff_t == handoff > 100 and client.split.release_cut == 100
    model = train(config, tmp_path / "run", resume=True)
    described = json.loads((model / "collafuse.json").read_text())
    for cid, entry in described["clients"].items():
        assert entry["t_cut"] == handoff and entry["release_cut"] == 100
        expected = release_guarantee(alphas, 100, 20, config.privacy.delta, "once", 0)
        assert described["privacy"]["clients"][cid]["epsilon"] == pytest.approx(expected["epsilon"])


def test_original_objective_records_the_authors_compensation(tiny_world, tmp_path):
    """collafuse.json holds client_start under the original objective (none under exact), and
    the pipeline's chain gives the client the entries below it."""
    from diffusers import DDIMScheduler

    from latentfuse.pipelines.sampling import split_schedule

    model = train(tiny_config(tiny_world, 'split.objective="original"'), tmp_path / "run")
    described = json.loads((model / "collafuse.json").read_text())
    assert {c["client_start"] for c in described["clients"].values()} == {190}
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(25)
    server, client = split_schedule(scheduler, described, 0)
    assert server.min() >= 100 and client.max() < 190 and client.max() > server.min() - 40
    from latentfuse.deploy.config import sampling_scheduler
    from latentfuse.pipelines import CollaFusePipeline

    pipe = CollaFusePipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    base = pipe.scheduler.config
    for name in ("ddim", "euler"):  # euler keeps a step index: restarted at the client's entry
        pipe.scheduler = sampling_scheduler(name, base)
        out = pipe(client_id=0, batch_size=1, num_inference_steps=10, output_type="pt")
        assert torch.isfinite(out.images).all()
    pipe.scheduler = sampling_scheduler("dpm", base)
    with pytest.raises(ValueError, match="multistep history"):
        pipe(client_id=0, batch_size=1, num_inference_steps=10, output_type="pt")
    exact = train(tiny_config(tiny_world), tmp_path / "exact")
    assert all(
        "client_start" not in c
        for c in json.loads((exact / "collafuse.json").read_text())["clients"].values()
    )


def test_a_cosine_run_steps_every_optimiser_at_the_scheduled_rate(tiny_world, tmp_path):
    steps = ("train.max_steps=6", "train.warmup_steps=2", "train.client_every=2")
    run = build_run(tiny_config(tiny_world, "train.lr_schedule=cosine", *steps))
    trainer = Trainer(run, make_accelerator(run.config.train), tmp_path / "run")
    train_cfg, rates = run.config.train, trainer.engine.learning_rates
    seen = {name: [] for name in trainer.engine.wrapped}
    for step in range(6):
        stepping = trainer.stepping()
        trainer.train_step()
        for name in stepping:
            seen[name].append(trainer.engine.optimizers[name].param_groups[0]["lr"])
        assert set(stepping) == set(seen) if step % 2 == 0 else stepping == ["server"]
    for name, lrs in seen.items():
        at = range(6) if name == "server" else range(0, 6, 2)
        expected = [lr_at(s, rates[name], 2, "cosine", train_cfg.max_steps) for s in at]
        assert lrs == pytest.approx(expected), name
    assert seen["server"][-1] < 0.2 * rates["server"]  # the last steps are small


@pytest.mark.parametrize("value", ["linear", "", "Cosine"])
def test_an_unknown_lr_schedule_is_refused_in_one_line(tiny_world, value):
    with pytest.raises(ValueError, match=r"train\.lr_schedule.*constant.*cosine"):
        tiny_config(tiny_world, f"train.lr_schedule={value}")


@pytest.mark.parametrize(
    ("entry", "objective", "train_cut"),
    [("auto", "exact", 100), ("auto", "original", 100), ("compensated", "exact", 190)],
)
def test_the_run_trains_each_client_on_the_levels_sampling_gives_it(
    tiny_world, tmp_path, entry, objective, train_cut
):
    config = tiny_config(
        tiny_world, f'split.client_entry="{entry}"', f'split.objective="{objective}"'
    )
    run = build_run(config, tmp_path / "run")
    assert [c.train_cut for c in run.clients] == [train_cut] * 2
