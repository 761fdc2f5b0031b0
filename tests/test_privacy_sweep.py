"""The privacy sweep end to end on the tiny world: every point attacked, resumable, reported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments.privacy_report import plot_privacy, privacy_markdown
from experiments.privacy_sweep import (
    ATTACKS_VERSION,
    PrivacySweepSettings,
    reattack_releases,
    run_privacy_sweep,
)
from latentfuse.training.runner import train
from tests.worlds import tiny_config


@pytest.fixture(autouse=True)
def isolated(tiny_world: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LATENTFUSE_CACHE", str(tiny_world["cache"]))


SETTINGS = PrivacySweepSettings(
    cuts=(0, 100),
    epsilons=(0.01, 64.0),  # 0.01: no cut below T meets it, the point is ICM
    num_queries=8,
    gallery_size=4,
    num_members=6,
    num_model_members=4,
    num_reconstructions=3,
    num_mean_images=5,
)


def test_privacy_sweep_attacks_every_point_and_resumes(tiny_world, tmp_path):
    config = tiny_config(tiny_world, "data.eval_fraction=0.25")
    summary = run_privacy_sweep(config, tmp_path / "sweep", SETTINGS)
    rows = {row["name"]: row for row in summary["rows"]}
    assert set(rows) == {
        "cut-0000-base",
        "cut-0100-base",
        "cut-0100-epsilon-0.01",
        "cut-0100-epsilon-64",
    }
    icm = rows["cut-0100-epsilon-0.01"]
    assert icm["t_cut"] == 1000 and icm["epsilon"] == 0 and not icm["clients"]
    gm = rows["cut-0000-base"]  # clean latents: the likelihood attacker cannot miss
    assert gm["reid_gallery_all"]["rate"] == 1.0
    assert gm["epsilon"] is None and gm["epsilon_status"].startswith("not applicable")
    formal = rows["cut-0100-epsilon-64"]
    assert formal["t_cut"] > 100 and 0 < formal["epsilon"] <= 64
    for row in (gm, formal, rows["cut-0100-base"]):
        for client in row["clients"].values():
            assert {"reidentification", "release_membership", "model_membership"} <= set(client)
            assert client["reconstruction"]["mean_image_psnr"]["value"] > 0
    stamp = (tmp_path / "sweep" / "cut-0100-base" / "privacy.json").stat().st_mtime_ns
    again = run_privacy_sweep(config, tmp_path / "sweep", SETTINGS, resume=True)
    assert (tmp_path / "sweep" / "cut-0100-base" / "privacy.json").stat().st_mtime_ns == stamp
    assert again["rows"] == json.loads(json.dumps(summary["rows"]))
    report = privacy_markdown(summary, "python -m experiments.run_privacy_sweep ...")
    assert all(name in report for name in rows)
    assert plot_privacy(summary, tmp_path / "p.png").stat().st_size > 0
    with pytest.raises(FileExistsError, match="--resume"):
        run_privacy_sweep(config, tmp_path / "sweep", SETTINGS)

    # Re-running the release attackers alone: new keys, new figures, the model attacks kept.
    before = json.loads(json.dumps(summary))
    redone = reattack_releases(
        config, tmp_path / "reattack", SETTINGS, json.loads(json.dumps(summary))
    )
    key = "clients/client-0/release.key"
    assert (tmp_path / "reattack/cut-0100-base" / key).read_bytes() != (
        tmp_path / "sweep/cut-0100-base" / key
    ).read_bytes()
    for old, new in zip(before["rows"], redone["rows"], strict=True):
        assert new["release_attacks"]["version"] == ATTACKS_VERSION
        for cid, client in new["clients"].items():
            assert client["model_membership"] == old["clients"][cid]["model_membership"]
            assert client["release_membership"]["score"] in ("posterior", "distance")
    gm_again = redone["rows"][0]
    assert gm_again["name"] == "cut-0000-base" and gm_again["reid_gallery_all"]["rate"] == 1.0


def test_target_epsilon_raises_the_cut_and_is_recorded(tiny_world, tmp_path):
    config = tiny_config(tiny_world, "privacy.clip_norm=20", "privacy.target_epsilon=8")
    model = train(config, tmp_path / "run")
    described = json.loads((model / "collafuse.json").read_text())
    for cid, client in described["clients"].items():
        guarantee = described["privacy"]["clients"][cid]
        assert client["t_cut"] > 100 and guarantee["t_cut"] == client["t_cut"]
        assert 0 < guarantee["epsilon"] <= 8 and guarantee["clip_norm"] == 20
