"""The privacy-utility frontier report: benchmark rows -> `<path>.json`, `<path>.md`, `<path>.png`.

Rule. Rows are grouped by (images_per_client, model); a group's FID (and KID) is the mean over
its k seeds. The seed variance is pooled across the grid: s^2 = sum_g (k_g - 1) var_g / sum_g
(k_g - 1) (var with ddof=1), df = sum_g (k_g - 1), over the groups with k_g >= 2, per metric.
The SE of a group mean is s / sqrt(k_g); each group's own seed sd is reported beside it.
"A beats B" (lower FID is better): diff = mean_B - mean_A, SE = s sqrt(1/k_A + 1/k_B),
t = diff / SE, one-sided p = P(T_df > t). A group with a single seed gets no verdict. The
family (one per report): every model at each size against ICM (ICM variants excluded: they
release nothing), the objective arms (exact-cut, exact-compensated, original-cut,
original-compensated; split-100 stands in for a missing exact-cut) pairwise, and "GM beats X"
for each split model. Each claim enters the family as one test with the two-sided p =
2 min(p, 1 - p); Holm's step-down correction gives adjusted p_i = max_{j <= i} min(1,
(m - j + 1) p_(j)). Verdict: "holds" when the adjusted p < 0.05 and diff > 0, "reversed" when
it is < 0.05 and diff < 0, otherwise "not resolved".
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from latentfuse.checkpointing import atomic_write_json

logger = logging.getLogger(__name__)

FORMAT = 1
ALPHA = 0.05
REFERENCE = "ICM"
ARMS = ("exact-cut", "exact-compensated", "original-cut", "original-compensated")
METRICS = ("fid", "kid")
DASH = "—"
VERDICT_HEADER = "| claim | diff | SE | t | df | p (one-sided) | Holm p (two-sided) | verdict |"
POINT = {"marker": "o", "capsize": 3, "ls": "none"}
RULE = " ".join((__doc__ or "").split("\n\n", 1)[1].split())  # the docstring's rule

Group = tuple[int, str]
TITLES = {
    "frontier": "Privacy-utility frontier",
    "pretrained": "From scratch or from a public base",
}


def _release_level(row: dict) -> int | None:
    """The level r a point actually releases at: `release_t` when the row records it (the
    formal mode raises the configured cut), else t_cut - 1 (-1: GM's clean latents)."""
    level = row.get("release_t")
    if level is None and row.get("t_cut") is not None:
        return row["t_cut"] - 1
    return level


def _by_group(rows: list[dict]) -> dict[Group, list[dict]]:
    """Rows keyed by (images_per_client, model), in input order."""
    grouped: dict[Group, list[dict]] = defaultdict(list)
    for row in rows:
        grouped[(int(row["images_per_client"]), str(row["model"]))].append(row)
    return dict(grouped)


def pooled_spread(groups: dict[Group, dict]) -> tuple[float | None, int]:
    """Pooled seed sd s and its df over the groups with at least two seeds."""
    spread = [(g["k"] - 1, g["sd"] ** 2) for g in groups.values() if g["k"] >= 2]
    df = sum(d for d, _ in spread)
    if df == 0:
        return None, 0
    return math.sqrt(sum(d * var for d, var in spread) / df), df


def pooled_groups(rows: list[dict], metric: str) -> dict[Group, dict]:
    """Per (size, model): mean over seeds, k, own seed sd, and SE from the pooled seed sd."""
    groups: dict[Group, dict] = {}
    for key, members in _by_group(rows).items():
        scored = [r for r in members if r.get(metric) is not None]
        if not scored:
            continue
        values = np.array([float(r[metric]) for r in scored])
        levels = sorted({lv for lv in map(_release_level, scored) if lv is not None})
        groups[key] = {
            "images_per_client": key[0],
            "model": key[1],
            "k": len(values),
            "mean": float(values.mean()),
            "sd": float(values.std(ddof=1)) if len(values) >= 2 else None,
            "values": values.tolist(),
            "seeds": [r.get("seed") for r in scored],
            "release_t": max(levels) if levels else None,
            "release_levels": levels,
        }
    s, _ = pooled_spread(groups)
    for group in groups.values():
        group["se"] = None if s is None else s / math.sqrt(group["k"])
    return groups


def _mean(values: list) -> float | None:
    """Mean of the non-None values, None when there are none."""
    present = [float(v) for v in values if v is not None]
    return float(np.mean(present)) if present else None


def holm(pvalues: list[float]) -> list[float]:
    """Holm step-down adjusted p-values, in the input order."""
    m = len(pvalues)
    adjusted = [0.0] * m
    running = 0.0
    for rank, index in enumerate(sorted(range(m), key=lambda i: pvalues[i])):
        running = max(running, min(1.0, (m - rank) * pvalues[index]))
        adjusted[index] = running
    return adjusted


STARTS = ("-base", "-lora")  # the pretrained grid's suffixes: full fine-tuning, LoRA
SHIFT, SCRATCH = "-shift", "-shift-scratch"


def _pretrained_family(groups: dict[Group, dict]) -> list[tuple[int, str, str]]:
    """The pretrained grid's claims (size, A, B): the base improves a model ("X-base beats X",
    "X-lora beats X"); collaboration beats a client fine-tuning the base alone ("X-base beats
    ICM-base" for every X that releases); under distribution shift, the shifted base against
    scratch and collaboration against the lone client."""
    claims: list[tuple[int, str, str]] = []
    for size in sorted({n for n, _ in groups}):
        models = sorted(m for n, m in groups if n == size)
        for suffix in STARTS:
            started = [m for m in models if m.endswith(suffix)]
            claims += [(size, m, m[: -len(suffix)]) for m in started if m[: -len(suffix)] in models]
            lone = REFERENCE + suffix
            if lone in models:
                claims += [(size, m, lone) for m in started if m != lone]
        for m in (m for m in models if m.endswith(SHIFT)):
            if m[: -len(SHIFT)] + SCRATCH in models:
                claims.append((size, m, m[: -len(SHIFT)] + SCRATCH))
        for suffix in (SHIFT, SCRATCH):
            lone = REFERENCE + suffix
            if lone in models:
                claims += [
                    (size, m, lone)
                    for m in models
                    if m.endswith(suffix) and m != lone and not m.startswith(REFERENCE)
                ]
    return claims


def _family(groups: dict[Group, dict], family: str = "frontier") -> list[tuple[int, str, str]]:
    """The claims (size, A, B) meaning "A beats B", in report order."""
    if family == "pretrained":
        return _pretrained_family(groups)
    claims: list[tuple[int, str, str]] = []
    for size in sorted({n for n, _ in groups}):
        models = sorted(m for n, m in groups if n == size)
        if REFERENCE in models:
            claims += [(size, m, REFERENCE) for m in models if not m.startswith(REFERENCE)]
        arms = {arm: arm for arm in ARMS if arm in models}
        if "exact-cut" not in arms and "split-100" in models:
            arms["exact-cut"] = "split-100"
        present = [arms[arm] for arm in ARMS if arm in arms]
        claims += [(size, a, b) for a, b in combinations(present, 2)]
        if "GM" in models:
            splits = [m for m in models if not m.startswith(("GM", REFERENCE))]
            claims += [(size, "GM", m) for m in splits]
    return claims  # no claim can repeat: ICM and GM are never arms


def _compare(a: dict, b: dict, s: float | None, df: int, metric: str) -> dict:
    """One claim "a beats b": difference, SE, t, df and one- and two-sided p."""
    size = a["images_per_client"]
    claim = {"claim": f"{a['model']} beats {b['model']} at {size} images ({metric.upper()})"}
    claim.update(images_per_client=size, a=a["model"], b=b["model"], metric=metric, df=df)
    claim.update(seeds_a=a["k"], seeds_b=b["k"], difference=b["mean"] - a["mean"])
    claim.update(dict.fromkeys(("se", "t", "p", "p_two_sided", "p_holm")))
    if min(a["k"], b["k"]) < 2:
        return {**claim, "verdict": "1 seed: no verdict"}
    if s is None or s <= 0:
        return {**claim, "verdict": "no seed variance: no verdict"}
    se = s * math.sqrt(1 / a["k"] + 1 / b["k"])
    t = claim["difference"] / se
    p = float(stats.t.sf(t, df))
    return {**claim, "se": se, "t": t, "p": p, "p_two_sided": 2 * min(p, 1 - p)}


def frontier_verdicts(
    rows: list[dict], metric: str = "fid", family: str = "frontier"
) -> list[dict]:
    """Every claim of the family with its test and its Holm-corrected verdict."""
    groups = pooled_groups(rows, metric)
    s, df = pooled_spread(groups)
    verdicts = [
        _compare(groups[(n, a)], groups[(n, b)], s, df, metric)
        for n, a, b in _family(groups, family)
    ]
    return judge(verdicts)


def judge(claims: list[dict]) -> list[dict]:
    """Holm's step-down correction over every tested claim (those with a two-sided p):
    "holds" / "reversed" where the adjusted p < ALPHA, else "not resolved"."""
    tested = [c for c in claims if c["p_two_sided"] is not None]
    for claim, adjusted in zip(tested, holm([c["p_two_sided"] for c in tested]), strict=True):
        claim["p_holm"] = adjusted
        if adjusted < ALPHA:
            claim["verdict"] = "holds" if claim["difference"] > 0 else "reversed"
        else:
            claim["verdict"] = "not resolved"
    return claims


def _lookup(row: dict, key: str) -> Any:
    """A field of the row itself, else of its privacy dict (new rows carry some at top level)."""
    if key in row:
        return row[key]
    return (row.get("privacy") or {}).get(key)


def _nothing_released(row: dict) -> bool:
    """True for a point that releases nothing (ICM: t_cut = T), so it has no attack figures."""
    privacy = row.get("privacy") or {}
    if "reid_gallery_32" in privacy:
        return False
    status = str(privacy.get("epsilon_status", ""))
    return not privacy or "nothing" in status or str(row.get("model", "")).startswith(REFERENCE)


def _reid(members: list[dict], key: str) -> dict | None:
    """Re-identification over seeds: mean rate, min/max, pooled Clopper-Pearson 95% CI."""
    entries = [(r.get("privacy") or {}).get(key) for r in members]
    entries = [e for e in entries if e and e.get("rate") is not None]
    if not entries:
        return None
    rates = [float(e["rate"]) for e in entries]
    summary = {"rate": float(np.mean(rates)), "min": min(rates), "max": max(rates)}
    summary.update(ci=None, chance=_mean([e.get("chance") for e in entries]))
    if all(e.get("hits") is not None and e.get("n") for e in entries):
        hits, n = sum(int(e["hits"]) for e in entries), sum(int(e["n"]) for e in entries)
        ci = stats.binomtest(hits, n).proportion_ci(0.95, method="exact")
        summary["ci"] = [float(ci.low), float(ci.high)]
    return summary


def _privacy_mean(members: list[dict], key: str) -> float | None:
    """Mean over seeds of privacy[key]['mean'] (or a bare number); None if any seed lacks it."""
    values = []
    for row in members:
        entry = (row.get("privacy") or {}).get(key)
        if entry is None:
            return None
        values.append(entry.get("mean") if isinstance(entry, dict) else entry)
    return _mean(values) if values else None


def privacy_summary(members: list[dict]) -> dict:
    """A group's privacy figures averaged over its seeds; missing ones are None."""
    gdp = [_lookup(r, "gaussian_dp") for r in members]
    return {
        "nothing_released": all(_nothing_released(r) for r in members),
        "reid_gallery_32": _reid(members, "reid_gallery_32"),
        "reid_gallery_all": _reid(members, "reid_gallery_all"),
        "release_auc": _privacy_mean(members, "release_membership_auc"),
        "release_tpr@0.01": _privacy_mean(members, "release_membership_tpr@0.01"),
        "release_tpr@0.001": _privacy_mean(members, "release_membership_tpr@0.001"),
        "model_auc": _privacy_mean(members, "model_membership_auc"),
        "psnr": _privacy_mean(members, "reconstruction_psnr"),
        "mean_image_psnr": _privacy_mean(members, "reconstruction_mean_image_psnr"),
        "epsilon": _mean([_lookup(r, "epsilon") for r in members]),
        "mu": _mean([g.get("mu") for g in gdp if g]),
        "auc_bound": _mean([g.get("membership_auc_bound") for g in gdp if g]),
        "network_evaluations": _mean([r.get("network_evaluations") for r in members]),
    }


def headline(rows: list[dict], verdicts: list[dict]) -> str:
    """One sentence: the most private point that beats ICM, its re-identification and mu."""
    grouped = _by_group(rows)
    wins = [v for v in verdicts if v["b"] == REFERENCE and v["verdict"] == "holds"]
    if not wins:
        return (
            f"No point beats {REFERENCE} on FID under the rule below (Holm-corrected, "
            f"{ALPHA}), so no privacy level is bought with a utility gain."
        )
    points = []
    for v in wins:
        members = grouped[(v["images_per_client"], v["a"])]
        level = max((lv for lv in map(_release_level, members) if lv is not None), default=-1)
        points.append((level, v, privacy_summary(members)))
    level, best, summary = max(points, key=lambda p: (p[0], -p[1]["p_holm"]))
    text = (
        f"The most private point that beats {REFERENCE} on FID is {best['a']} at "
        f"{best['images_per_client']} images per client (release level {level}; FID "
        f"{best['difference']:.1f} lower, Holm p = {best['p_holm']:.2g}): "
        f"{_reid_phrase(summary)}, {_mu_phrase(summary)}."
    )
    close = [(v, s) for _, v, s in points if _within_twice_chance(s)]
    if close:
        names = ", ".join(f"{v['a']} at {v['images_per_client']} images" for v, _ in close)
        return f"{text} Re-identification within 2x chance while beating {REFERENCE}: {names}."
    return f"{text} No point that beats {REFERENCE} brings re-identification within 2x chance."


def pretrained_headline(verdicts: list[dict]) -> str:
    """What the pretrained grid answers, from its verdicts: does the base improve each model,
    does collaboration beat a client fine-tuning the base alone, and under shift."""

    def said(claims: list[dict]) -> str:
        if not claims:
            return "not measured yet"
        return "; ".join(f"{v['a']} vs {v['b']}: {v['verdict']}" for v in claims)

    improves = [v for v in verdicts if any(v["a"] == v["b"] + s for s in STARTS)]
    lone = [v for v in verdicts if v["b"] in (REFERENCE + s for s in STARTS)]
    shift = [v for v in verdicts if SHIFT in v["a"]]
    return (
        f"Does the public base improve a model? {said(improves)}. Does collaboration still "
        f"beat a client fine-tuning the base alone? {said(lone)}. Under distribution shift: "
        f"{said(shift)}."
    )


def _reid_phrase(summary: dict) -> str:
    """Re-identification in a gallery of 32, in words."""
    reid = summary["reid_gallery_32"]
    if reid is None:
        return "re-identification in a gallery of 32 not measured"
    chance = f" (chance {reid['chance']:.1%})" if reid["chance"] is not None else ""
    return f"re-identification in a gallery of 32 {reid['rate']:.1%}{chance}"


def _mu_phrase(summary: dict) -> str:
    """The Gaussian-DP mu in words."""
    return "no mu: latents not clipped" if summary["mu"] is None else f"mu = {summary['mu']:.3g}"


def _within_twice_chance(summary: dict) -> bool:
    """True when the gallery-32 re-identification rate is at most twice its chance."""
    reid = summary["reid_gallery_32"]
    return bool(reid and reid["chance"] is not None and reid["rate"] <= 2 * reid["chance"])


def _num(value: float | None, spec: str = ".3g") -> str:
    """A number in format `spec`, or a dash when missing."""
    return DASH if value is None else format(value, spec)


def _pm(group: dict | None, digits: int) -> str:
    """Mean ± pooled SE of a group, a dash when missing."""
    if group is None:
        return DASH
    se = DASH if group["se"] is None else f"{group['se']:.{digits}f}"
    return f"{group['mean']:.{digits}f} ± {se}"


def _reid_cell(reid: dict | None, nothing: bool) -> str:
    """Rate [pooled CI] of a re-identification summary."""
    if reid is None:
        return "nothing released" if nothing else DASH
    ci = "" if reid["ci"] is None else f" [{reid['ci'][0]:.1%}, {reid['ci'][1]:.1%}]"
    return f"{reid['rate']:.1%}{ci}"


def _table_row(fid: dict, kid: dict | None, p: dict) -> str:
    """One frontier-table line."""
    nothing = p["nothing_released"]
    tpr = p["release_tpr@0.001"]
    tpr = ("nothing released" if nothing else "not measured") if tpr is None else _num(tpr, ".3f")
    psnr = DASH if p["psnr"] is None else f"{p['psnr']:.1f} vs {_num(p['mean_image_psnr'], '.1f')}"
    return (
        f"| {fid['images_per_client']} | {fid['model']} | {_num(fid['release_t'], '.0f')} "
        f"| {_num(p['network_evaluations'], '.0f')} | {fid['k']} | {_pm(fid, 2)} "
        f"| {_num(fid['sd'])} | {_pm(kid, 4)} | {_reid_cell(p['reid_gallery_32'], nothing)} "
        f"| {_reid_cell(p['reid_gallery_all'], nothing)} | {_num(p['release_auc'], '.3f')} "
        f"| {_num(p['release_tpr@0.01'], '.3f')} | {tpr} | {_num(p['model_auc'], '.3f')} "
        f"| {psnr} | {_num(p['epsilon'])} | {_num(p['mu'])} | {_num(p['auc_bound'], '.3f')} |"
    )


def frontier_markdown(summary: dict) -> str:
    """The report: headline, frontier table, verdict table, rule and commands."""
    title = TITLES[summary.get("family", "frontier")]
    fid, kid = pooled_groups(summary["rows"], "fid"), pooled_groups(summary["rows"], "kid")
    grouped = _by_group(summary["rows"])
    header = (
        "| images/client | model | release level | network evaluations | seeds | FID ± SE "
        "| FID seed sd | KID ± SE | re-id, gallery 32 [95% CI] | re-id, whole client set "
        "| release MIA AUC | TPR@1% FPR | TPR@0.1% FPR | model MIA AUC "
        "| reconstruction PSNR vs mean image | ε | μ | worst-case AUC bound |"
    )
    lines = [f"# {title}", "", summary["headline"], "", header, "|" + "---|" * 18]
    for key in sorted(fid, key=lambda k: (k[0], fid[k]["release_t"] or 0, k[1])):
        lines.append(_table_row(fid[key], kid.get(key), privacy_summary(grouped[key])))
    fs, ks = summary["pooled"]["fid"], summary["pooled"]["kid"]
    lines += [
        "",
        f"Pooled seed sd: FID s = {_num(fs['s'])} (df {fs['df']}), KID s = "
        f"{_num(ks['s'])} (df {ks['df']}).",
        "",
        VERDICT_HEADER,
        "|---" * 8 + "|",
    ]
    for v in summary["verdicts"]:
        lines.append(
            f"| {v['claim']} | {v['difference']:.2f} | {_num(v['se'])} | {_num(v['t'])} "
            f"| {v['df']} | {_num(v['p'], '.2g')} | {_num(v['p_holm'], '.2g')} | {v['verdict']} |"
        )
    lines += ["", RULE]
    for command in summary["meta"].get("commands", []):
        lines += ["", f"Produced by: `{command}`"]
    return "\n".join(lines) + "\n"


def _draw_panel(ax: Any, points: list[tuple], icm: dict[int, dict], colors: dict) -> None:
    """Points (x, xerr, group, size) with FID error bars, labels and each size's ICM band."""
    shared: dict[float, int] = defaultdict(int)  # points at one x: labels alternate sides
    for x, xerr, group, size in sorted(points, key=lambda p: p[2]["mean"]):
        ax.errorbar([x], [group["mean"]], [group["se"] or 0.0], xerr, color=colors[size], **POINT)
        shared[x] += 1
        side = (6, 0, "left") if shared[x] % 2 else (-6, 0, "right")
        ax.annotate(
            group["model"],
            (x, group["mean"]),
            xytext=side[:2],
            ha=side[2],
            va="center",
            textcoords="offset points",
            fontsize=7,
            color=colors[size],
        )
    for size, ref in icm.items():
        se = ref["se"] or 0.0
        ax.axhline(ref["mean"], ls="--", color=colors[size], label=f"ICM, {size} images/client")
        ax.axhspan(ref["mean"] - se, ref["mean"] + se, color=colors[size], alpha=0.1)


def plot_frontier(rows: list[dict], path: Path) -> Path:
    """Left: FID against re-identification in a gallery of 32; right: FID against mu."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fid, grouped = pooled_groups(rows, "fid"), _by_group(rows)
    colors = {n: f"C{i}" for i, n in enumerate(sorted({n for n, _ in fid}))}
    icm = {n: g for (n, m), g in fid.items() if m == REFERENCE}
    left, right = [], []
    for key, group in fid.items():
        p = privacy_summary(grouped[key])
        reid = p["reid_gallery_32"]
        if reid is not None:
            low, high = reid["ci"] or [reid["min"], reid["max"]]
            err = [[max(reid["rate"] - low, 0.0)], [max(high - reid["rate"], 0.0)]]
            left.append((reid["rate"], err, group, key[0]))
        if p["mu"] is not None:
            right.append((p["mu"], None, group, key[0]))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    _draw_panel(axes[0], left, icm, colors)
    axes[0].axvline(1 / 32, ls=":", color="k", label="chance (1/32)")
    axes[0].set(
        xlabel="re-identification rate, gallery of 32 (mean over seeds, 95% CI)",
        ylabel="FID, mean over seeds ± pooled seed SE (lower is better)",
        title="utility vs empirical re-identification",
    )
    _draw_panel(axes[1], right, icm, colors)
    axes[1].set(
        xlabel="μ of one image's release (Gaussian DP; lower is more private)",
        title="utility vs formal guarantee",
    )
    if not right:
        note = "no point has μ: latents not clipped"
        axes[1].text(0.5, 0.5, note, ha="center", transform=axes[1].transAxes)
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _base(path: Path) -> Path:
    """The report's base path, without a .json/.md/.png suffix if one was given."""
    path = Path(path)
    return path.with_suffix("") if path.suffix in (".json", ".md", ".png") else path


def write_frontier_report(
    path: Path, rows: list[dict], meta: dict, family: str = "frontier"
) -> dict:
    """Write `<path>.json` (atomically), `<path>.md` and `<path>.png`; return the JSON dict.
    `family`: the claims tested ("frontier", or "pretrained": `_pretrained_family`)."""
    base = _base(path)
    groups = {metric: pooled_groups(rows, metric) for metric in METRICS}
    spreads = {metric: pooled_spread(g) for metric, g in groups.items()}
    pooled = {metric: {"s": s, "df": df} for metric, (s, df) in spreads.items()}
    verdicts = frontier_verdicts(rows, family=family)
    summary = {
        "format": FORMAT,
        "family": family,
        "rows": rows,
        "groups": {metric: list(g.values()) for metric, g in groups.items()},
        "pooled": pooled,
        "verdicts": verdicts,
        "headline": (
            pretrained_headline(verdicts) if family == "pretrained" else headline(rows, verdicts)
        ),
        "meta": meta,
    }
    base.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(base.with_name(base.name + ".json"), summary)
    base.with_name(base.name + ".md").write_text(frontier_markdown(summary))
    plot_frontier(rows, base.with_name(base.name + ".png"))
    logger.info("frontier report written to %s.{json,md,png}: %s", base.name, summary["headline"])
    return summary
