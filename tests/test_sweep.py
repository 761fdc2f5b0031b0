"""The cut-point sweep end to end on the tiny world (GM, split and ICM, the two ablations at one
cut), its report files, and a resume that trains and evaluates nothing again."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from experiments.sweep import SweepSettings, point_config, sweep_points
from tests.worlds import tiny_config

REPO = Path(__file__).resolve().parent.parent
CUTS = (0, 100, 1000)


pytestmark = pytest.mark.slow  # the sweep fixture trains every point of a tiny sweep


def load_script():
    """experiments/run_sweep.py as a module."""
    return importlib.import_module("experiments.run_sweep")


def as_overrides(values: dict, prefix: str = "") -> list[str]:
    """`key=value` overrides that rebuild a config dict (JSON scalars and lists are TOML)."""
    out = []
    for key, value in values.items():
        if isinstance(value, dict):
            out += as_overrides(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}={json.dumps(value)}")
    return out


def strict_json(path: Path) -> dict:
    """Parse JSON that must hold no NaN or Infinity."""
    return json.loads(path.read_text(), parse_constant=lambda name: pytest.fail(f"{name} in JSON"))


@pytest.fixture(autouse=True)
def isolated(tiny_world: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LATENTFUSE_CACHE", str(tiny_world["cache"]))


@pytest.fixture(scope="module")
def sweep_args(tiny_world: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> list:
    """The command line of a tiny sweep: 3 cuts, 2 steps, 4 samples and 3 releases per client."""
    out_dir = tmp_path_factory.mktemp("sweep") / "tiny-sweep"
    config = tiny_config(
        tiny_world, "train.num_preview_images=1", "train.preview_inference_steps=2"
    )
    return [
        *("--out-dir", str(out_dir), "--cuts", ",".join(map(str, CUTS)), "--ablation-cuts", "100"),
        *("--num-samples", "4", "--num-releases", "3"),
        *("--num-inference-steps", "2", "--attack-steps", "2"),
        *("--max-steps", "2", "--batch-size", "8", "--device", "cpu"),
        *as_overrides(config.to_dict()),
    ]


@pytest.fixture(scope="module")
def swept(sweep_args: list, tiny_world: dict[str, Path]) -> dict:
    """Run the sweep once; its JSON report."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LATENTFUSE_CACHE", str(tiny_world["cache"]))
        assert load_script().main(sweep_args) == 0
    out_dir = Path(sweep_args[1])
    return strict_json(out_dir.with_name(f"{out_dir.name}.json"))


def finite(value) -> bool:
    return value is not None and math.isfinite(value)


def test_rows_mark_gm_and_icm_and_carry_the_figures(swept):
    rows = swept["rows"]
    assert [r["t_cut"] for r in rows] == list(CUTS)
    assert [r["model"] for r in rows] == ["GM", "split", "ICM"]
    assert swept["num_samples"] == 4 and swept["num_generated_pooled"] == 8
    for row in rows:
        assert finite(row["fid"]) and finite(row["kid"]) and row["fid"] > 0
        assert row["num_samples"] == 4 and row["steps"] == 2 and row["wall_seconds"] > 0
        assert 0 < row["client_flop_share"] <= 1
        assert set(row["clients"]) == {"0", "1"}
    for row in rows[:2]:  # GM and split release latents: every disclosure figure exists
        assert all(finite(row[k]) for k in ("release_fid", "attack_psnr", "attack_ssim"))
        assert 0 <= row["reid_rate"] <= 1 and row["num_releases"] == 6  # 3 per client
        assert row["reid_chance"] == pytest.approx(1 / 3)  # the gallery: the attacked images
        assert row["num_generated_pooled"] == 8  # --num-releases leaves the samples alone
    gm, split, icm = rows
    # No clipping was enforced: no formal bound is claimed; ICM releases nothing.
    for row in (gm, split):
        assert row["epsilon"] is None and "not applicable" in row["epsilon_status"]
    assert icm["epsilon"] == 0 and icm["release_fid"] is None and icm["reid_rate"] is None
    assert gm["client_flop_share"] < split["client_flop_share"] < icm["client_flop_share"] == 1
    assert gm["client_train_flop_share"] == 0 and icm["client_train_flop_share"] == 1
    assert 0 < split["client_train_flop_share"] < 1 and 0 < split["client_seconds_share"] < 1
    assert icm["server_sampling_gflops"] == 0 and icm["client_seconds_share"] == 1
    latent = gm["upload_bytes_per_release"]  # a clean fp32 latent: 4 bytes a value
    assert latent > 0 and latent % 4 == 0 and split["upload_bytes_per_release"] == latent
    assert icm["upload_bytes_per_release"] == 0 and icm["download_bytes_per_sample"] == 0
    assert split["download_bytes_per_sample"] == latent
    for row in rows:  # the full per-client burden travels with the row
        burden = row["clients"]["0"]["burden"]
        assert burden["t_cut"] == row["t_cut"] and burden["num_inference_steps"] == 50
        assert burden["sampling"]["client_share"] == row["clients"]["0"]["client_flop_share"]
    assert swept["privacy"]["clip_norm"] is None and swept["attacker"]["t_cut"] == 0


def test_ablations_compare_objective_and_release_policy(swept):
    rows = swept["ablations"]
    assert [(r["t_cut"], r["variant"]) for r in rows] == [
        (100, "base"),
        (100, "objective-original"),
        (100, "release-fresh"),
    ]
    base, original, fresh = rows
    assert (original["objective"], fresh["release_policy"]) == ("original", "fresh")
    assert base == next(r for r in swept["rows"] if r["t_cut"] == 100)
    assert fresh["releases_per_image"] >= 1
    assert fresh["epsilon"] is None and base["epsilon"] is None  # nothing clipped
    assert all(finite(r["fid"]) and finite(r["attack_psnr"]) for r in rows)


def test_report_files_are_written(swept, sweep_args):
    out_dir = Path(sweep_args[1])
    table = out_dir.with_name(f"{out_dir.name}.md").read_text()
    assert "| 0 | GM |" in table and "| 1000 | ICM |" in table and "## Ablations" in table
    assert "## Client burden" in table
    assert "n/a" in table and "notes" in json.dumps(swept)  # no clipping: no bound claimed
    png = out_dir.with_name(f"{out_dir.name}.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    for point in ("cut-0000-base", "cut-0100-release-fresh", "cut-1000-base"):
        assert (out_dir / point / "checkpoint" / "state.json").is_file()
        assert strict_json(out_dir / point / "evaluation.json")["row"]["folder"] == point
        assert strict_json(out_dir / point / "burden.json")["0"]["t_cut"] == int(point[4:8])
    assert not list(out_dir.parent.glob(".*tmp*")), "no temporary file is left behind"


@pytest.mark.e2e
def test_resume_skips_finished_points(swept, sweep_args, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise AssertionError("a finished point was trained or evaluated again")

    monkeypatch.setattr("experiments.sweep.train", refuse)
    monkeypatch.setattr("experiments.sweep.evaluate_model", refuse)
    monkeypatch.setattr("experiments.sweep.client_burden", refuse)
    out_dir = Path(sweep_args[1])
    evaluations = sorted(out_dir.glob("*/evaluation.json"))
    assert len(evaluations) == 5
    before = {p: p.stat().st_mtime_ns for p in evaluations}
    assert load_script().main([*sweep_args, "--resume"]) == 0
    assert {p: p.stat().st_mtime_ns for p in evaluations} == before
    again = strict_json(out_dir.with_name(f"{out_dir.name}.json"))
    assert again["rows"] == swept["rows"] and again["ablations"] == swept["ablations"]
    assert "| 100 | split |" in capsys.readouterr().out


def test_a_second_sweep_into_the_same_folder_needs_resume(swept, sweep_args, capsys):
    assert load_script().main(sweep_args) == 2
    assert "--resume" in capsys.readouterr().err


def test_points_train_the_attacker_first(tiny_world):
    config = tiny_config(tiny_world)
    points = sweep_points(config, SweepSettings(cuts=(100, 1000), ablation_cuts=(500,)))
    assert [(p.t_cut, p.variant) for p in points] == [
        (0, "base"),
        (100, "base"),
        (500, "base"),
        (1000, "base"),
        (500, "objective-original"),
        (500, "release-fresh"),
    ]
    fresh = point_config(config, points[-1])
    assert (fresh.split.t_cut, fresh.split.release_policy) == (500, "fresh")
    assert fresh.train == config.train and fresh.data == config.data  # same budget and data


def test_ablations_choose_which_variants_run(tiny_world):
    config = tiny_config(tiny_world)
    settings = SweepSettings(cuts=(100,), ablation_cuts=(100,), ablations=("release",))
    points = sweep_points(config, settings)
    assert [(p.t_cut, p.variant) for p in points] == [
        (0, "base"),
        (100, "base"),
        (100, "release-fresh"),
    ]


def test_the_report_says_when_fresh_never_released_twice(swept):
    from experiments.sweep_report import notes

    fresh = next(r for r in swept["ablations"] if r["release_policy"] == "fresh")
    once_only = {**swept, "ablations": [{**fresh, "releases_per_image": 1}]}
    assert any("released each image once" in n for n in notes(once_only))
    twice = {**swept, "ablations": [{**fresh, "releases_per_image": 2}]}
    assert not any("released each image once" in n for n in notes(twice))


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"ablations": ("objective", "sampler")}, "ablations"),
        ({"ablations": ()}, "ablations"),
        ({"cuts": (0, 1001)}, "cuts"),
        ({"ablation_cuts": (1000,)}, "ablation_cuts"),
    ],
)
def test_cuts_outside_the_schedule_are_named(tiny_world, settings, match):
    with pytest.raises(ValueError, match=match):
        sweep_points(tiny_config(tiny_world), SweepSettings(**settings))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("cuts", (0, 0)),
        ("num_samples", 1),
        ("num_releases", 1),
        ("attack_steps", 0),
    ],
)
def test_bad_settings_are_named(field, value):
    with pytest.raises(ValueError, match=field):
        SweepSettings(**{field: value})


@pytest.mark.e2e
def test_a_point_evaluated_before_burden_json_gains_it(swept, sweep_args, monkeypatch):
    """An evaluation.json written before burden.json existed is kept (no re-evaluation) and
    the point's burden is measured and added to its row."""

    def refuse(*args, **kwargs):
        raise AssertionError("a finished point was evaluated again")

    monkeypatch.setattr("experiments.sweep.evaluate_model", refuse)
    out_dir = Path(sweep_args[1])
    (out_dir / "cut-0100-base" / "burden.json").unlink()
    assert load_script().main([*sweep_args, "--resume"]) == 0
    again = strict_json(out_dir.with_name(f"{out_dir.name}.json"))
    assert (out_dir / "cut-0100-base" / "burden.json").is_file()
    row = next(r for r in again["rows"] if r["t_cut"] == 100)
    assert (
        0 < row["client_flop_share"] < 1
        and row["fid"] == next(r for r in swept["rows"] if r["t_cut"] == 100)["fid"]
    )


def test_the_report_names_the_config_overrides(swept):
    from experiments.sweep_report import notes

    assert any(
        "data.max_images_per_client=10" in n
        for n in notes({**swept, "overrides": ["data.max_images_per_client=10"]})
    )
    assert not any("overrides" in n for n in notes({**swept, "overrides": []}))


@pytest.mark.e2e
def test_choosing_fewer_ablations_on_resume_evaluates_nothing_again(swept, sweep_args, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a finished point was evaluated again")

    monkeypatch.setattr("experiments.sweep.evaluate_model", refuse)
    assert load_script().main([*sweep_args, "--resume", "--ablations", "release"]) == 0
    out_dir = Path(sweep_args[1])
    again = strict_json(out_dir.with_name(f"{out_dir.name}.json"))
    assert [r["variant"] for r in again["ablations"]] == ["base", "release-fresh"]


def test_same_config_reads_old_runs_through_current_defaults():
    from experiments.sweep import same_config
    from latentfuse.config import load_config

    config = load_config(None, ["split.t_cut=200"])
    saved = config.to_dict()
    del saved["split"]["max_target_variance"]  # a field added after the run was trained
    assert same_config(saved, config)
    saved["split"]["t_cut"] = 100
    assert not same_config(saved, config)
    assert not same_config({"split": {"no_such_field": 1}}, config)
