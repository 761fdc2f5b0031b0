"""The privacy sweep's report: a Markdown table and a plot, each figure beside its baseline."""

from __future__ import annotations

from pathlib import Path

MISSING = "—"


def _rate(entry: dict | None) -> str:
    """'0.94 [0.91, 0.96] (chance 0.031, p 1e-300)' for a binomial summary."""
    if not entry or entry.get("rate") is None:
        return MISSING
    low, high = entry["ci"]
    test = f"(chance {entry['chance']:.2g}, p {entry['p_value']:.2g})"
    return f"{entry['rate']:.3f} [{low:.3f}, {high:.3f}] {test}"


def _spread(entry: dict | None, digits: int = 3) -> str:
    """'mean (min-max over clients)'."""
    if not entry:
        return MISSING
    return f"{entry['mean']:.{digits}f} ({entry['min']:.{digits}f}-{entry['max']:.{digits}f})"


def _quality(row: dict) -> str:
    quality = row.get("quality")
    if not quality:
        return MISSING
    pooled = quality["pooled"]
    return f"FID {pooled['fid']:.1f}, KID {pooled['kid']:.4f} ± {pooled['kid_std']:.4f}"


def privacy_markdown(summary: dict, command: str = "") -> str:
    """The report: one row per point, then what each column measures."""
    header = (
        f"| point | t_cut | re-id, gallery {summary['settings']['gallery_size']} | "
        "re-id, whole training set | release MIA AUC | "
        "TPR@1% FPR | TPR@0.1% FPR | model MIA AUC | recon PSNR dB | mean-image PSNR dB | "
        "epsilon (delta) | quality |"
    )
    lines = [
        "# Privacy sweep: what the server learns from releases with secret noise",
        "",
        f"Threat model: {summary['threat_model']}.",
        f"Release noise: {summary['release_noise']}. Release policy: {summary['release_policy']}; "
        f"{summary['steps']} training steps per point.",
        "",
        header,
        "|" + "---|" * (header.count("|") - 1),
    ]
    for row in summary["rows"]:
        eps = row.get("epsilon")
        delta = summary["settings"]["delta"]
        epsilon = f"{eps:.3g} ({delta:g})" if eps is not None else row.get("epsilon_status", "")
        lines.append(
            "| "
            + " | ".join(
                [
                    row["name"],
                    str(row["t_cut"]),
                    _rate(row.get("reid_gallery_32")),
                    _rate(row.get("reid_gallery_all")),
                    _spread(row.get("release_membership_auc")),
                    _spread(row.get("release_membership_tpr@0.01")),
                    _spread(row.get("release_membership_tpr@0.001")),
                    _spread(row.get("model_membership_auc")),
                    _spread(row.get("reconstruction_psnr"), 2),
                    _spread(row.get("reconstruction_mean_image_psnr"), 2),
                    epsilon,
                    _quality(row),
                ]
            )
            + " |"
        )
    s = summary["settings"]
    lines += [
        "",
        "What each column measures (per client, then pooled; intervals are 95%):",
        f"- re-id: likelihood re-identification, closed set. The attacker holds the releases "
        f"and candidate images with the public autoencoder, and matches each of "
        f"{s['num_queries']} releases per client to the candidate x minimising "
        f"||z_r - sqrt(abar_r) E(x)|| (the clip norm is public). Gallery {s['gallery_size']}: the "
        f"source and {s['gallery_size'] - 1} other training images of the client; whole set: "
        "every training image of the client. "
        "Rate with Clopper-Pearson interval; p: exact one-sided binomial test against chance.",
        f"- release MIA: membership inference on releases. Is candidate x one of the client's "
        "training images? Two scores, each maximised over all the client's releases; the "
        "stronger by AUC is reported (a server runs both): the log-likelihood ratio of x "
        "against every other candidate of the pool as the release's source (cancels each "
        "release's noise energy), and minus the distance to the nearest release. "
        f"{s['num_members']} members vs as many held-out non-members per client; AUC and TPR "
        "at low FPR (Carlini et al. 2022), mean (min-max) over clients; chance: AUC 0.5, TPR = "
        "FPR (bootstrap intervals per client are in the JSON).",
        f"- model MIA: loss-based membership inference against the server's trained denoiser: "
        f"its eps-prediction error at s >= t_cut over {s['num_draws']} shared (s, eps) draws, "
        f"{s['num_model_members']} members vs non-members per client; uncalibrated (no shadow "
        "models), so a weak lower bound on what a stronger attacker learns.",
        f"- recon PSNR: the server's best estimate of the image from its release: its own "
        f"denoiser's posterior mean (Tweedie at s = t_cut), decoded, against the original; "
        f"{s['num_reconstructions']} images per client. mean-image PSNR: the trivial attacker "
        "that outputs the client's mean image. Only a reconstruction above the baseline "
        "discloses anything about the particular image.",
        "- epsilon: the analytic Gaussian mechanism (Balle & Wang 2018) per image and release, "
        "only where clipping is enforced (privacy.clip_norm); otherwise not applicable.",
        "- quality: pooled FID/KID of the formal-mode points and their unclipped baseline.",
    ]
    if command:
        lines += ["", f"Produced by: `{command}`"]
    if summary.get("reattack_command"):
        lines += [
            f"Release attackers (re-id, release MIA; version "
            f"{summary['rows'][0].get('release_attacks', {}).get('version')}) re-run without "
            f"training on fresh release keys, by: `{summary['reattack_command']}`; the model "
            "attackers' figures are the trained points' own."
        ]
    return "\n".join(lines) + "\n"


def plot_privacy(summary: dict, path: str | Path) -> Path:
    """Re-identification, membership AUC and reconstruction PSNR against t_cut, with their
    chance or trivial baselines (base points only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted((r for r in summary["rows"] if r["variant"] == "base"), key=lambda r: r["t_cut"])
    cuts = [r["t_cut"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for gallery, label in (("reid_gallery_32", "gallery 32"), ("reid_gallery_all", "whole set")):
        rates = [r[gallery]["rate"] for r in rows]
        errors = [
            [r[gallery]["rate"] - r[gallery]["ci"][0] for r in rows],
            [r[gallery]["ci"][1] - r[gallery]["rate"] for r in rows],
        ]
        axes[0].errorbar(cuts, rates, yerr=errors, marker="o", label=label, capsize=3)
        axes[0].plot(cuts, [r[gallery]["chance"] for r in rows], "--", color="grey")
    axes[0].set(title="likelihood re-identification", xlabel="t_cut", ylabel="rate")
    for key, label in (
        ("release_membership_auc", "on releases"),
        ("model_membership_auc", "on the server model"),
    ):
        points = [(r["t_cut"], r[key]) for r in rows if r.get(key)]
        if points:
            axes[1].errorbar(
                [c for c, _ in points],
                [e["mean"] for _, e in points],
                yerr=[
                    [e["mean"] - e["min"] for _, e in points],
                    [e["max"] - e["mean"] for _, e in points],
                ],
                marker="o",
                label=label,
                capsize=3,
            )
    axes[1].axhline(0.5, linestyle="--", color="grey", label="chance")
    axes[1].set(title="membership inference (AUC, range over clients)", xlabel="t_cut")
    for key, label in (
        ("reconstruction_psnr", "server posterior mean"),
        ("reconstruction_mean_image_psnr", "client mean image"),
    ):
        points = [(r["t_cut"], r[key]["mean"]) for r in rows if r.get(key)]
        axes[2].plot([c for c, _ in points], [v for _, v in points], marker="o", label=label)
    axes[2].set(title="reconstruction PSNR (dB)", xlabel="t_cut")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
