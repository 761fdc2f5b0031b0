"""The privacy-utility frontier report: Holm, pooled seed variance, verdicts, headline, writer."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
from scipy import stats

from experiments.frontier_report import (
    frontier_verdicts,
    headline,
    holm,
    pooled_groups,
    write_frontier_report,
)

CHANCE = 1 / 32
SEED_OFFSETS = (-1.0, 0.0, 1.0)  # three seeds with sample sd exactly 1


def released(rate: float = 1.0, n: int = 200, tpr_001: bool = False) -> dict:
    """A privacy dict in the benchmark's format, for a point that releases latents."""
    hits = round(rate * n)
    gallery = {"rate": hits / n, "ci": [0.0, 1.0], "chance": CHANCE, "hits": hits, "n": n}
    privacy = {
        "reid_gallery_32": gallery,
        "reid_gallery_all": {**gallery, "chance": 0.004},
        "release_membership_auc": {"mean": 0.9, "min": 0.8, "max": 1.0, "chance": 0.5},
        "release_membership_tpr@0.01": {"mean": 0.4, "min": 0.3, "max": 0.5, "chance": 0.01},
        "model_membership_auc": {"mean": 0.52, "min": 0.5, "max": 0.54, "chance": 0.5},
        "model_membership_tpr@0.01": {"mean": 0.02, "min": 0.0, "max": 0.04, "chance": 0.01},
        "reconstruction_psnr": {"mean": 25.0, "min": 24.0, "max": 26.0},
        "reconstruction_mean_image_psnr": {"mean": 13.0, "min": 12.0, "max": 14.0},
        "epsilon": None,
    }
    if tpr_001:
        privacy["release_membership_tpr@0.001"] = {"mean": 0.123, "min": 0.1, "max": 0.2}
    return privacy


def row(model: str, size: int, seed: int, fid: float, t_cut: int, **extra) -> dict:
    """One benchmark row; `extra` overrides or adds fields (privacy, release_t, gaussian_dp)."""
    privacy = None if t_cut >= 1000 else released()
    base = {
        "name": f"n{size:04d}-{model}-t{t_cut:04d}-seed{seed}",
        "model": model,
        "images_per_client": size,
        "t_cut": t_cut,
        "seed": seed,
        "fid": fid,
        "fid_se": 1.0,
        "kid": fid / 1000,
        "kid_se": 0.001,
        "clients": {"0": {"fid": fid + 5, "kid": fid / 900}},
        "privacy": privacy,
    }
    return {**base, **extra}


def seeds(model: str, mean: float, t_cut: int, size: int = 250, **extra) -> list[dict]:
    """Three seeds of one point, their FIDs mean +- 1 (sample sd 1)."""
    return [row(model, size, i, mean + off, t_cut, **extra) for i, off in enumerate(SEED_OFFSETS)]


@pytest.mark.parametrize(
    ("pvalues", "expected"),
    [
        ([0.01, 0.04, 0.03], [0.03, 0.06, 0.06]),
        ([0.5], [0.5]),
        ([0.02, 0.5, 0.01, 0.3], [0.06, 0.6, 0.04, 0.6]),
        ([0.4, 0.4], [0.8, 0.8]),
        ([0.6, 0.7], [1.0, 1.0]),
        ([], []),
    ],
)
def test_holm_matches_hand_worked_examples(pvalues: list[float], expected: list[float]) -> None:
    assert holm(pvalues) == pytest.approx(expected)


@pytest.mark.parametrize("metric", ["fid", "kid"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pooled_sd_and_df_match_numpy(metric: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    sizes = {"GM": 3, "split-100": 2, "ICM": 4, "ablation": 1}
    rows, values = [], {}
    for model, k in sizes.items():
        values[model] = rng.normal(100, 3, size=k)
        for i, value in enumerate(values[model]):
            rows.append({**row(model, 250, i, 0.0, 100), metric: float(value)})
    groups = pooled_groups(rows, metric)
    residuals = np.concatenate([v - v.mean() for v in values.values() if len(v) >= 2])
    df = sum(len(v) - 1 for v in values.values() if len(v) >= 2)
    s = math.sqrt(float(np.sum(residuals**2)) / df)
    assert df == 6
    for model, v in values.items():
        group = groups[(250, model)]
        assert group["k"] == len(v)
        assert group["mean"] == pytest.approx(v.mean())
        assert group["se"] == pytest.approx(s / math.sqrt(len(v)))
        own = None if len(v) < 2 else pytest.approx(float(np.std(v, ddof=1)))
        assert group["sd"] == own


@pytest.mark.parametrize(
    ("gap", "verdict"),
    [(10.0, "holds"), (0.5, "not resolved"), (-10.0, "reversed")],
)
def test_verdict_follows_the_true_gap(gap: float, verdict: str) -> None:
    rows = seeds("ICM", 130.0, 1000) + seeds("split-100", 130.0 - gap, 100)
    (claim,) = frontier_verdicts(rows)
    se = math.sqrt(2 / 3)  # s = 1 pooled over two groups of 3 seeds
    t = gap / se
    p = stats.t.sf(t, 4)
    assert (claim["a"], claim["b"]) == ("split-100", "ICM")
    assert claim["difference"] == pytest.approx(gap)
    assert claim["se"] == pytest.approx(se)
    assert claim["t"] == pytest.approx(t)
    assert claim["df"] == 4
    assert claim["p"] == pytest.approx(p)
    assert claim["p_holm"] == pytest.approx(2 * min(p, 1 - p))  # a family of one
    assert claim["verdict"] == verdict


def test_one_seed_group_gets_no_verdict_and_stays_out_of_the_family() -> None:
    single = row("split-200", 250, 0, 100.0, 200)
    rows = seeds("ICM", 130.0, 1000) + seeds("split-100", 120.0, 100) + [single]
    verdicts = {v["a"]: v for v in frontier_verdicts(rows)}
    assert verdicts["split-200"]["verdict"] == "1 seed: no verdict"
    assert verdicts["split-200"]["p_holm"] is None
    tested = verdicts["split-100"]
    assert tested["p_holm"] == pytest.approx(tested["p_two_sided"])  # m = 1, not 2


@pytest.mark.parametrize("exact_cut", [True, False])
def test_family_pairs_the_objective_arms(exact_cut: bool) -> None:
    arms = ["exact-compensated", "original-cut"] + (["exact-cut"] if exact_cut else [])
    rows = seeds("ICM", 130.0, 1000) + seeds("GM", 120.0, 0) + seeds("split-100", 110.0, 100)
    for model in arms:
        rows += seeds(model, 115.0, 100)
    claims = {(v["a"], v["b"]) for v in frontier_verdicts(rows)}
    cut = "exact-cut" if exact_cut else "split-100"
    splits = {"split-100", *arms}
    expected = {(m, "ICM") for m in splits | {"GM"}} | {("GM", m) for m in splits}
    expected |= {(cut, "exact-compensated"), (cut, "original-cut")}
    expected |= {("exact-compensated", "original-cut")}
    assert claims == expected


@pytest.mark.parametrize(
    ("gdp", "mu_text"),
    [(None, "no mu: latents not clipped"), ({"mu": 0.5, "membership_auc_bound": 0.64}, "mu = 0.5")],
)
def test_headline_names_the_largest_release_level_that_holds(
    gdp: dict | None, mu_text: str
) -> None:
    private = released(rate=0.05)  # 0.05 <= 2 / 32
    rows = (
        seeds("ICM", 130.0, 1000)
        + seeds("split-100", 110.0, 100)
        + seeds("formal-e10", 115.0, 100, release_t=400, privacy=private, gaussian_dp=gdp)
        + seeds("split-600", 129.8, 600)  # more private, but not better than ICM
    )
    verdicts = frontier_verdicts(rows)
    assert {v["a"]: v["verdict"] for v in verdicts}["split-600"] == "not resolved"
    text = headline(rows, verdicts)
    assert "formal-e10" in text and "release level 400" in text
    assert "split-600" not in text
    assert "5.0%" in text and mu_text in text
    assert "within 2x chance while beating ICM: formal-e10" in text


def test_headline_says_when_nothing_beats_icm() -> None:
    rows = seeds("ICM", 110.0, 1000) + seeds("split-100", 130.0, 100)
    text = headline(rows, frontier_verdicts(rows))
    assert text.startswith("No point beats ICM")


@pytest.mark.parametrize("icm_privacy", [None, {"epsilon": 0.0, "epsilon_status": "t_cut = T"}])
def test_writer_produces_three_files_that_round_trip(tmp_path, icm_privacy: dict | None) -> None:
    rows = (
        seeds("ICM", 130.0, 1000, privacy=icm_privacy)
        + seeds("split-100", 110.0, 100)
        + seeds("split-200", 112.0, 200, privacy=released(tpr_001=True))
        + [row("GM", 250, 0, 120.0, 0)]
    )
    before = copy.deepcopy(rows)
    meta = {"commands": ["python scripts/benchmark_frontier.py --report results/frontier"]}
    summary = write_frontier_report(tmp_path / "frontier", rows, meta)
    paths = [tmp_path / f"frontier.{ext}" for ext in ("json", "md", "png")]
    assert all(p.is_file() for p in paths)
    loaded = json.loads(paths[0].read_text())
    assert loaded == json.loads(json.dumps(summary))
    assert set(loaded) == {
        "format",
        "family",
        "rows",
        "groups",
        "pooled",
        "verdicts",
        "headline",
        "meta",
    }
    assert loaded["rows"] == before and rows == before
    assert loaded["pooled"]["fid"] == pytest.approx({"s": 1.0, "df": 6})
    markdown = paths[1].read_text()
    assert markdown.splitlines()[2] == summary["headline"]
    assert "| 250 | ICM | 999 |" in markdown and "nothing released" in markdown
    assert "not measured" in markdown and "0.123" in markdown  # TPR@0.1% absent / present
    assert "1 seed: no verdict" in markdown and meta["commands"][0] in markdown
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_pretrained_family_asks_the_pretrained_questions(tmp_path) -> None:
    from experiments.frontier_report import write_frontier_report

    rows = []
    for model, mean, cut in [
        ("ICM", 130.0, 1000),
        ("split-100", 115.0, 100),
        ("ICM-base", 110.0, 1000),
        ("split-100-base", 90.0, 100),
        ("GM-base", 95.0, 0),
        ("split-100-lora", 100.0, 100),
        ("split-100-shift-scratch", 120.0, 100),
        ("ICM-shift-scratch", 125.0, 1000),
        ("split-100-shift", 112.0, 100),
        ("ICM-shift", 122.0, 1000),
    ]:
        rows += seeds(model, mean, cut)
    verdicts = frontier_verdicts(rows, family="pretrained")
    claims = {(v["a"], v["b"]) for v in verdicts}
    assert claims == {
        ("split-100-base", "split-100"),  # does the base improve the model
        ("split-100-lora", "split-100"),
        ("ICM-base", "ICM"),
        ("split-100-base", "ICM-base"),  # does collaboration beat the lone fine-tuner
        ("GM-base", "ICM-base"),
        ("split-100-shift", "split-100-shift-scratch"),  # under shift
        ("ICM-shift", "ICM-shift-scratch"),
        ("split-100-shift", "ICM-shift"),
        ("split-100-shift-scratch", "ICM-shift-scratch"),
    }
    by_claim = {(v["a"], v["b"]): v["verdict"] for v in verdicts}
    assert by_claim[("split-100-base", "ICM-base")] == "holds"  # 20 FID, seed sd 1
    assert by_claim[("ICM-shift", "ICM-shift-scratch")] == "holds"
    summary = write_frontier_report(tmp_path / "pretrained", rows, {}, "pretrained")
    assert "split-100-base vs ICM-base: holds" in summary["headline"]
    text = (tmp_path / "pretrained.md").read_text()
    assert text.startswith("# From scratch or from a public base")
