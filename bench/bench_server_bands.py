"""Which of the server's timesteps decide what a shapes model draws?

    python bench/bench_server_bands.py --weak runs/A --strong runs/B [--bands 800:1000 ...]

Two finished `bench/bench_train_shapes.py` work folders of the same data and architecture, a
weaker model (fewer steps) and a stronger one. For each band [lo, hi) of server timesteps it
samples with the weak model's pipeline but the strong model's server denoiser inside the band
(everything else, the clients included, stays the weak model's) and reports the share the
shapes judge recognises (50 samples a class, DDIM-50, guidance 3, fixed seeds: the bench's
own `recognition`). A band whose swap alone lifts the weak model to the strong model's figure
is where the weak server falls short; `--clients` also swaps the clients alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train_shapes import load_folder, recognition, train_classifier  # noqa: E402

CLASSES = ["circle", "square", "triangle", "cross"]


def banded(weak: torch.nn.Module, strong: torch.nn.Module, lo: int, hi: int):
    """A forward for `weak` that runs `strong` at timesteps in [lo, hi)."""
    own = weak.forward

    def forward(sample, timestep, *args, **kwargs):
        t = int(timestep.flatten()[0]) if torch.is_tensor(timestep) else int(timestep)
        return (strong.forward if lo <= t < hi else own)(sample, timestep, *args, **kwargs)

    return forward


def main(argv: list[str] | None = None) -> int:
    from latentfuse.pipelines import CollaFusePipeline

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weak", type=Path, required=True)
    parser.add_argument("--strong", type=Path, required=True)
    parser.add_argument(
        "--bands", nargs="*", default=["100:1000", "800:1000", "550:800", "100:550"]
    )
    parser.add_argument("--clients", action="store_true", help="also swap the clients alone")
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=3.0)
    args = parser.parse_args(argv)

    judge_x, judge_y = load_folder(args.weak / "judge", CLASSES)
    judge = train_classifier(judge_x, judge_y)

    def load(work: Path) -> CollaFusePipeline:
        pipe = CollaFusePipeline.from_pretrained(work / "run" / "model")
        pipe.set_progress_bar_config(disable=True)
        pipe._load_clients_if_missing()
        return pipe

    weak, strong = load(args.weak), load(args.strong)

    def score() -> float:
        hits, counts, _ = recognition(weak, judge, CLASSES, args.per_class, args.guidance)
        return sum(hits.values()) / sum(counts.values())

    own_forward = weak.server_unet.forward
    results = {"weak": score()}
    print(f"weak model alone: {results['weak']:.1%}", flush=True)
    for band in args.bands:
        lo, hi = (int(v) for v in band.split(":"))
        weak.server_unet.forward = banded(weak.server_unet, strong.server_unet, lo, hi)
        name = f"strong server at {lo} <= t < {hi}"
        results[name] = score()
        weak.server_unet.forward = own_forward
        print(f"{name}: {results[name]:.1%}", flush=True)
    if args.clients:
        own_clients = dict(weak.client_unets)
        weak.client_unets.update(strong.client_unets)
        results["strong clients"] = score()
        weak.client_unets.update(own_clients)
        print(f"strong clients: {results['strong clients']:.1%}", flush=True)
    print(json.dumps({"weak": str(args.weak), "strong": str(args.strong), **results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
