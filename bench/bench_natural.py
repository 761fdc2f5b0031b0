"""What a new user gets on natural photos: `latentfuse train` with its defaults on a folder of
CIFAR-10 classes, judged by a classifier that saw only real CIFAR-10 images of those classes.

    OMP_NUM_THREADS=2 python bench/bench_natural.py --work runs/natural \
        --out results/natural [--classes 3 5] [--seeds 0 1] [--minutes 20] [--resume]

Each point (number of classes k, seed): the first k of NATURAL_CLASSES, 300 training images of
each (drawn by the seed from the CIFAR-10 train split) as a user's ImageFolder; `latentfuse
train --data DIR --output-dir OUT --minutes M train.seed=SEED` with every other setting at its
default (k clients, each holding its class); then per client `--num-images` samples at the
model's own guidance and sampler defaults, classified. The judge is a small CNN trained on the
other train-split images of the k classes (none of the user's 300); its accuracy on the test
split's images of the k classes, as they are and after the shipped autoencoder's round trip, is
the ceiling a generated image could reach. Recognition of a client = the share of its samples
the judge calls its class; chance = 1/k. Target (issue 32): every client clearly above chance
(a one-sided binomial test at p < 0.01) and the mean at least half the reconstruction ceiling.
Points are kept in `--work` as they finish (`--resume` continues a point's training and skips
scored points); the report is `<out>.json` and `<out>.md`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from latentfuse.checkpointing import atomic_write_json
from latentfuse.data.autoencoder import decode, encode, load_vae
from latentfuse.data.datasets import load_cifar10, load_image
from latentfuse.paths import DEFAULT_VAE_DIR

# the trial of issue 32 first (cat, ship, frog), then two more for the five-class point
NATURAL_CLASSES = ("cat", "ship", "frog", "automobile", "horse")
PER_CLASS = 300


def pick_images(classes: tuple[str, ...], seed: int) -> dict[str, list[Path]]:
    """PER_CLASS train-split images of each class, drawn by `seed`."""
    train = load_cifar10("train")
    chosen = {}
    for name in classes:
        label = train.class_names.index(name)
        paths = [r.path for r in train.records if r.label == label]
        chosen[name] = sorted(random.Random(seed).sample(paths, PER_CLASS))
    return chosen


def make_folder(chosen: dict[str, list[Path]], folder: Path) -> None:
    """The user's ImageFolder (copies: nothing of the data set is committed)."""
    if folder.is_dir():
        return
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for name, paths in chosen.items():
        (tmp / name).mkdir(parents=True)
        for path in paths:
            shutil.copy(path, tmp / name / path.name)
    tmp.rename(folder)


class Judge(nn.Module):
    """A small CNN classifier for 32x32 images in [-1, 1]."""

    def __init__(self, classes: int):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1),
                nn.BatchNorm2d(cout),
                nn.ReLU(),
                nn.Conv2d(cout, cout, 3, padding=1),
                nn.BatchNorm2d(cout),
                nn.ReLU(),
                nn.MaxPool2d(2),
            )

        self.features = nn.Sequential(block(3, 32), block(32, 64), block(64, 128))
        self.head = nn.Linear(128, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images).mean((2, 3)))


def load_split(classes: tuple[str, ...], subset: str, exclude: set[Path]) -> tuple:
    """(images (n, 3, 32, 32) in [-1, 1], labels 0..k-1) of `classes` in a CIFAR-10 split."""
    data = load_cifar10(subset)
    wanted = {data.class_names.index(name): k for k, name in enumerate(classes)}
    records = [r for r in data.records if r.label in wanted and r.path not in exclude]
    images = torch.stack([load_image(r.path, 32) for r in records])
    return images, torch.tensor([wanted[r.label] for r in records])


def accuracy(judge: Judge, images: torch.Tensor, labels: torch.Tensor) -> float:
    """The judge's accuracy on `images`."""
    return float((predict(judge, images) == labels).float().mean())


@torch.no_grad()
def predict(judge: Judge, images: torch.Tensor) -> torch.Tensor:
    """The judge's class for each image."""
    judge.eval()
    return torch.cat([judge(images[i : i + 256]).argmax(1) for i in range(0, len(images), 256)])


def train_judge(classes: tuple[str, ...], exclude: set[Path], folder: Path, epochs: int) -> dict:
    """The judge (cached in `folder`) and its ceilings: accuracy on the test split's images of
    `classes`, as they are and after the autoencoder's round trip."""
    weights = folder / "judge.pt"
    images, labels = load_split(classes, "train", exclude)
    judge = Judge(len(classes))
    if weights.is_file():
        judge.load_state_dict(torch.load(weights))
    else:
        torch.manual_seed(0)
        optimiser = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=5e-4)
        steps = epochs * math.ceil(len(images) / 128)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, 2e-3, total_steps=steps)
        for epoch in range(epochs):
            judge.train()
            order = torch.randperm(len(images))
            for start in range(0, len(images), 128):
                batch = images[order[start : start + 128]]
                flip = torch.rand(len(batch)) < 0.5  # the one augmentation: mirror
                batch = torch.where(flip.view(-1, 1, 1, 1), batch.flip(3), batch)
                loss = nn.functional.cross_entropy(judge(batch), labels[order[start : start + 128]])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                schedule.step()
            print(f"judge epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}", flush=True)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(judge.state_dict(), weights)
    test, test_labels = load_split(classes, "test", set())
    vae = load_vae(str(DEFAULT_VAE_DIR))
    with torch.no_grad():
        rebuilt = torch.cat(
            [decode(vae, encode(vae, test[i : i + 256])) for i in range(0, len(test), 256)]
        )
    return {
        "judge": judge,
        "real_accuracy": accuracy(judge, test, test_labels),
        "reconstructed_accuracy": accuracy(judge, rebuilt, test_labels),
        "judge_train_images": len(images),
    }


def train_model(data: Path, out: Path, seed: int, minutes: float, log: Path) -> float:
    """`latentfuse train` with its defaults (resumed if `out` holds a run); wall seconds."""
    command = ["latentfuse", "train", "--data", str(data), "--output-dir", str(out)]
    command += ["--minutes", str(minutes), f"train.seed={seed}"]
    if (out / "checkpoint").exists():
        command.append("--resume")
    start = time.perf_counter()
    with log.open("a") as sink:
        subprocess.run(command, check=True, stdout=sink, stderr=subprocess.STDOUT)
    return time.perf_counter() - start


def binomial_tail(hits: int, n: int, p: float) -> float:
    """P(X >= hits) for X ~ Binomial(n, p)."""
    return sum(math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(hits, n + 1))


@torch.no_grad()
def score_model(model: Path, classes: tuple[str, ...], judge: Judge, num_images: int) -> dict:
    """Per client: its class, the judge's calls of its samples, recognition and its p-value."""
    from latentfuse.description import default_guidance
    from latentfuse.pipelines import CollaFusePipeline

    pipe = CollaFusePipeline.from_pretrained(str(model))
    pipe.set_progress_bar_config(disable=True)
    description = pipe.collafuse_config
    guidance = default_guidance(description)
    clients = []
    for client_id in sorted(int(c) for c in description["clients"]):
        held = description["clients"][str(client_id)]["class_names"]
        generators = [torch.Generator().manual_seed(10_000 + i) for i in range(num_images)]
        images = pipe(
            client_id=client_id, generator=generators, guidance_scale=guidance, output_type="pt"
        ).images
        calls = predict(judge, images * 2 - 1)
        counts = torch.bincount(calls, minlength=len(classes)).tolist()
        own = [classes.index(name) for name in held]
        hits = sum(counts[k] for k in own)
        chance = len(own) / len(classes)
        clients.append(
            {
                "client": client_id,
                "classes": held,
                "recognition": hits / num_images,
                "chance": chance,
                "p_above_chance": binomial_tail(hits, num_images, chance),
                "judged_as": dict(zip(classes, counts, strict=True)),
            }
        )
    return {"guidance_scale": guidance, "num_images": num_images, "clients": clients}


def report(out: Path, points: list[dict], meta: dict) -> None:
    """`<out>.json` and a table per point in `<out>.md`."""
    atomic_write_json(out.with_suffix(".json"), {**meta, "points": points})
    lines = ["# Natural photos, `latentfuse train` defaults", "", meta["what"], ""]
    lines += ["| classes | seed | steps | minutes | client | class | recognition | chance | "]
    lines[-1] += "p above chance | judged as |"
    lines += ["|---|---|---|---|---|---|---|---|---|---|"]
    for point in points:
        for c in point["clients"]:
            calls = ", ".join(f"{k} {v}" for k, v in c["judged_as"].items())
            lines.append(
                f"| {point['num_classes']} | {point['seed']} | {point['steps']} | "
                f"{point['train_seconds'] / 60:.1f} | {c['client']} | {', '.join(c['classes'])} | "
                f"{c['recognition']:.0%} | {c['chance']:.0%} | {c['p_above_chance']:.2g} | "
                f"{calls} |"
            )
    lines += ["", "| classes | judge on real test images | on reconstructed | mean recognition | "]
    lines[-1] += "half the ceiling | every client above chance (p < 0.01) |"
    lines += ["|---|---|---|---|---|---|"]
    for point in points:
        mean = sum(c["recognition"] for c in point["clients"]) / len(point["clients"])
        every = all(c["p_above_chance"] < 0.01 for c in point["clients"])
        lines.append(
            f"| {point['num_classes']} (seed {point['seed']}) | {point['real_accuracy']:.1%} | "
            f"{point['reconstructed_accuracy']:.1%} | {mean:.1%} | "
            f"{point['reconstructed_accuracy'] / 2:.1%} | {'yes' if every else 'no'} |"
        )
    lines += ["", f"Produced by: `{meta['command']}`", ""]
    out.with_suffix(".md").write_text("\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="one folder per point")
    parser.add_argument("--out", type=Path, required=True, help="report path without suffix")
    parser.add_argument("--classes", type=int, nargs="+", default=[3, 5])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--minutes", type=float, default=20.0, help="latentfuse train --minutes")
    parser.add_argument("--num-images", type=int, default=100, help="samples per client")
    parser.add_argument("--judge-epochs", type=int, default=8)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    if any(k < 2 or k > len(NATURAL_CLASSES) for k in args.classes):
        parser.error(f"--classes: each in [2, {len(NATURAL_CLASSES)}], got {args.classes}")
    if args.work.is_dir() and any(args.work.iterdir()) and not args.resume:
        parser.error(f"{args.work} holds points: pass --resume to continue")
    points = []
    for k in args.classes:
        classes = NATURAL_CLASSES[:k]
        for seed in args.seeds:
            folder = args.work / f"classes{k}-seed{seed}"
            scored = folder / "score.json"
            if scored.is_file():
                points.append(json.loads(scored.read_text()))
                continue
            chosen = pick_images(classes, seed)
            make_folder(chosen, folder / "data")
            exclude = {p for paths in chosen.values() for p in paths}
            judged = train_judge(classes, exclude, folder, args.judge_epochs)
            seconds = train_model(
                folder / "data", folder / "run", seed, args.minutes, folder / "log"
            )
            described = json.loads((folder / "run" / "model" / "collafuse.json").read_text())
            point = {
                "num_classes": k,
                "seed": seed,
                "classes": list(classes),
                "steps": described.get("training", {}).get("steps"),
                "train_seconds": seconds,
                "real_accuracy": judged["real_accuracy"],
                "reconstructed_accuracy": judged["reconstructed_accuracy"],
                "judge_train_images": judged["judge_train_images"],
                **score_model(folder / "run" / "model", classes, judged["judge"], args.num_images),
            }
            atomic_write_json(scored, point)
            points.append(point)
            print(json.dumps({k: v for k, v in point.items() if k != "clients"}), flush=True)
    meta = {
        "command": " ".join(["OMP_NUM_THREADS=2 python bench/bench_natural.py", *sys.argv[1:]]),
        "threads": os.environ.get("OMP_NUM_THREADS"),
        "what": f"{PER_CLASS} CIFAR-10 train images per class as a user's folder, "
        "`latentfuse train` defaults; a judge trained on the other train images of those "
        "classes; recognition = share of a client's samples judged its class.",
    }
    report(args.out, points, meta)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
