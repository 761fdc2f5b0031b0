"""Model folders and the hub: local-or-hub resolution, the model card, the upload."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def looks_local(path_or_id: str | os.PathLike) -> bool:
    """True for what can only be a path: absolute, starting with '.', or with 2+ slashes."""
    text = str(path_or_id)
    return Path(text).is_absolute() or text.startswith(".") or text.count("/") > 1


def resolve_model_folder(path_or_id: str | os.PathLike, **download_kwargs: Any) -> Path:
    """A local model folder, or the snapshot of a hub repo id (never looked up for a path)."""
    text = str(path_or_id)
    if Path(text).is_dir():
        return Path(text)
    if looks_local(text) or Path(text).exists():
        raise FileNotFoundError(f"model folder not found: {text}")
    import huggingface_hub

    return Path(huggingface_hub.snapshot_download(text, **download_kwargs))


def _flatten(metrics: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def metrics_from_results(results: dict[str, Any], command: str | None = None) -> dict[str, Any]:
    """The model card's metrics from a `latentfuse evaluate` results.json: FID and KID (and FCD
    where measured) per client and pooled, with how they were measured."""
    if not {"clients", "pooled", "num_samples"} <= results.keys():
        raise ValueError(
            "metrics: not a `latentfuse evaluate` results.json (needs clients, pooled and "
            f"num_samples; got keys {sorted(results)})"
        )

    def scores(entry: dict[str, Any]) -> dict[str, Any]:
        out = {k: round(entry[k], 4) for k in ("fid", "kid") if entry.get(k) is not None}
        if entry.get("fcd") is not None:
            out["fcd"] = round(entry["fcd"], 4)
        return out

    metrics = {f"client_{cid}": scores(e) for cid, e in sorted(results["clients"].items())}
    metrics["pooled"] = scores(results["pooled"])
    settings = results.get("settings", {})
    first = next(iter(results["clients"].values()), {})
    # Results written before the sampler was recorded ran the model folder's DDPMScheduler.
    sampler = settings.get("scheduler", "ddpm")
    steps = f"{sampler.upper()}-{settings.get('num_inference_steps', '?')}"
    steps += " ancestral" if sampler == "ddpm" else ""
    metrics["note"] = (
        f"{command or 'latentfuse evaluate'}: {results['num_samples']} generated per client "
        f"({steps}, seed {settings.get('seed', '?')}) vs "
        f"its {first.get('num_real', '?')} held-out real images; FID is biased high at small "
        f"sample counts; FCD: {first.get('fcd_status', 'not measured')}"
    )
    return metrics


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def model_card(description: dict[str, Any], metrics: dict[str, Any] | None = None) -> str:
    """README.md for a CollaFuse model folder, from its `collafuse.json` and measured metrics."""
    clients = description.get("clients", {})
    cuts = sorted({int(c["t_cut"]) for c in clients.values()})
    data = description.get("data", {})
    measured = _flatten({**description.get("metrics", {}), **(metrics or {})})
    lines = [
        "---",
        "library_name: diffusers",
        "tags: [latentfuse, collafuse, latent-diffusion, split-learning]",
        "---",
        "",
        "# CollaFuse latent diffusion model",
        "",
        "A server denoiser for the high-noise timesteps `t >= t_cut` and one denoiser per client",
        "for `t < t_cut` (CollaFuse, arXiv 2406.14429), over the latents of a frozen autoencoder.",
        "Load it with `latentfuse.CollaFusePipeline.from_pretrained`.",
        "",
        f"- cut point(s) t_cut: {', '.join(map(str, cuts)) or 'none'}"
        f" of T = {description.get('num_train_timesteps', '?')} timesteps",
        f"- server conditioning: {description.get('server_labels', '?')}",
        f"- objective: {description.get('objective', '?')}, "
        f"weighting: {description.get('weighting', '?')}, "
        f"release policy: {description.get('release_policy', '?')}",
        f"- data set: {data.get('source', '?')} ({data.get('partition', '?')} partition, "
        f"{data.get('num_clients', len(clients))} clients)",
        f"- autoencoder sha256: `{description.get('vae_sha256', 'unknown')}`",
        "",
        "## Clients",
        "",
        "| client | t_cut | classes | class names |",
        "| --- | --- | --- | --- |",
    ]
    for cid in sorted(clients, key=int):
        client = clients[cid]
        names = ", ".join(client.get("class_names", []))
        lines.append(f"| {cid} | {client['t_cut']} | {client['classes']} | {names} |")
    lines += ["", "## Metrics", ""]
    if measured:
        lines += ["| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {_cell(v)} |" for k, v in measured.items()]
    else:
        lines.append("No metrics were measured for this model.")
    return "\n".join(lines) + "\n"


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    token: str | None = None,
    private: bool = False,
    commit_message: str = "Upload CollaFuse model",
) -> str:
    """Create the model repo (if needed) and upload `folder` to it; returns the commit URL."""
    import httpx
    import huggingface_hub

    try:
        repo = huggingface_hub.create_repo(repo_id, token=token, private=private, exist_ok=True)
        commit = huggingface_hub.upload_folder(
            repo_id=getattr(repo, "repo_id", repo_id),
            folder_path=str(folder),
            token=token,
            commit_message=commit_message,
        )
    except (httpx.TransportError, OSError) as error:  # requests' errors are OSErrors
        if isinstance(error, FileNotFoundError):
            raise
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
        raise ConnectionError(
            f"push_to_hub {repo_id}: cannot reach the Hugging Face Hub at {endpoint} "
            f"({type(error).__name__}: {error}); is this machine offline? The model folder "
            f"itself is complete: {folder}"
        ) from None
    return str(getattr(commit, "commit_url", commit))
