"""The figures the README and docs/results.md quote are the committed result files' figures.

Each table row that quotes the collaboration benchmark is parsed and compared, at the
printed precision, with `results/collaboration.json`'s aggregates: a rerun that changes a
figure, or an edit that mistypes one, fails here."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
AGGREGATES = json.loads((ROOT / "results/collaboration.json").read_text())["aggregates"]
NUMBER = r"(\d+\.\d+) ± (\d+\.\d+)"


def quoted(value: str, precise: float) -> bool:
    """Whether `value` (as printed) is `precise` rounded to the printed decimals."""
    decimals = len(value.split(".")[1])
    return f"{precise:.{decimals}f}" == value


def results_rows() -> list[tuple[str, int, str, str, str, str]]:
    """(model, size, fid, fid_se, kid, kid_se) from docs/results.md's FID (KID) table."""
    rows = []
    for line in (ROOT / "docs/results.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not re.match(NUMBER, cells[1]):
            continue
        model = cells[0].split(" (")[0]
        for size, cell in zip((250, 2000), cells[1:], strict=True):
            m = re.fullmatch(NUMBER + r" \(" + NUMBER + r"\)", cell)
            if m:
                rows.append((model, size, *m.groups()))
    return rows


ROWS = results_rows()


def test_the_results_table_was_found():
    assert {(m, n) for m, n, *_ in ROWS} >= {("GM", 250), ("split-100", 2000), ("ICM", 250)}


@pytest.mark.parametrize(("model", "size", "fid", "fid_se", "kid", "kid_se"), ROWS)
def test_the_results_page_quotes_the_committed_aggregates(model, size, fid, fid_se, kid, kid_se):
    key = f"{size}/{model}"
    assert quoted(fid, AGGREGATES["fid"][key]["mean"]) and quoted(
        fid_se, AGGREGATES["fid"][key]["se"]
    )
    assert quoted(kid, AGGREGATES["kid"][key]["mean"]) and quoted(
        kid_se, AGGREGATES["kid"][key]["se"]
    )


README_MODELS = {"GM": "GM", "split, `t_cut` 100": "split-100", "split, `t_cut` 200": "split-200"}
README_MODELS["ICM"] = "ICM"


def readme_rows() -> list[tuple[str, str, str]]:
    rows = []
    for line in (ROOT / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and re.fullmatch(NUMBER, cells[1]):
            label = cells[0].split(" (")[0]
            rows.append((README_MODELS[label], *re.fullmatch(NUMBER, cells[1]).groups()))
    return rows


def test_the_readme_quotes_the_committed_aggregates():
    rows = readme_rows()
    assert [r[0] for r in rows] == ["GM", "split-100", "split-200", "ICM"]
    for model, fid, se in rows:
        aggregate = AGGREGATES["fid"][f"250/{model}"]
        assert quoted(fid, aggregate["mean"]) and quoted(se, aggregate["se"]), model


def test_the_lora_table_quotes_the_committed_sizes():
    """docs/pretrained.md's LoRA table against results/lora-sizes.json."""
    rows = json.loads((ROOT / "results/lora-sizes.json").read_text())["rows"]
    text = (ROOT / "docs/pretrained.md").read_text()
    for row in rows:
        share = f"{100 * row['share']:.1f}%"
        cells = [str(row["rank"]), f"{row['trainable']:,}", share]
        line = next(x for x in text.splitlines() if x.startswith(f"| {row['rank']} |"))
        assert [c.strip() for c in line.strip("|").split("|")][:3] == cells, line
        assert f"{row['base_bytes'] / 1e6:.2f} MB" in line


@pytest.mark.parametrize(
    ("source", "model", "quoted"),
    [
        ("frontier", "split-700", "FID 112.9"),
        ("frontier", "formal-e10-p99", "scores 116.8"),
        ("frontier", "split-500", "(114.6)"),
        ("pretrained", "GM-base", "FID 91.8"),
    ],
)
def test_the_results_page_quotes_the_one_seed_points_as_committed(source, model, quoted):
    """The frontier's and the pretrained grid's first points, quoted in docs/results.md,
    against their committed rows (seed 0)."""
    rows = json.loads((ROOT / f"results/{source}.json").read_text())["rows"]
    (row,) = [r for r in rows if r["model"] == model and r["images_per_client"] == 250]
    value = quoted.split()[-1].strip("()")
    assert f"{row['fid']:.1f}" == value and row["seed"] == 0
    assert quoted in (ROOT / "docs/results.md").read_text()


def deployment_row(prefix: str) -> list[str]:
    """The cells of the docs/deployment.md table row that starts with `prefix`."""
    for line in (ROOT / "docs/deployment.md").read_text().splitlines():
        if line.strip().startswith(f"| {prefix}"):
            return [c.strip() for c in line.strip().strip("|").split("|")]
    raise AssertionError(f"no row {prefix!r} in docs/deployment.md")


@pytest.mark.parametrize(
    ("arm", "prefix"),
    [
        ("honest, balance releases", 'honest, balance "releases" |'),
        ("honest, balance clients", 'honest, balance "clients" |'),
        ("honest, balance clients + clip", 'honest, "clients" + clip 1 |'),
        ("poisoned, balance releases", 'poisoned, balance "releases" |'),
        ("poisoned, balance clients", 'poisoned, balance "clients" (the default) |'),
        ("poisoned, balance clients + clip", 'poisoned, "clients" + clip 1 |'),
    ],
)
def test_the_poisoning_table_quotes_the_committed_bench(arm, prefix):
    rows = json.loads((ROOT / "results/poisoning.json").read_text())["rows"]
    row = next(r for r in rows if r["arm"] == arm)
    cells = deployment_row(prefix)
    assert quoted(cells[1], row["heldout_mse"]) and quoted(cells[2], row["handoff_fid"])
    assert quoted(cells[3], row["handoff_kid"])


@pytest.mark.parametrize(
    ("run", "probe", "prefix"),
    [
        ("flood", "status", "status, client 0 floods"),
        ("flood", "upload", "upload, the same | 19"),
        ("flood", "sample", "1-image 10-step sample, the same | 275"),
        ("heavy", "status", "status, clients 0 and 1"),
        ("heavy", "upload", "upload, the same | 13"),
        ("heavy", "sample", "1-image 10-step sample, the same | 155"),
    ],
)
def test_the_fairness_table_quotes_the_committed_bench(run, probe, prefix):
    runs = json.loads((ROOT / "results/fairness.json").read_text())["runs"]
    figures = next(r for r in runs if r["name"] == run)["p95"][probe]
    cells = deployment_row(prefix)
    assert cells[1:4] == [
        f"{figures['unloaded_ms']:.1f} ms",
        f"{figures['loaded_ms']:.1f} ms",
        f"{figures['ratio']:.2f}",
    ]
