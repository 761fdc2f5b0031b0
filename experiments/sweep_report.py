"""The cut-point sweep's report: notes, the Markdown table and the figure, written beside the
sweep's folder (`<out-dir>.json` atomically, `.md`, `.png`); experiments/run_sweep.py calls it."""

from __future__ import annotations

import os
from pathlib import Path

from latentfuse.checkpointing import atomic_write_json

MISSING = "—"


def report_paths(out_dir: Path) -> dict[str, Path]:
    """`results/x-sweep` -> results/x-sweep.json, .md and .png."""
    return {ext: out_dir.with_name(f"{out_dir.name}.{ext}") for ext in ("json", "md", "png")}


def notes(summary: dict) -> list[str]:
    """What the figures mean and how they were measured."""
    s, privacy = summary["settings"], summary["privacy"]
    unreleased = [
        str(r["t_cut"])
        for r in summary["ablations"]
        if r["release_policy"] == "fresh" and r["releases_per_image"] == 1
    ]
    fresh_note = (
        [
            f"`fresh` at t_cut = {', '.join(unreleased)} released each image once: no client began "
            "a second epoch of its own data within the budget, so that run is the `once` run "
            "(same seeds, same releases) and its rows match."
        ]
        if unreleased
        else []
    )
    overrides = summary.get("overrides") or []
    override_note = [f"Config overrides of every run: {' '.join(overrides)}."] if overrides else []
    measured = [
        f"{summary['steps']} training steps per run (server batch {summary['server_batch_size']}"
        f", client batch {summary['client_batch_size']}); {summary['num_samples']} generated "
        f"images per client, {summary['num_generated_pooled']} pooled over "
        f"{summary['num_clients']} clients, sampler {s.get('scheduler', 'ddpm')} (ancestral "
        f"unless ddim), {s['num_inference_steps']} steps; FID/KID against "
        "each client's held-out real images (FID is biased upward at small counts).",
        "release_fid/release_kid: decoded releases vs the client's held-out real images, mean "
        "over clients. With few releases FID is biased far upward; KID is unbiased.",
        f"attack_psnr/attack_ssim: the GM (t_cut = 0) server_unet denoises each release by DDIM "
        f"(at most {s['attack_steps']} steps) to an estimate of its source image; "
        f"{s['num_releases'] or s['num_samples']} releases per client (the same training images "
        "at every cut).",
        "reid_rate: share of reconstructions whose nearest image (Inception features) among the "
        "attacked training images is their source; reid_chance = 1 / that count.",
        f"epsilon: analytic Gaussian mechanism, delta = {privacy['delta']:g}, only where the run "
        "clips latents (privacy.clip_norm); otherwise not applicable. `fresh` composes over the "
        "epochs each client released.",
        "Client burden (torch.utils.flop_counter; seconds best of 3 at batch 2 on the sweep's "
        "device): sampling is one 50-step chain (FLOPs are the same for any sampler) plus the "
        "decoder, the client running t < t_cut and "
        "decoding; training is one forward and backward pass of each side's denoiser per image "
        "(an image's share of a step). Bytes: one fp32 latent up per release (0 when the server "
        "has no timesteps), one hand-off latent down per sample (0 when it runs none).",
        "Disclosure fields are null at t_cut = T (ICM): nothing is released.",
        "train_seconds counts the session that finished a run (an interrupted run's earlier "
        "sessions are not counted).",
    ]
    return fresh_note + override_note + measured


def _fmt(value, spec: str = ".2f") -> str:
    return MISSING if value is None else format(value, spec)


def _epsilon(row: dict) -> str:
    if row["epsilon"] is None:
        return "n/a" if "not applicable" in (row.get("epsilon_status") or "") else "∞"
    return _fmt(row["epsilon"], ".3g")


def markdown(summary: dict, title: str) -> str:
    """The report: the sweep table, the ablation table and the notes."""
    delta = summary["privacy"]["delta"]
    lines = [f"# Cut-point sweep: {title}", ""]
    lines += [
        f"| t_cut | model | FID | KID | release FID | release KID | attack PSNR (dB) | attack SSIM "
        f"| re-id (chance) | ε (δ={delta:g}) | client FLOP share | steps | wall (s) |",
        "|" + "---:|" * 13,
    ]
    for r in summary["rows"]:
        reid = (
            MISSING if r["reid_rate"] is None else f"{r['reid_rate']:.2f} ({r['reid_chance']:.3f})"
        )
        lines.append(
            f"| {r['t_cut']} | {r['model']} | {_fmt(r['fid'])} | {_fmt(r['kid'], '.4f')} | "
            f"{_fmt(r['release_fid'])} | {_fmt(r['release_kid'], '.4f')} | "
            f"{_fmt(r['attack_psnr'])} | {_fmt(r['attack_ssim'], '.3f')} | {reid} | "
            f"{_epsilon(r)} | {_fmt(r['client_flop_share'], '.3f')} | {r['steps']} | "
            f"{r['wall_seconds']:.0f} |"
        )
    lines += ["", "## Client burden (per image, mean over clients)", ""]
    lines += [
        "| t_cut | sampling: client FLOP share | client wall share | client GFLOP | server GFLOP "
        "| training: client FLOP share | client GFLOP | server GFLOP | bytes up / release | "
        "bytes down / sample |",
        "|" + "---:|" * 10,
    ]
    burden = (
        ("client_flop_share", ".3f"),
        ("client_seconds_share", ".3f"),
        ("client_sampling_gflops", ".3f"),
        ("server_sampling_gflops", ".3f"),
        ("client_train_flop_share", ".3f"),
        ("client_train_gflops", ".4f"),
        ("server_train_gflops", ".4f"),
        ("upload_bytes_per_release", ".0f"),
        ("download_bytes_per_sample", ".0f"),
    )
    for r in summary["rows"]:
        cells = [str(r["t_cut"])] + [_fmt(r[key], spec) for key, spec in burden]
        lines.append("| " + " | ".join(cells) + " |")
    if summary["ablations"]:
        lines += ["", "## Ablations", ""]
        lines += [
            "| t_cut | variant | objective | release | FID | KID | release FID | attack PSNR | "
            "attack SSIM | re-id | ε | releases / image |",
            "|" + "---:|" * 12,
        ]
        for r in summary["ablations"]:
            lines.append(
                f"| {r['t_cut']} | {r['variant']} | {r['objective']} | {r['release_policy']} | "
                f"{_fmt(r['fid'])} | {_fmt(r['kid'], '.4f')} | {_fmt(r['release_fid'])} | "
                f"{_fmt(r['attack_psnr'])} | {_fmt(r['attack_ssim'], '.3f')} | "
                f"{_fmt(r['reid_rate'])} | {_epsilon(r)} | {r['releases_per_image']} |"
            )
    lines += ["", "## Notes", ""] + [f"- {n}" for n in summary["notes"]]
    return "\n".join(lines) + "\n"


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["t_cut"], r[key]) for r in rows if r[key] is not None]
    return [p[0] for p in points], [p[1] for p in points]


def plot(summary: dict, path: Path) -> None:
    """Figure 3 of the paper: FID and disclosure against the cut, GM and ICM marked (Agg)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows, T = summary["rows"], summary["num_train_timesteps"]
    fig = Figure(figsize=(11, 7.5), layout="constrained")
    FigureCanvasAgg(fig)
    (a, b), (c, d) = fig.subplots(2, 2, sharex=True)
    a.plot(*_series(rows, "fid"), "o-", label="samples (pooled)")
    a.plot(*_series(rows, "release_fid"), "s--", label="decoded releases (disclosure a)")
    a.set(ylabel="FID vs held-out real images", title="quality and release FID")
    b.plot(*_series(rows, "attack_psnr"), "o-", color="C2", label="PSNR")
    b.set(ylabel="attack PSNR (dB)", title="reconstruction attack (disclosure b)")
    twin = b.twinx()
    twin.plot(*_series(rows, "attack_ssim"), "s--", color="C3", label="SSIM")
    twin.set_ylabel("attack SSIM")
    c.plot(*_series(rows, "reid_rate"), "o-", color="C4", label="re-identified")
    c.plot(*_series(rows, "reid_chance"), ":", color="grey", label="chance")
    c.set(ylabel="share", ylim=(-0.02, 1.02), title="re-identification (disclosure c)")
    positive = [r for r in rows if r["epsilon"]]  # log axis: inf (null) and 0 are left out
    d.plot(*_series(positive, "epsilon"), "o-", color="C5", label="epsilon")
    d.set(ylabel=f"ε at δ = {summary['privacy']['delta']:g}", title="privacy bound (disclosure d)")
    if positive:
        d.set_yscale("log")
    cuts = [r["t_cut"] for r in rows]
    for axis in (a, b, c, d):
        axis.set_xscale("symlog", linthresh=10)  # linear near 0, so the GM (t_cut = 0) shows
        axis.set_xlim(-1, T * 1.2)
        axis.set_xticks(cuts, [str(t) for t in cuts])
        axis.minorticks_off()
        for x, name in ((0, "GM"), (T, "ICM")):
            axis.axvline(x, color="black", lw=0.8, ls="--")
            axis.text(x, 0.97, f" {name}", transform=axis.get_xaxis_transform(), va="top")
        axis.grid(alpha=0.3)
    for axis in (c, d):
        axis.set_xlabel("cut point t_cut")
    handles = b.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    b.legend(handles, [h.get_label() for h in handles], fontsize=8)
    for axis in (a, c, d):
        axis.legend(fontsize=8)
    fig.suptitle(
        f"{summary['steps']} steps per run, {summary['num_samples']} samples per client"
        f" ({summary['num_generated_pooled']} pooled); ε = ∞ (GM) and ε = 0 (ICM) not drawn"
    )
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)


def write_report(summary: dict, out_dir: Path, title: str) -> dict[str, Path]:
    """Write `<out-dir>.json` (atomically), `.md` and `.png` beside the sweep folder."""
    paths = report_paths(out_dir)
    atomic_write_json(paths["json"], summary)
    tmp = paths["md"].with_name(f".{paths['md'].name}.tmp")
    tmp.write_text(markdown(summary, title))
    os.replace(tmp, paths["md"])
    plot(summary, paths["png"])
    return paths
