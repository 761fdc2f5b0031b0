"""The data-scarce collaboration benchmark: does a client with little data get a better
generator by collaborating (split at a cut) than alone (ICM, and ICM-big with the server
UNet's size), and how close does it come to pooling the data (GM)?

Every point is one (images per client, model, seed) run trained for the same number of steps
through the same code path (`runner.train`), its EMA model scored per client and pooled:
FID and KID against the client's held-out images (bootstrap standard errors over the
generated images), the memorisation rate (the ratio test of Gu et al., "On Memorization in
Diffusion Models": a generated image whose nearest training image of that client is closer
than 1/3 of the distance to the second nearest, in pixel space), and the privacy suite's
re-identification and membership figures. Points are combined over seeds by
`aggregate`; `verdicts` applies the issue's rule (a difference holds when it exceeds twice
the combined standard error).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy import stats
from scipy.stats import binomtest

from experiments.frontier_report import judge
from experiments.grid import grid_folder, keyed, walk
from experiments.privacy_sweep import PrivacySweepSettings, evaluate_privacy_point
from experiments.sweep import _jsonable, same_config, train_point
from latentfuse.checkpointing import atomic_write_json
from latentfuse.config import RunConfig, apply_overrides, config_from_dict, first_form
from latentfuse.evaluation.features import InceptionExtractor, extract_features
from latentfuse.evaluation.generate import generate_images, sample_labels
from latentfuse.evaluation.metrics import FeatureStats, distribution_scores, frechet_distance
from latentfuse.evaluation.reference import cached_reference_stats, load_real_images
from latentfuse.training.setup import build_run

logger = logging.getLogger(__name__)

FORMAT = 1
POINTLESS_SETTINGS = ("images_per_client", "models", "seeds", "device")  # no effect on a score
MEMORISATION_RATIO = 1 / 3  # Gu et al.: nearest closer than a third of the second nearest


@dataclass(frozen=True)
class ModelSpec:
    """One model of the grid: a name (GM, split, ICM, ICM-big, ...), its cut and overrides."""

    name: str
    t_cut: int
    overrides: tuple[str, ...] = ()
    core: bool = True  # the core grid runs first; the others (ablations) after all of it
    # sample with the largest number of inference steps whose chain makes no more network
    # evaluations than the benchmark's num_inference_steps (a client started above the cut
    # re-runs levels: without this it would get extra evaluations)
    match_evaluations: bool = False

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"model name must be letters, digits, - or _, got {self.name!r}")
        if self.t_cut < 0:
            raise ValueError(f"model {self.name}: t_cut must be >= 0, got {self.t_cut}")


@dataclass(frozen=True)
class BenchmarkSettings:
    """The grid and how each point is scored (the config's [benchmark] table)."""

    images_per_client: tuple[int, ...] = (250, 2000)
    models: tuple[ModelSpec, ...] = ()
    seeds: tuple[int, ...] = (0, 1)
    num_samples: int = 1000  # generated per point, split evenly over the clients
    num_inference_steps: int = 25
    scheduler: str = "ddim"
    guidance_scale: float = 1.0
    num_bootstrap: int = 40  # draws over generated images for the FID/KID standard errors
    worst_cases: int = 8  # generated images with the lowest nearest/second ratio, per point
    privacy: bool = True  # the privacy suite's re-identification and membership figures
    device: str = "cpu"

    def __post_init__(self) -> None:
        if not self.images_per_client or min(self.images_per_client) < 2:
            raise ValueError(f"images_per_client must be >= 2, got {self.images_per_client}")
        if not self.models:
            raise ValueError("benchmark.models is empty: list at least one model")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"benchmark.models: names must be unique, got {names}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be unique, got {self.seeds}")
        for name in ("num_samples", "num_inference_steps", "num_bootstrap"):
            if getattr(self, name) < 2:
                raise ValueError(f"benchmark.{name} must be >= 2, got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, values: dict) -> BenchmarkSettings:
        """From the TOML table, naming any unknown key."""
        values = dict(values)
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown [benchmark] keys {sorted(unknown)}; known: {sorted(known)}")
        models = []
        for entry in values.pop("models", []):
            extra = set(entry) - {"name", "t_cut", "overrides", "core", "match_evaluations"}
            if extra:
                raise ValueError(f"[[benchmark.models]] {entry.get('name')}: unknown {extra}")
            overrides = tuple(entry.get("overrides", ()))
            models.append(
                ModelSpec(
                    entry["name"],
                    entry["t_cut"],
                    overrides,
                    entry.get("core", True),
                    entry.get("match_evaluations", False),
                )
            )
        for name in ("images_per_client", "seeds"):
            if name in values:
                values[name] = tuple(values[name])
        return cls(models=tuple(models), **values)


@dataclass(frozen=True)
class BenchmarkPoint:
    """One run of the grid."""

    images_per_client: int
    model: ModelSpec
    seed: int

    @property
    def name(self) -> str:
        """The point's folder name, e.g. `n0250-split-t0100-seed0`."""
        n, model = self.images_per_client, self.model
        return f"n{n:04d}-{model.name}-t{model.t_cut:04d}-seed{self.seed}"


def benchmark_points(settings: BenchmarkSettings) -> list[BenchmarkPoint]:
    """The core grid first, then the other models; within each, smallest data size first,
    then seed, then model: partial results answer the main question (250 images, every model,
    one seed) first."""
    return [
        BenchmarkPoint(n, model, seed)
        for core in (True, False)
        for n in sorted(settings.images_per_client)
        for seed in settings.seeds
        for model in settings.models
        if model.core == core
    ]


def point_config(config: RunConfig, point: BenchmarkPoint) -> RunConfig:
    """The base config with the point's data size, cut, training seed and overrides; the data
    partition (data.seed) stays fixed across seeds."""
    values = copy.deepcopy(config.to_dict())
    apply_overrides(
        values,
        [
            f"data.max_images_per_client={point.images_per_client}",
            f"split.t_cut={point.model.t_cut}",
            f"train.seed={point.seed}",
            *point.model.overrides,
        ],
    )
    return config_from_dict(values)


def sample_gradients(config: RunConfig, folder: Path) -> dict:
    """Sample-gradients each network received: steps x batch size (x accumulation)."""
    described = json.loads((folder / "model" / "collafuse.json").read_text())
    train = config.train
    steps = train.max_steps * train.gradient_accumulation_steps
    clients = described["clients"]
    out = {
        f"client_{cid}": steps * train.client_batch_size
        for cid, info in clients.items()
        if info["t_cut"] > 0
    }
    if any(info["t_cut"] < config.split.num_train_timesteps for info in clients.values()):
        out["server"] = steps * train.server_batch_size
        out["server_per_client"] = out["server"] / len(clients)
    return out


def _rate(hits: int, n: int) -> dict:
    """A proportion with its two-sided Clopper-Pearson 95% interval."""
    ci = binomtest(hits, n).proportion_ci(0.95) if n else None
    return {
        "value": hits / n if n else None,
        "hits": hits,
        "n": n,
        "ci": [float(ci.low), float(ci.high)] if ci else [None, None],
    }


def _binomial_se(rate: dict) -> float | None:
    """sqrt(p (1 - p) / n), with p at least 1/n (a rate of 0 is not known exactly)."""
    if not rate["n"]:
        return None
    p = min(max(rate["value"], 1 / rate["n"]), 1 - 1 / rate["n"])
    return float(np.sqrt(p * (1 - p) / rate["n"]))


def memorisation(generated: torch.Tensor, training: torch.Tensor) -> dict:
    """The ratio test on uint8 images (n, 3, h, w) against a client's training images (m, ...):
    per generated image the distances to its nearest and second-nearest training image in
    pixel space; memorised when nearest < MEMORISATION_RATIO x second."""
    if len(training) < 2:
        raise ValueError(f"the ratio test needs >= 2 training images, got {len(training)}")
    g = generated.flatten(1).double() / 255
    t = training.flatten(1).double() / 255
    distances = torch.cdist(g, t)
    two = distances.topk(2, dim=1, largest=False)
    ratio = two.values[:, 0] / two.values[:, 1].clamp_min(1e-12)
    hits = int((ratio < MEMORISATION_RATIO).sum())
    return {
        "rate": _rate(hits, len(g)),
        "median_ratio": float(ratio.median()),
        "ratio": ratio,
        "nearest": two.indices[:, 0],
    }


def fid_kid_standard_errors(
    generated: np.ndarray, real: FeatureStats, draws: int, seed: int = 0
) -> dict:
    """Bootstrap standard errors over the generated images of FID and of the full-set unbiased
    KID (the cubic polynomial kernel; resampled pairs of one image left out of its mean)."""
    g = np.asarray(generated, np.float64)
    r = np.asarray(real.features, np.float64)
    d, n = g.shape[1], len(g)
    k_gg = (g @ g.T / d + 1) ** 3
    k_gr = ((g @ r.T / d + 1) ** 3).mean(1)  # (n,): each generated image against every real one
    k_rr = 0.0
    for start in range(0, len(r), 1000):  # the real set's off-diagonal mean, in blocks
        block = (r[start : start + 1000] @ r.T / d + 1) ** 3
        k_rr += block.sum() - np.trace(block[:, start : start + 1000])
    k_rr /= len(r) * (len(r) - 1)
    rng = np.random.default_rng(seed)
    fids, kids = [], []
    for _ in range(draws):
        idx = rng.integers(0, n, n)
        distinct = idx[:, None] != idx[None, :]
        if not distinct.any():  # every draw the same image: no pair to average
            continue
        kids.append(k_gg[np.ix_(idx, idx)][distinct].mean() + k_rr - 2 * k_gr[idx].mean())
        fids.append(frechet_distance(FeatureStats.from_features(g[idx].astype(np.float32)), real))
    return {"fid_se": float(np.std(fids, ddof=1)), "kid_se": float(np.std(kids, ddof=1))}


def _scores(generated: np.ndarray, real: FeatureStats, settings: BenchmarkSettings, seed: int):
    stats = FeatureStats.from_features(generated)
    scores = distribution_scores(stats, real, seed=seed)
    errors = fid_kid_standard_errors(generated, real, settings.num_bootstrap, seed)
    return {
        "fid": scores["fd"],
        "fid_se": errors["fid_se"],
        "kid": scores["kid"],
        "kid_se": errors["kid_se"],
        "kid_std_subsets": scores["kid_std"],
        "num_generated": scores["num_generated"],
        "num_real": scores["num_real"],
    }


@dataclass
class _Shared:
    """What every point's scoring shares: Inception and the real images' features."""

    inception: InceptionExtractor
    references: dict = field(default_factory=dict)  # (client, eval indices) -> FeatureStats


def chain_evaluations(pipe, num_inference_steps: int) -> int:
    """Denoiser evaluations of one image's chain (server part plus client part) at
    `num_inference_steps`, the most over the pipeline's clients (guidance doubles every
    arm's count alike and is left out)."""
    from latentfuse.pipelines.sampling import split_schedule

    pipe.scheduler.set_timesteps(num_inference_steps)
    description = pipe.collafuse_config
    counts = []
    for cid in pipe.client_ids:
        server, client = split_schedule(pipe.scheduler, description, cid)
        counts.append(len(server) + len(client))
    return max(counts)


def matched_inference_steps(pipe, budget: int) -> int:
    """The largest number of inference steps whose chain makes at most `budget` evaluations."""
    for steps in range(budget, 0, -1):
        if chain_evaluations(pipe, steps) <= budget:
            return steps
    raise ValueError(f"no number of inference steps fits {budget} network evaluations")


def score_point(
    config: RunConfig,
    folder: Path,
    settings: BenchmarkSettings,
    shared: _Shared,
    match_evaluations: bool = False,
) -> dict:
    """Sample and score one trained point, per client and pooled."""
    from latentfuse.deploy.config import sampling_scheduler
    from latentfuse.pipelines import CollaFusePipeline

    start = time.time()
    run = build_run(config, folder)
    pipe = CollaFusePipeline.from_pretrained(folder / "model").to(settings.device)
    pipe.scheduler = sampling_scheduler(settings.scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    steps = settings.num_inference_steps
    if match_evaluations:
        steps = matched_inference_steps(pipe, settings.num_inference_steps)
    evaluations = chain_evaluations(pipe, steps)
    resolution, per_client = config.data.resolution, settings.num_samples // len(run.shares)
    clients, gen_all, real_all, worst = {}, [], [], []
    for share in run.shares:
        cid = share.client_id
        key = (cid, share.eval_indices)
        if key not in shared.references:
            shared.references[key] = cached_reference_stats(
                shared.inception, run.dataset, share.eval_indices, resolution, 64, f"client {cid}"
            )
        real = shared.references[key]
        eval_labels = [run.dataset.records[i].label for i in share.eval_indices]
        labels = sample_labels(eval_labels, per_client, config.train.seed * 1_000_003 + cid)
        images = generate_images(
            pipe,
            cid,
            labels,
            config.train.seed,
            steps,
            64,
            guidance_scale=settings.guidance_scale,
        )
        features = extract_features(shared.inception, images, 64, f"inception client {cid}")
        features = np.asarray(features, np.float32)
        training = load_real_images(run.dataset, share.train_indices, resolution)
        memo = memorisation(images, training)
        order = memo["ratio"].argsort()[: settings.worst_cases]
        worst += [(float(memo["ratio"][i]), images[i], training[memo["nearest"][i]]) for i in order]
        clients[str(cid)] = {
            **_scores(features, real, settings, config.train.seed),
            "memorization": memo["rate"],
            "median_nn_ratio": memo["median_ratio"],
        }
        gen_all.append(features)
        real_all.append(real.features)
        logger.info("%s client %d: %s", folder.name, cid, clients[str(cid)])
    generated = np.concatenate(gen_all)
    real = FeatureStats.from_features(np.concatenate(real_all))
    hits = sum(c["memorization"]["hits"] for c in clients.values())
    n = sum(c["memorization"]["n"] for c in clients.values())
    pooled = {
        **_scores(generated, real, settings, config.train.seed),
        "memorization": _rate(hits, n),
    }
    worst.sort(key=lambda item: item[0])
    _save_worst(worst[: settings.worst_cases], folder / "worst-cases.png")
    return {
        "clients": clients,
        "pooled": pooled,
        "worst_ratios": [round(w[0], 4) for w in worst[: settings.worst_cases]],
        "num_inference_steps": steps,
        "network_evaluations": evaluations,
        "eval_seconds": time.time() - start,
    }


def _save_worst(worst: list, path: Path) -> None:
    """Top row: the generated images closest to memorisation; bottom: their nearest training
    image of that client."""
    from torchvision.utils import save_image

    if not worst:
        return
    top = torch.stack([w[1] for w in worst]).float() / 255
    bottom = torch.stack([w[2] for w in worst]).float() / 255
    save_image(torch.cat([top, bottom]), path, nrow=len(worst), padding=1)


PRIVACY_SETTINGS = PrivacySweepSettings(
    num_queries=200,
    num_members=250,
    num_model_members=200,
    num_reconstructions=50,
    num_mean_images=250,
)


def point_key(config: RunConfig, settings: BenchmarkSettings) -> dict:
    """What a point's row depends on: its run config (hashed in its first form, so
    renaming or adding a key keeps the rows) and the scoring settings."""
    text = json.dumps(_jsonable(first_form(config.to_dict())), sort_keys=True)
    return {"config": hashlib.sha256(text.encode()).hexdigest()[:16], "score": _score_key(settings)}


def _done(folder: Path, key: dict) -> bool:
    """Whether `folder` holds a row made under `key`."""
    path = folder / "row.json"
    return path.is_file() and json.loads(path.read_text()).get("key") == key


def _score_key(settings: BenchmarkSettings) -> dict:
    """What a point's scores depend on beyond its own config."""
    return _jsonable({k: v for k, v in asdict(settings).items() if k not in POINTLESS_SETTINGS})


def evaluate_point(
    config: RunConfig,
    folder: Path,
    settings: BenchmarkSettings,
    shared: _Shared,
    match_evaluations: bool = False,
    cache: str = "benchmark.json",
) -> dict:
    """Quality, memorisation and (optionally) privacy of one trained point, kept in `cache`
    beside it and reused while the scoring settings are unchanged."""
    key = {**_score_key(settings), **({"match_evaluations": True} if match_evaluations else {})}

    def compute() -> dict:
        result = score_point(config, folder, settings, shared, match_evaluations)
        if settings.privacy:
            privacy = evaluate_privacy_point(config, folder, PRIVACY_SETTINGS)
            result["privacy"] = privacy["pooled"]
        return {"result": _jsonable(result)}

    return keyed(folder / cache, key, compute)["result"]


def run_benchmark(
    config: RunConfig,
    out_dir: str | Path,
    settings: BenchmarkSettings,
    resume: bool = False,
    shard: tuple[int, int] = (0, 1),
    on_point=None,
    known: dict[str, dict] | None = None,
    models: list[str] | None = None,
) -> list[dict]:
    """Train and score every point of this shard (points i with i % n == k; (0, 1): all),
    skipping finished ones and points another live job holds (`claim`): several jobs started
    with the same command share the grid. `known` (name -> row, e.g. the committed report's
    rows) counts as finished where its key matches the point's config and scoring, so a
    fresh machine does not retrain what was committed. `models`: only the points of these
    models (to finish their seeds first). Returns every finished point's row."""
    known = known or {}
    out_dir = grid_folder(out_dir, resume, "benchmark")
    k, n = shard
    points = [p for i, p in enumerate(benchmark_points(settings)) if i % n == k]
    if models is not None:
        unknown = sorted(set(models) - {m.name for m in settings.models})
        if unknown:
            raise ValueError(f"--models: no model named {unknown} in the grid")
        points = [p for p in points if p.model.name in models]
    shared = _Shared(InceptionExtractor(None, settings.device))

    def finished(point: BenchmarkPoint) -> bool:
        key = point_key(point_config(config, point), settings)
        return _done(out_dir / point.name, key) or known.get(point.name, {}).get("key") == key

    def work(point: BenchmarkPoint) -> None:
        if finished(point):  # another job finished it while this one waited
            return
        cfg = point_config(config, point)
        folder, key = out_dir / point.name, point_key(cfg, settings)
        _, train_seconds = train_point(cfg, folder)
        result = evaluate_point(cfg, folder, settings, shared, point.model.match_evaluations)
        row = point_row(cfg, point, folder, result, train_seconds)
        atomic_write_json(folder / "row.json", {**row, "key": key})
        if on_point is not None:
            on_point()

    walk(
        points,
        lambda p: out_dir / p.name,
        work,
        desc=f"collaboration benchmark ({k}/{n})",
        done=finished,
    )
    return collect_rows(out_dir, settings, known)


def point_row(
    config: RunConfig, point: BenchmarkPoint, folder: Path, result: dict, train_seconds: float
) -> dict:
    """The results row of one point: the issue's fields first, then the detail."""
    pooled = result["pooled"]
    described = json.loads((folder / "model" / "collafuse.json").read_text())
    return {
        **release_fields(described),
        "name": point.name,
        "images_per_client": point.images_per_client,
        "model": point.model.name,
        "t_cut": point.model.t_cut,
        "seed": point.seed,
        "steps": config.train.max_steps,
        "fid": pooled["fid"],
        "fid_se": pooled["fid_se"],
        "kid": pooled["kid"],
        "kid_se": pooled["kid_se"],
        "memorization": pooled["memorization"]["value"],
        "memorization_se": _binomial_se(pooled["memorization"]),
        "memorization_ci": pooled["memorization"]["ci"],
        "sample_gradients": sample_gradients(config, folder),
        "costs": denoiser_costs(config),
        "overrides": list(point.model.overrides),
        "train_seconds": train_seconds,
        "eval_seconds": result["eval_seconds"],
        "num_inference_steps": result.get("num_inference_steps"),
        "network_evaluations": result.get("network_evaluations"),
        "worst_ratios": result["worst_ratios"],
        "pooled": pooled,
        "clients": result["clients"],
        "privacy": result.get("privacy"),
    }


def denoiser_costs(config: RunConfig) -> dict:
    """What a point's denoisers cost: parameters (all and trainable) of the server's and client
    0's, and the client's training FLOPs per step (one forward and backward at its batch size,
    counted by torch's FlopCounterMode; a LoRA client still runs its frozen base)."""
    from torch.utils.flop_counter import FlopCounterMode

    from latentfuse.deploy.config import latent_shape
    from latentfuse.training.jobs import DenoiserSpec, client_denoiser, server_denoiser
    from latentfuse.training.pretrained import trainable_parameters

    channels, size, _ = latent_shape(config)
    spec = DenoiserSpec("class", 10)
    costs: dict = {}
    state = torch.random.get_rng_state()  # the builders seed torch: leave the caller's stream
    try:
        if config.client_t_cut(0) > 0:
            client = client_denoiser(config, 0, spec, size, channels)
            batch = config.train.client_batch_size
            x = torch.randn(batch, channels, size, size)
            t = torch.randint(0, 1000, (batch,))
            labels = torch.zeros(batch, dtype=torch.long)
            with FlopCounterMode(display=False) as counter:
                client(x, t, class_labels=labels).sample.square().mean().backward()
            costs["client"] = {
                "parameters": sum(p.numel() for p in client.parameters()),
                "trainable": trainable_parameters(client),
                "train_flops_per_step": counter.get_total_flops(),
            }
        if config.client_t_cut(0) < config.split.num_train_timesteps:
            server = server_denoiser(config, spec, size, channels)
            costs["server"] = {
                "parameters": sum(p.numel() for p in server.parameters()),
                "trainable": trainable_parameters(server),
            }
    finally:
        torch.random.set_rng_state(state)
    return costs


def release_fields(described: dict) -> dict:
    """What a point's model description says of its releases: the level actually used (the
    formal mode raises the configured cut), where sampling starts the client, and the formal
    guarantee with its Gaussian-DP reading (None where latents are not clipped)."""
    entries = list(described["clients"].values())
    guarantees = list(described.get("privacy", {}).get("clients", {}).values())
    epsilons = [g.get("epsilon") for g in guarantees]
    gdp = [g.get("gaussian_dp") for g in guarantees if g.get("gaussian_dp")]
    return {
        "release_t": max(e.get("release_cut", e["t_cut"]) for e in entries) - 1,
        "client_start": entries[0].get("client_start"),
        "epsilon": max(epsilons) if epsilons and None not in epsilons else None,
        "gaussian_dp": max(gdp, key=lambda g: g["mu"] or 0) if gdp else None,
    }


def collect_rows(
    out_dir: Path,
    settings: BenchmarkSettings,
    known: dict[str, dict] | None = None,
    config: RunConfig | None = None,
) -> list[dict]:
    """Every finished point's row, in grid order: from its folder, else from `known`. With
    `config`, a row made under another config or scoring (its key) is left out; a row with
    no key yet (written before rows carried one) is kept for `backfill_keys`."""
    rows, known = [], known or {}
    for point in benchmark_points(settings):
        path = Path(out_dir) / point.name / "row.json"
        row = json.loads(path.read_text()) if path.is_file() else known.get(point.name)
        if row is None:
            continue
        stale = config is not None and "key" in row
        if stale and row["key"] != point_key(point_config(config, point), settings):
            continue
        rows.append(row)
    return rows


def backfill_keys(
    config: RunConfig, out_dir: Path, settings: BenchmarkSettings, rows: list[dict]
) -> list[dict]:
    """Rows written before rows carried a key get theirs, where the folder's config.json is
    the point's config and its benchmark.json was scored with these settings."""
    points = {p.name: p for p in benchmark_points(settings)}
    for row in rows:
        folder = Path(out_dir) / row["name"]
        if "key" in row or row["name"] not in points or not (folder / "config.json").is_file():
            continue
        cfg = point_config(config, points[row["name"]])
        scored = json.loads((folder / "benchmark.json").read_text()).get("key")
        trained = json.loads((folder / "config.json").read_text())
        if same_config(trained, cfg) and scored == _score_key(settings):
            row["key"] = point_key(cfg, settings)
            atomic_write_json(folder / "row.json", row)
    return rows


# ---- combining seeds and judging claims ------------------------------------------------------


def aggregate(rows: list[dict], metric: str) -> dict[tuple[int, str], dict]:
    """Per (images_per_client, model): the mean over its k seeds and its standard error
    s / sqrt(k), s the seed spread pooled over every group of this metric with two seeds or
    more (s^2 = sum (k_g - 1) var_g / sum (k_g - 1), its df beside it; the frontier report's
    rule). Without any such group s is the bootstrap error (over generated images) and df 0."""
    groups: dict[tuple[int, str], list[dict]] = {}
    for row in rows:
        if row.get(metric) is not None:
            groups.setdefault((row["images_per_client"], row["model"]), []).append(row)
    spread = [
        (len(m) - 1, float(np.var([r[metric] for r in m], ddof=1)))
        for m in groups.values()
        if len(m) > 1
    ]
    df = sum(d for d, _ in spread)
    pooled = math.sqrt(sum(d * v for d, v in spread) / df) if df else None
    out = {}
    for key, members in groups.items():
        values = np.array([r[metric] for r in members], np.float64)
        k = len(values)
        boot = float(np.sqrt(np.mean([(r.get(f"{metric}_se") or 0.0) ** 2 for r in members])))
        s = pooled if pooled is not None else boot
        out[key] = {
            "mean": float(values.mean()),
            "se": s / math.sqrt(k),
            "seed_sd": float(values.std(ddof=1)) if k > 1 else None,
            "seeds": sorted(r["seed"] for r in members),
            "t_cut": members[0]["t_cut"],
            "k": k,
            "s": s,
            "df": df,
        }
    return out


def compare(a: dict | None, b: dict | None, lower_is_better: bool = True) -> dict | None:
    """Does a beat b? The difference, its SE s sqrt(1/k_a + 1/k_b), t on the pooled df and
    the one- and two-sided p; `verdicts` judges the family together (Holm). A single-seed side
    gives no test."""
    if a is None or b is None:
        return None
    diff = b["mean"] - a["mean"] if lower_is_better else a["mean"] - b["mean"]
    return _tested(diff, [a, b])


def _tested(diff: float, groups: list[dict]) -> dict:
    """A difference of group means with its pooled-variance test (or no test)."""
    seeds = min(g.get("k", len(g.get("seeds", ())) or 1) for g in groups)
    df = groups[0].get("df", 0)
    s = groups[0].get("s")
    se = s * math.sqrt(sum(1 / g.get("k", 1) for g in groups)) if s else None
    out = {"difference": float(diff), "se": se, "seeds": seeds, "df": df}
    out.update(t=None, p=None, p_two_sided=None, p_holm=None)
    if seeds < 2 or not df:
        return {**out, "verdict": "1 seed: no verdict"}
    if not se:
        return {**out, "verdict": "no seed variance: no verdict"}
    t = diff / se
    p = float(stats.t.sf(t, df))
    return {**out, "t": t, "p": p, "p_two_sided": 2 * min(p, 1 - p), "verdict": None}


def verdicts(rows: list[dict]) -> list[dict]:
    """The issue's claims, each with its figures and verdict, for the sizes and models done."""
    out = []
    for metric in ("fid", "kid"):
        agg = aggregate(rows, metric)
        sizes = sorted({n for n, _ in agg})
        splits = sorted({m for _, m in agg if re.fullmatch(r"split-\d+", m)})  # no ablations
        for n in sizes:
            for split in splits:
                for baseline in ("ICM", "ICM-big", "GM"):
                    claim = f"{split} beats {baseline} at {n} images ({metric.upper()})"
                    if baseline == "GM":
                        claim = f"GM beats {split} at {n} images ({metric.upper()})"
                        result = compare(agg.get((n, "GM")), agg.get((n, split)))
                    else:
                        result = compare(agg.get((n, split)), agg.get((n, baseline)))
                    if result:
                        out.append({"claim": claim, **result})
        if len(sizes) >= 2:
            small, large = sizes[0], sizes[-1]
            for split in splits:
                pairs = [(agg.get((n, split)), agg.get((n, "ICM"))) for n in (small, large)]
                if all(a and b for a, b in pairs):  # the size of the gap, whichever side leads
                    gaps = [abs(b["mean"] - a["mean"]) for a, b in pairs]
                    result = _tested(gaps[0] - gaps[1], [g for pair in pairs for g in pair])
                    out.append(
                        {
                            "claim": f"the |{split} - ICM| gap shrinks from {small} to {large} "
                            f"images ({metric.upper()})",
                            **result,
                        }
                    )
    for metric in ("fid", "kid"):  # each ablation against the model it varies
        agg = aggregate(rows, metric)
        for n, model in sorted(agg):
            for suffix, label in (
                ("-original", "exact objective, inverse_lambda weighting"),
                ("-buffer4", "no buffer"),
            ):
                if model.endswith(suffix):
                    base = model[: -len(suffix)]
                    result = compare(agg.get((n, base)), agg[(n, model)])
                    if result:
                        claim = f"{base} ({label}) beats {model} at {n} images ({metric.upper()})"
                        out.append({"claim": claim, **result})
        splits = sorted({m for _, m in agg if re.fullmatch(r"split-\d+", m)})
        for n in sorted({n for n, m in agg if m == "GM-matched"}):
            for split in splits:  # GM at a split run's sample budget
                result = compare(agg[(n, "GM-matched")], agg.get((n, split)))
                if result:
                    claim = f"GM-matched beats {split} at {n} images ({metric.upper()})"
                    out.append({"claim": claim, **result})
    memo = aggregate(rows, "memorization")
    for n in sorted({n for n, _ in memo}):
        for a, b in (("ICM", "GM"), ("ICM", "split-100"), ("split-100", "GM")):
            result = compare(memo.get((n, b)), memo.get((n, a)))  # b memorises less than a
            if result:
                out.append({"claim": f"{b} memorises less than {a} at {n} images", **result})
    return judge(out)
