"""`latentfuse train` on a user's own folder (issue 15): defaults, summary, errors, scaling."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from latentfuse.cli.main import main as latentfuse
from latentfuse.testing.shapes import make_shapes
from latentfuse.training.plan import BUDGET_SECONDS, EPOCHS, MIN_STEPS, choose_clients, derive_steps

TINY = [
    "server_unet.block_out_channels=[32]",
    "client_unet.block_out_channels=[32]",
    "train.server_batch_size=8",
    "train.client_batch_size=4",
    "train.warmup_steps=1",
    "train.checkpoint_every=2",
    "train.log_every=1",
    "train.num_preview_images=2",
    "train.preview_inference_steps=2",
]


@pytest.fixture
def shapes(tmp_path: Path) -> Path:
    """A 3-class ImageFolder of 12 images a class, without a train/ level."""
    return make_shapes(tmp_path / "shapes", classes=3, per_class=12, size=32)


def train(data: Path, out: Path, vae: Path, *extra: str, fit: str = "never") -> int:
    args = ["train", "--data", str(data), "--output-dir", str(out), "--vae", str(vae)]
    return latentfuse([*args, "--max-steps", "2", "--fit-vae", fit, *TINY, *extra])


@pytest.mark.e2e
def test_train_on_a_plain_image_folder_summarises_and_writes_everything(
    shapes, tiny_vae_dir, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("LATENTFUSE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert train(shapes, out, tiny_vae_dir) == 0
    captured = capsys.readouterr()
    plan = json.loads((out / "plan.json").read_text())  # the summary, as data
    assert plan["notes"][:2] == [
        "3 clients: min(5, 3 classes)",
        "each client holds its own classes",
    ]
    classes = sorted(c for client in plan["clients"] for c in client["classes"])
    assert classes == ["circle", "square", "triangle"] and len(plan["clients"]) == 3
    assert sum(c["train_images"] + c["held_out"] for c in plan["clients"]) == 36
    assert (plan["steps"], plan["why"]) == (2, "as configured")
    assert plan["time_budget_seconds"] is None  # steps as configured: no deadline
    assert plan["reconstruction_psnr_db"] < 20  # a random autoencoder: badly, and warned
    assert "warning: the autoencoder reconstructs these images at only" in captured.err
    model = json.loads((out / "model" / "collafuse.json").read_text())
    assert model["guidance_scale"] == 3.0  # trained with label dropout: sample guided
    recorded = json.loads((out / "config.json").read_text())
    assert recorded["data"]["subfolder"] == ""
    # the new-data defaults: the server draws high-noise steps more often, the lr decays
    assert recorded["split"]["server_timesteps"] == "rising"
    assert recorded["train"]["lr_schedule"] == "cosine"
    assert (out / "loss.png").stat().st_size > 0
    assert len(list((out / "samples").glob("step-000002-client-*.png"))) == 3


def test_a_train_level_is_found_and_the_user_keeps_the_last_word(
    shapes, tiny_vae_dir, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("LATENTFUSE_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "with-train"
    root.mkdir()
    shapes.rename(root / "train")
    make_shapes(root / "test", classes=3, per_class=2, size=32)  # never read
    out = tmp_path / "run"
    extra = ("data.num_clients=2", "data.partition=iid", "train.guidance_scale=5")
    assert train(root, out, tiny_vae_dir, *extra) == 0
    assert json.loads((out / "model" / "collafuse.json").read_text())["guidance_scale"] == 5.0
    config = json.loads((out / "config.json").read_text())
    assert config["data"]["subfolder"] == "train"
    assert (config["data"]["num_clients"], config["data"]["partition"]) == (2, "iid")
    plan = json.loads((out / "plan.json").read_text())
    assert not any("min(5" in note for note in plan["notes"])  # the user chose the clients
    assert (plan["data"]["images"], len(plan["data"]["classes"])) == (36, 3)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--data", "no/such/folder"], "--data: no such folder or archive: no/such/folder"),
        (["--config", "no-such.toml"], "--config: no such file: no-such.toml"),
        (["server_unet.no_such_key=1"], "unknown key(s) ['no_such_key'] in [server_unet]"),
        (["--minutes", "0"], "--minutes must be > 0, got 0.0"),
    ],
)
def test_mistakes_are_one_line_before_any_work(shapes, tmp_path, capsys, argv, message):
    args = ["train", "--data", str(shapes), "--output-dir", str(tmp_path / "run")]
    if argv[0] == "--data":
        args[2] = argv[1]
        argv = []
    assert latentfuse(args + argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("latentfuse train: error: ") and message in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.e2e
def test_vae_scaling_auto_is_computed_once_recorded_and_shipped(
    shapes, tiny_vae_dir, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("LATENTFUSE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert train(shapes, out, tiny_vae_dir, "vae_scaling=auto") == 0
    record = json.loads((out / "vae_scaling.json").read_text())
    shipped = json.loads((out / "model" / "vae" / "config.json").read_text())
    assert shipped["scaling_factor"] == pytest.approx(record["scaling_factor"])
    assert record["scaling_factor"] == pytest.approx(0.5 / record["latent_std_before"])
    std = json.loads((out / "plan.json").read_text())["latent_std"]
    assert std == pytest.approx(1.0, abs=0.1)  # the summary's sample of 512 (all 36 here)


@pytest.mark.e2e
def test_the_latent_std_warning_names_the_fix(shapes, tiny_vae_dir, tmp_path, capsys, monkeypatch):
    """The tiny autoencoder's random latents times 0.5 are far from std 1 on these shapes."""
    monkeypatch.setenv("LATENTFUSE_CACHE", str(tmp_path / "cache"))
    config = json.loads((tiny_vae_dir / "config.json").read_text())
    (tiny_vae_dir / "config.json").write_text(json.dumps(config | {"scaling_factor": 20.0}))
    assert train(shapes, tmp_path / "run", tiny_vae_dir) == 0
    err = capsys.readouterr().err
    assert "warning: the latents' std is" in err and "vae_scaling=auto" in err


@pytest.mark.e2e
def test_an_autoencoder_that_does_not_fit_the_data_is_fitted_saved_and_shipped(
    shapes, tiny_vae_dir, tmp_path, capsys, monkeypatch
):
    """The random tiny autoencoder reconstructs the shapes badly: `--fit-vae auto` fine-tunes
    it, saves it in OUT/vae with a record, and the run (latents, model folder) uses it."""
    from latentfuse.data.autoencoder import load_vae, vae_fingerprint

    monkeypatch.setenv("LATENTFUSE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert train(shapes, out, tiny_vae_dir, "--fit-vae-steps", "2", fit="auto") == 0
    record = json.loads((out / "vae" / "fit.json").read_text())
    assert record["steps"] == 2 and record["training_images"] == 33  # 36 less 3 held out
    assert record["psnr_before_db"] < 20 and record["measured_on"] == "3 held-out images"
    assert json.loads((out / "config.json").read_text())["vae"] == str((out / "vae").resolve())
    fitted = vae_fingerprint(load_vae(out / "vae"))
    assert fitted != vae_fingerprint(load_vae(tiny_vae_dir))
    assert vae_fingerprint(load_vae(out / "model" / "vae")) == fitted
    assert json.loads((out / "model" / "collafuse.json").read_text())["vae_sha256"] == fitted
    printed = capsys.readouterr().out
    assert "fitting it to 33 training images for 2 steps first (--fit-vae auto)" in printed
    assert "It has seen every client's training images" in printed


@pytest.mark.e2e
def test_a_rerun_without_resume_is_refused_before_the_autoencoder_is_touched(
    shapes, tiny_vae_dir, tmp_path, monkeypatch, capsys
):
    """The data-loss path: a second run into a folder with a checkpoint used to re-fit and
    replace OUT/vae before the folder check refused it. Now nothing in OUT changes."""
    monkeypatch.setenv("LATENTFUSE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert train(shapes, out, tiny_vae_dir, "--fit-vae-steps", "2", fit="auto") == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert train(shapes, out, tiny_vae_dir, "--fit-vae-steps", "2", fit="auto") == 2
    assert "already holds a checkpoint: pass --resume" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.e2e
def test_resume_refuses_another_autoencoder(shapes, tiny_vae_dir, tmp_path, monkeypatch, capsys):
    """The resume check compares the autoencoder's hash, not only the config's strings: the
    same path holding other weights is refused."""
    from latentfuse.data.autoencoder import load_vae

    monkeypatch.setenv("LATENTFUSE_CACHE", str(tmp_path / "cache"))
    out, vae_dir = tmp_path / "run", tmp_path / "vae"
    load_vae(tiny_vae_dir).save_pretrained(vae_dir)
    assert train(shapes, out, vae_dir) == 0
    import torch

    other = load_vae(vae_dir)
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    other.save_pretrained(vae_dir)
    assert train(shapes, out, vae_dir, "--resume") == 2
    assert "trained on the autoencoder with hash" in capsys.readouterr().err


def test_the_time_budget_stops_the_run_with_a_model(tiny_world, tmp_path, monkeypatch):
    """A deadline already past: the loop checkpoints and exports at once, and the model
    records the steps it made against those planned."""
    import time

    from latentfuse.training.runner import train as train_run
    from tests.worlds import tiny_config

    monkeypatch.setenv("LATENTFUSE_CACHE", str(tiny_world["cache"]))
    model = train_run(tiny_config(tiny_world), tmp_path / "run", deadline=time.monotonic())
    training = json.loads((model / "collafuse.json").read_text())["training"]
    assert (training["steps"], training["planned_steps"]) == (0, 4)
    assert (tmp_path / "run" / "checkpoint" / "state.json").is_file()


@pytest.mark.e2e
def test_an_autoencoder_that_fits_is_left_alone(
    shapes, tiny_vae_dir, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("LATENTFUSE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("latentfuse.training.plan.MIN_PSNR_DB", -100.0)  # every one "fits"
    out = tmp_path / "run"
    assert train(shapes, out, tiny_vae_dir, fit="auto") == 0
    assert not (out / "vae").exists()
    assert json.loads((out / "config.json").read_text())["vae"] == str(tiny_vae_dir)
    assert "fitting it" not in capsys.readouterr().out


def test_fitting_an_autoencoder_improves_its_reconstructions_and_is_reproducible():
    import torch

    from latentfuse.training.autoencoder import fit_autoencoder, reconstruction_metrics
    from tests.conftest import tiny_autoencoder

    torch.manual_seed(1)
    images = torch.rand(8, 3, 16, 16) * 2 - 1
    fitted = []
    for _ in range(2):
        vae = tiny_autoencoder()
        before = reconstruction_metrics(vae, images)["psnr"]
        fit_autoencoder(vae, images, steps=15, batch_size=8, learning_rate=1e-3, progress=False)
        fitted.append(vae)
        assert reconstruction_metrics(vae, images)["psnr"] > before + 1.0
        assert not vae.training and not any(p.requires_grad for p in vae.parameters())
    for a, b in zip(fitted[0].parameters(), fitted[1].parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"images: expected \(n, 3, h, w\)"):
        fit_autoencoder(fitted[0], images[0], steps=1)


def _run_of(images_per_client: int, clients: int = 4, batch: int = 32) -> SimpleNamespace:
    client = SimpleNamespace(num_images=images_per_client)
    return SimpleNamespace(
        clients=[client] * clients,
        config=SimpleNamespace(train=SimpleNamespace(server_batch_size=batch)),
    )


def test_the_step_budget_follows_the_data_and_the_clock():
    epochs = EPOCHS * 1600 // 32  # epochs of the server's releases: 4 clients of 400
    assert derive_steps(_run_of(400), seconds=0.01) == (
        epochs,
        f"{EPOCHS} epochs of 1600 releases at the server's batch 32",
    )
    steps, why = derive_steps(_run_of(400), seconds=1.0)  # 20,000 steps would take 5.6 hours
    assert steps == BUDGET_SECONDS and "fit in 20 minutes at 1.00 s a step" in why
    assert derive_steps(_run_of(5), seconds=0.01)[0] == MIN_STEPS


def test_the_clients_step_less_often_the_more_there_are():
    values = {"data": {}, "train": {"client_every": 1}}  # as current_names leaves new defaults
    notes = choose_clients(values, num_classes=10, fixed=set())
    assert values["data"] == {"num_clients": 5, "partition": "classes"}
    assert values["train"]["client_every"] == 10 and any("every 10 steps" in n for n in notes)
    mine = {"data": {}, "train": {"client_every": 2}}
    choose_clients(mine, num_classes=10, fixed={"train.client_every"})
    assert mine["train"]["client_every"] == 2  # the user's value stands


def test_degenerate_data_is_refused_before_any_work(tiny_vae_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LATENTFUSE_CACHE", str(tmp_path / "cache"))
    few = make_shapes(tmp_path / "few", classes=2, per_class=3, size=32)
    assert train(few, tmp_path / "run-few", tiny_vae_dir) == 2
    err = capsys.readouterr().err
    assert "too few training images" in err and "at least 8 a client" in err
    assert not (tmp_path / "run-few" / "checkpoint").exists()
    broken = make_shapes(tmp_path / "broken", classes=2, per_class=12, size=32)
    victim = sorted((broken / "circle").iterdir())[3]
    victim.write_bytes(victim.read_bytes()[:40])  # a truncated image
    assert train(broken, tmp_path / "run-broken", tiny_vae_dir) == 2
    err = capsys.readouterr().err
    assert "1 image(s) cannot be read" in err and victim.name in err
    assert not (tmp_path / "cache" / "latents").exists()  # refused before encoding anything


def test_no_held_out_image_is_warned(shapes, tiny_vae_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LATENTFUSE_CACHE", str(tmp_path / "cache"))
    assert train(shapes, tmp_path / "run", tiny_vae_dir, "data.eval_fraction=0.0") == 0
    assert "no image is held out" in capsys.readouterr().err


def test_resume_with_nothing_left_exports_at_once(
    shapes, tiny_vae_dir, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("LATENTFUSE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert train(shapes, out, tiny_vae_dir) == 0
    shutil.rmtree(out / "model")  # say a stop left none
    probed = []
    monkeypatch.setattr("latentfuse.training.plan.step_seconds", lambda run: probed.append(1))
    args = ["train", "--data", str(shapes), "--output-dir", str(out), "--resume"]
    assert latentfuse([*args, "--fit-vae", "never"]) == 0
    assert "2 of 2 steps are done: exporting the model" in capsys.readouterr().out
    assert (out / "model" / "collafuse.json").is_file() and not probed  # no re-timing
