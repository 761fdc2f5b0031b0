"""The collaboration benchmark end to end on the tiny world, and its statistics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from experiments.collaboration import (
    BenchmarkSettings,
    FeatureStats,
    ModelSpec,
    aggregate,
    benchmark_points,
    compare,
    fid_kid_standard_errors,
    judge,
    memorisation,
    run_benchmark,
    verdicts,
)
from experiments.collaboration_report import write_report
from tests.worlds import tiny_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def isolated(tiny_world: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LATENTFUSE_CACHE", str(tiny_world["cache"]))


def test_memorisation_flags_copies_only():
    """A copy of a training image (plus slight noise) is memorised; a new image is not."""
    g = torch.Generator().manual_seed(0)
    training = torch.randint(0, 256, (20, 3, 8, 8), generator=g, dtype=torch.uint8)
    copies = (training[:3].int() + torch.randint(-2, 3, (3, 3, 8, 8), generator=g)).clamp(0, 255)
    fresh = torch.randint(0, 256, (5, 3, 8, 8), generator=g, dtype=torch.uint8)
    result = memorisation(torch.cat([copies.to(torch.uint8), fresh]), training)
    assert result["rate"]["hits"] == 3 and result["rate"]["n"] == 8
    assert result["nearest"][:3].tolist() == [0, 1, 2]
    assert (result["ratio"][3:] > 1 / 3).all()
    with pytest.raises(ValueError, match=">= 2 training images"):
        memorisation(fresh, training[:1])


def test_standard_errors_shrink_with_more_generated_images():
    rng = np.random.default_rng(0)
    real = FeatureStats.from_features(rng.normal(size=(300, 16)).astype(np.float32))
    small = fid_kid_standard_errors(rng.normal(0.3, 1, (40, 16)), real, 30)
    large = fid_kid_standard_errors(rng.normal(0.3, 1, (400, 16)), real, 30)
    assert 0 < large["kid_se"] < small["kid_se"] and 0 < large["fid_se"] < small["fid_se"]


def test_claims_are_tested_on_the_pooled_seed_variance_and_judged_together():
    def group(mean: float, k: int = 2) -> dict:
        return {"mean": mean, "k": k, "s": 1.0, "df": 10, "seeds": list(range(k))}

    a, b = group(10.0), group(14.0)  # diff 4, SE 1 (s sqrt(1/2 + 1/2)): t = 4 on 10 df
    claims = judge([compare(a, b), compare(b, a), compare(a, group(10.5))])
    assert claims[0]["se"] == pytest.approx(1.0) and claims[0]["t"] == pytest.approx(4.0)
    assert [c["verdict"] for c in claims] == ["holds", "reversed", "not resolved"]
    p_two = [c["p_two_sided"] for c in claims]
    assert claims[2]["p_holm"] == pytest.approx(min(1, max(sorted(p_two)[1] * 2, p_two[2])))
    assert compare(a, group(20.0, k=1))["verdict"] == "1 seed: no verdict"


def test_aggregate_pools_the_seed_spread_over_the_groups():
    def rows(model: str, values: tuple) -> list[dict]:
        return [
            {"images_per_client": 5, "model": model, "t_cut": 9, "seed": s, "fid": v, "fid_se": 0.1}
            for s, v in enumerate(values)
        ]

    data = rows("ICM", (10.0, 14.0)) + rows("GM", (20.0, 21.0)) + rows("split-100", (30.0,))
    groups = aggregate(data, "fid")
    s = np.sqrt((np.var([10, 14], ddof=1) + np.var([20, 21], ddof=1)) / 2)
    assert groups[(5, "ICM")]["s"] == pytest.approx(s) and groups[(5, "ICM")]["df"] == 2
    assert groups[(5, "ICM")]["se"] == pytest.approx(s / np.sqrt(2))
    assert groups[(5, "split-100")]["se"] == pytest.approx(s)  # one seed: s / sqrt(1)
    assert groups[(5, "ICM")]["seed_sd"] == pytest.approx(np.std([10, 14], ddof=1))
    alone = aggregate(rows("ICM", (10.0,)), "fid")[(5, "ICM")]
    assert (alone["s"], alone["df"]) == (pytest.approx(0.1), 0)  # no spread: the bootstrap's


def test_ablations_are_judged_against_what_they_vary():
    """GM-matched against every split; -original and -buffer4 against their base model."""

    def row(model: str, seed: int, fid: float) -> dict:
        t_cut = 0 if model.startswith("GM") else 100
        return {"images_per_client": 250, "model": model, "t_cut": t_cut, "seed": seed,
                "fid": fid, "fid_se": 0.5, "kid": fid / 1000, "kid_se": 0.0005}  # fmt: skip

    rows = [row("split-100", s, 113.0 + s) for s in (0, 1)]
    rows += [row("GM-matched", 0, 105.0), row("split-100-original", 0, 113.5)]
    found = {v["claim"]: v["verdict"] for v in verdicts(rows)}
    assert found["GM-matched beats split-100 at 250 images (FID)"] == "1 seed: no verdict"
    original = "split-100 (exact objective, inverse_lambda weighting) beats split-100-original"
    assert found[f"{original} at 250 images (FID)"] == "1 seed: no verdict"
    assert not any("GM-matched beats GM" in claim for claim in found)


def test_settings_name_bad_input():
    with pytest.raises(ValueError, match="models is empty"):
        BenchmarkSettings()
    with pytest.raises(ValueError, match="unknown \\[benchmark\\] keys"):
        BenchmarkSettings.from_dict({"sedes": [0]})
    with pytest.raises(ValueError, match="unique"):
        BenchmarkSettings(models=(ModelSpec("GM", 0), ModelSpec("GM", 100)))


def test_the_shipped_config_holds_the_core_grid():
    from experiments.run_collaboration import load

    config, settings = load(ROOT / "configs/collaboration-cifar10-cpu.toml", [])
    names = {m.name for m in settings.models}
    assert {"GM", "split-100", "split-200", "ICM", "ICM-big"} <= names
    assert settings.images_per_client == (250, 2000) and len(settings.seeds) >= 2
    assert config.train.max_steps * config.train.client_batch_size / 250 >= 100  # epochs
    big = next(m for m in settings.models if m.name == "ICM-big")
    assert "client_unet.block_out_channels=[32,64,64]" in big.overrides
    assert list(config.server_unet.block_out_channels) == [32, 64, 64]
    points = benchmark_points(settings)
    assert points[0].images_per_client == 250 and len(points) == 2 * len(settings.seeds) * len(
        settings.models
    )


def test_committed_rows_keep_their_keys_under_the_current_code():
    """A committed row counts as finished on a fresh machine only while its key is what this
    code computes for its point: a renamed config key or a changed default would orphan it."""
    import json

    from experiments.collaboration import point_config, point_key
    from experiments.run_collaboration import load

    config, settings = load(ROOT / "configs/collaboration-cifar10-cpu.toml", [])
    rows = json.loads((ROOT / "results/collaboration.json").read_text())["rows"]
    points = {p.name: p for p in benchmark_points(settings)}
    keyed = [row for row in rows if "key" in row and row["name"] in points]
    assert len(keyed) >= 18  # the rows committed when this test was written
    for row in keyed:
        assert point_key(point_config(config, points[row["name"]]), settings) == row["key"], row[
            "name"
        ]


@pytest.mark.e2e
@pytest.mark.slow
def test_benchmark_end_to_end_and_resume(tiny_world, tmp_path):
    config = tiny_config(tiny_world, "data.eval_fraction=0.25")
    settings = BenchmarkSettings(
        images_per_client=(6,),
        models=(
            ModelSpec("GM", 0),
            ModelSpec("split-100", 100),
            ModelSpec("ICM", 1000),
            ModelSpec("compensated", 100, ('split.client_entry="compensated"',), True, True),
        ),
        seeds=(0,),
        num_samples=6,
        num_inference_steps=25,
        num_bootstrap=3,
        worst_cases=2,
    )
    out = tmp_path / "bench"
    rows = run_benchmark(config, out, settings)
    assert [r["model"] for r in rows] == ["GM", "split-100", "ICM", "compensated"]
    for row in rows:
        assert {"images_per_client", "model", "t_cut", "seed", "steps", "fid", "kid"} <= set(row)
        assert row["kid_se"] > 0 and 0 <= row["memorization"] <= 1
        assert set(row["clients"]) == {"0", "1"}
    by = {r["model"]: r for r in rows}
    assert (
        "server" in by["GM"]["sample_gradients"] and "client_0" not in by["GM"]["sample_gradients"]
    )
    assert set(by["ICM"]["sample_gradients"]) == {"client_0", "client_1"}
    assert by["split-100"]["privacy"]["reid_gallery_32"]["n"] > 0
    # the compensated arm starts its clients at 190 with DDIM-23: as many evaluations (25)
    assert (by["compensated"]["client_start"], by["split-100"]["client_start"]) == (190, None)
    assert [by[m]["network_evaluations"] for m in ("split-100", "compensated")] == [25, 25]
    assert by["compensated"]["num_inference_steps"] == 23 and by["compensated"]["release_t"] == 99
    # a rescore with another sampler keeps the grid's own scores and writes its own file
    import dataclasses

    from experiments.collaboration import _Shared, evaluate_point, point_config
    from latentfuse.evaluation.features import InceptionExtractor

    point = next(p for p in benchmark_points(settings) if p.model.name == "split-100")
    folder = out / point.name
    kept = (folder / "benchmark.json").read_text()
    ddpm = dataclasses.replace(settings, scheduler="ddpm", num_inference_steps=6, privacy=False)
    shared = _Shared(InceptionExtractor(None, "cpu"))
    cfg = point_config(config, point)
    rescored = evaluate_point(cfg, folder, ddpm, shared, cache="benchmark-ddpm6.json")
    assert rescored["network_evaluations"] == 6 and "privacy" not in rescored
    assert (folder / "benchmark.json").read_text() == kept
    # each client trained on 6 of its images, a seeded subset
    described = json.loads((out / rows[0]["name"] / "model" / "collafuse.json").read_text())
    assert all(c["num_train_images"] == 6 for c in described["clients"].values())
    stamp = (out / rows[1]["name"] / "benchmark.json").stat().st_mtime_ns
    again = run_benchmark(config, out, settings, resume=True)
    assert (out / rows[1]["name"] / "benchmark.json").stat().st_mtime_ns == stamp
    assert again == rows
    with pytest.raises(FileExistsError, match="--resume"):
        run_benchmark(config, out, settings)
    meta = {"command": "python -m experiments.run_collaboration ...", "config": "x"}
    summary = write_report(tmp_path / "report", config, settings, rows, meta, out)
    assert summary["verdicts"] and (tmp_path / "report.png").stat().st_size > 0
    assert (tmp_path / "report-worst-cases.png").is_file()
    assert len(list((tmp_path / "report-worst-cases").glob("*.png"))) == 4
    # A fresh machine with the committed rows retrains nothing; a changed config does.
    known = {r["name"]: r for r in json.loads((tmp_path / "report.json").read_text())["rows"]}
    assert run_benchmark(config, tmp_path / "fresh", settings, known=known) == rows
    assert not (tmp_path / "fresh").exists() or not any((tmp_path / "fresh").iterdir())
    from experiments.collaboration import point_config, point_key

    point = benchmark_points(settings)[0]
    changed = tiny_config(tiny_world, "data.eval_fraction=0.25", "train.learning_rate=1e-3")
    assert point_key(point_config(changed, point), settings) != known[point.name]["key"]
    text = (tmp_path / "report.md").read_text()
    assert "split-100 beats ICM at 6 images (FID)" in text and "Produced by" in text


def test_core_models_run_before_the_others():
    settings = BenchmarkSettings(
        images_per_client=(250, 2000),
        models=(ModelSpec("GM", 0), ModelSpec("buffer", 100, core=False), ModelSpec("ICM", 1000)),
        seeds=(0, 1),
    )
    names = [(p.model.name, p.images_per_client, p.seed) for p in benchmark_points(settings)]
    assert names[:8] == [(m, n, s) for n in (250, 2000) for s in (0, 1) for m in ("GM", "ICM")]
    assert {m for m, _, _ in names[8:]} == {"buffer"}


@pytest.mark.parametrize(
    ("entry", "steps", "evaluations"),
    [
        ({"t_cut": 100}, 25, 25),  # the hand-off: 22 server steps, then 80, 40, 0
        # DDIM-25 restarted at 160 would run 27; DDIM-23 (stride 43) runs 20 server steps and
        # 172, 129, 86, 43, 0: 25
        ({"t_cut": 100, "client_start": 190}, 23, 25),
    ],
)
def test_compensated_arms_sample_with_as_many_network_evaluations(entry, steps, evaluations):
    from types import SimpleNamespace

    from diffusers import DDIMScheduler

    from experiments.collaboration import chain_evaluations, matched_inference_steps

    pipe = SimpleNamespace(
        scheduler=DDIMScheduler(num_train_timesteps=1000),
        collafuse_config={"clients": {"0": entry, "1": entry}},
        client_ids=[0, 1],
    )
    assert matched_inference_steps(pipe, 25) == steps
    assert chain_evaluations(pipe, steps) == evaluations
    assert chain_evaluations(pipe, 25) == (25 if "client_start" not in entry else 27)


def test_costs_count_parameters_trainable_ones_and_client_flops(tiny_world, tmp_path):
    from experiments.collaboration import denoiser_costs
    from latentfuse.data.autoencoder import latent_geometry, load_vae
    from tests.test_pretrained import save_base

    full = denoiser_costs(tiny_config(tiny_world))
    assert set(full) == {"client", "server"}
    assert full["client"]["trainable"] == full["client"]["parameters"] > 0
    assert full["client"]["train_flops_per_step"] > 0
    channels = latent_geometry(load_vae(str(tiny_world["vae"])).config)[0]
    save_base(tmp_path / "base", channels, 4, names=None)
    lora = [f'client_unet.pretrained="{tmp_path / "base"}"', 'client_unet.adapter="lora"']
    costs = denoiser_costs(tiny_config(tiny_world, *lora))
    assert 0 < costs["client"]["trainable"] < costs["client"]["parameters"]
    icm = denoiser_costs(tiny_config(tiny_world, "split.t_cut=1000"))
    assert set(icm) == {"client"}  # nothing for a server to do


def test_a_models_filter_trains_only_those_points_first(tiny_world, tmp_path, monkeypatch):
    import experiments.collaboration as collaboration

    settings = BenchmarkSettings(
        images_per_client=(6,),
        models=(ModelSpec("GM", 0), ModelSpec("ICM", 1000)),
        seeds=(0, 1),
        num_samples=6,
    )
    config = tiny_config(tiny_world)
    with pytest.raises(ValueError, match="no model named"):
        run_benchmark(config, tmp_path / "a", settings, models=["split-700"])
    trained = []

    class Stop(Exception):
        pass

    def record(cfg, folder):
        trained.append(folder.name)
        if len(trained) == 2:
            raise Stop
        return None, 0.0

    monkeypatch.setattr(collaboration, "train_point", record)
    monkeypatch.setattr(collaboration, "evaluate_point", lambda *a, **k: None)
    monkeypatch.setattr(collaboration, "point_row", lambda *a, **k: {})
    with pytest.raises(Stop):
        run_benchmark(config, tmp_path / "b", settings, models=["ICM"])
    assert trained == ["n0006-ICM-t1000-seed0", "n0006-ICM-t1000-seed1"]
