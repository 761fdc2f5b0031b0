"""The collaboration benchmark's report: results JSON, a Markdown table per data size with
the verdict per claim, FID/KID against t_cut in the manner of the paper's Figure 3, and the
memorisation worst cases."""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path

from experiments.collaboration import (
    FORMAT,
    MEMORISATION_RATIO,
    BenchmarkSettings,
    aggregate,
    verdicts,
)
from experiments.sweep import _jsonable
from latentfuse.checkpointing import atomic_write_json
from latentfuse.config import RunConfig

MISSING = "—"


def _mean_se(entry: dict | None, digits: int) -> str:
    if not entry:
        return MISSING
    seeds = ",".join(str(s) for s in entry["seeds"])
    return f"{entry['mean']:.{digits}f} ± {entry['se']:.{digits}f} (seeds {seeds})"


def _privacy(rows: list[dict], key: str, field: str) -> str:
    values = [r["privacy"][key][field] for r in rows if r.get("privacy") and key in r["privacy"]]
    return MISSING if not values else f"{sum(values) / len(values):.3f}"


def benchmark_markdown(summary: dict) -> str:
    """One table per data size (models by cut), the verdicts, and how each figure was made."""
    rows, settings = summary["rows"], summary["settings"]
    fid, kid, memo = (aggregate(rows, m) for m in ("fid", "kid", "memorization"))
    lines = [
        "# Collaboration benchmark: does a data-scarce client gain by collaborating?",
        "",
        f"CIFAR-10, {summary['num_clients']} non-IID clients (2 classes each), "
        f"{summary['steps']} training steps for every model, EMA weights scored. Samples: "
        f"{settings['num_samples']} per point ({settings['scheduler'].upper()}, "
        f"{settings['num_inference_steps']} steps, guidance {settings['guidance_scale']:g}), "
        "scored against each client's held-out images and pooled. Mean ± standard error over "
        "seeds (the larger of the seed spread and the bootstrap error over generated images, "
        "over sqrt(seeds)).",
        "",
    ]
    header = (
        "| model | t_cut | FID | KID | memorisation | re-id (gallery 32) | release MIA AUC | "
        "model MIA AUC | sample-gradients per network |"
    )
    for n in sorted({r["images_per_client"] for r in rows}):
        lines += [f"## {n} training images per client", "", header, "|" + "---|" * 9]
        for model in dict.fromkeys(r["model"] for r in rows if r["images_per_client"] == n):
            group = [r for r in rows if r["images_per_client"] == n and r["model"] == model]
            grads = group[0]["sample_gradients"]
            budget = ", ".join(f"{k} {v:,.0f}" for k, v in grads.items())
            lines.append(
                "| "
                + " | ".join(
                    [
                        model,
                        str(group[0]["t_cut"]),
                        _mean_se(fid.get((n, model)), 1),
                        _mean_se(kid.get((n, model)), 4),
                        _mean_se(memo.get((n, model)), 3),
                        _privacy(group, "reid_gallery_32", "rate"),
                        _privacy(group, "release_membership_auc", "mean"),
                        _privacy(group, "model_membership_auc", "mean"),
                        budget,
                    ]
                )
                + " |"
            )
        lines.append("")
    lines += [
        "## Verdicts",
        "",
        "The rule of the frontier report (results/frontier.md): a group's mean over its k seeds "
        "has SE s / sqrt(k), s the seed spread pooled over every group with two seeds or more "
        "(its df beside it); a claim's t = difference / (s sqrt(sum 1/k)) on that df; the "
        "two-sided p of every claim below enters one Holm step-down correction; 'holds' (or "
        "'reversed') where the adjusted p < 0.05, else 'not resolved'. A group with one seed "
        "gets no verdict.",
        "",
        "| claim | difference | SE | t | df | Holm p | verdict |",
        "|---|---|---|---|---|---|---|",
    ]

    def num(value, spec: str = ".3g") -> str:
        return "—" if value is None else format(value, spec)

    for v in summary["verdicts"]:
        lines.append(
            f"| {v['claim']} | {v['difference']:.4g} | {num(v['se'])} | {num(v.get('t'))} "
            f"| {v.get('df', '—')} | {num(v.get('p_holm'), '.2g')} | {v['verdict']} |"
        )
    lines += [
        "",
        "How each figure is made:",
        "- FID/KID: Inception features (clean-fid's resize) of the generated images against "
        "the client's held-out images (pooled: all clients' together); KID is the unbiased "
        "cubic-kernel MMD. FID is biased upward at small sample counts: compare rows only at "
        "equal counts.",
        f"- memorisation: share of generated images whose nearest training image of that client "
        f"(pixel space) is closer than {MEMORISATION_RATIO:.3g} of the distance to the second "
        "nearest (Gu et al.); the worst cases are in the -worst-cases.png picture.",
        "- re-id and membership: the privacy suite (docs/privacy.md) against each point, pooled "
        "over clients; ICM releases nothing (—).",
        "- sample-gradients: steps x batch size per network; server_per_client is the "
        "server's share of one client's releases.",
    ]
    for command in summary.get("commands", []):
        lines += ["", f"Produced by: `{command}`"]
    return "\n".join(lines) + "\n"


def _on_line(model: str) -> bool:
    """GM and the plain splits form the line; ICM, ICM-big and ablations do not."""
    return model == "GM" or re.fullmatch(r"split-\d+", model) is not None


def plot_benchmark(summary: dict, path: Path) -> Path:
    """FID and KID against t_cut, one line per data size (GM at 0, the splits), ICM and
    ICM-big as dashed reference lines, error bars of one standard error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, ("fid", "kid"), strict=True):
        agg = aggregate(rows, metric)
        for i, n in enumerate(sorted({n for n, _ in agg})):
            color = f"C{i}"
            line = sorted(
                ((v["t_cut"], v) for (size, m), v in agg.items() if size == n and _on_line(m)),
                key=lambda item: item[0],
            )
            if line:
                ax.errorbar(
                    [c for c, _ in line],
                    [v["mean"] for _, v in line],
                    yerr=[v["se"] for _, v in line],
                    marker="o",
                    capsize=3,
                    color=color,
                    label=f"{n} images/client",
                )
            for model, style in (("ICM", "--"), ("ICM-big", ":")):
                ref = agg.get((n, model))
                if ref:
                    ax.axhline(ref["mean"], ls=style, color=color, label=f"{model}, {n}")
                    ax.axhspan(
                        ref["mean"] - ref["se"], ref["mean"] + ref["se"], color=color, alpha=0.08
                    )
        ax.set(
            xlabel="t_cut",
            ylabel=metric.upper(),
            title=f"pooled {metric.upper()} (lower is better)",
        )
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def keep_worst_cases(out_dir: Path, rows: list[dict], folder: Path) -> Path:
    """Copy each point's worst-cases.png into `folder` (committed with the report, so the
    montage survives a fresh machine)."""
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    for row in rows:
        source = Path(out_dir) / row["name"] / "worst-cases.png"
        if source.is_file():
            shutil.copyfile(source, folder / f"{row['name']}.png")
    return folder


def worst_case_montage(folder: Path, rows: list[dict], path: Path) -> Path | None:
    """Every scored point's worst cases (generated over nearest training image), one strip per
    point of the first seed, labelled; from the strips kept in `folder`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    strips = [
        (r["name"], Path(folder) / f"{r['name']}.png")
        for r in rows
        if r["seed"] == min(x["seed"] for x in rows)
    ]
    strips = [(name, p) for name, p in strips if p.is_file()]
    if not strips:
        return None
    fig, axes = plt.subplots(len(strips), 1, figsize=(8, 1.3 * len(strips)), squeeze=False)
    for ax, (name, p) in zip(axes[:, 0], strips, strict=True):
        ax.imshow(Image.open(p))
        ax.set_axis_off()
        ax.set_title(name, fontsize=8, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(
    report: Path,
    config: RunConfig,
    settings: BenchmarkSettings,
    rows: list[dict],
    meta: dict,
    out_dir: Path | None = None,
) -> dict:
    """Write `<report>.json` (atomically), `.md`, `.png` and `-worst-cases.png`; the commands
    that produced earlier parts of the report are kept."""
    report = Path(report)
    report.parent.mkdir(parents=True, exist_ok=True)
    source = report.with_suffix(".json")
    commands = json.loads(source.read_text()).get("commands", []) if source.is_file() else []
    if meta.get("command") and meta["command"] not in commands:
        commands.append(meta["command"])
    summary = _jsonable(
        {
            "format": FORMAT,
            "config": meta.get("config"),
            "threads": meta.get("threads"),
            "num_clients": config.data.num_clients,
            "steps": config.train.max_steps,
            "run_config": config.to_dict(),
            "settings": asdict(settings),
            "rows": rows,
            "aggregates": {
                metric: {f"{n}/{m}": v for (n, m), v in aggregate(rows, metric).items()}
                for metric in ("fid", "kid", "memorization")
            },
            "verdicts": verdicts(rows),
            "commands": commands,
        }
    )
    atomic_write_json(source, summary)
    report.with_suffix(".md").write_text(benchmark_markdown(summary))
    if rows:
        plot_benchmark(summary, report.with_suffix(".png"))
        strips = report.parent / f"{report.name}-worst-cases"
        if out_dir is not None:
            keep_worst_cases(out_dir, rows, strips)
        worst_case_montage(strips, rows, report.parent / f"{report.name}-worst-cases.png")
    return summary
