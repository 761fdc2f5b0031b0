"""Does `latentfuse train` work on a data set that is not CIFAR-10, with its default budget?

    python bench/bench_train_shapes.py --work runs/shapes [--palette grey|colour] [--max-steps N]

1. draws a 4-class ImageFolder of shapes (200 images a class, 32x32; seed 0), in grey levels
   (`--palette grey`, the default: the issue's user had a small grayscale data set) or in any
   colours (`--palette colour`: much harder for a latent model in the same budget);
2. runs `latentfuse train --data ... --output-dir ...` with every default (the step budget
   is derived and printed; at most 20 minutes of training here);
3. trains an independent classifier (a small CNN) on 500 other real shapes a class (seed 1),
   with blur (samples of any latent model are smoother than drawn edges) and colour-channel
   permutation (colour is not the class) as its augmentations, and checks it on a third set
   (seed 2): the baseline that says the shapes can be told apart; and on the run's
   autoencoder's reconstructions of that set: the ceiling any latent model can reach;
4. samples `--per-class` images of each client's class with the trained model (DDIM, the
   guidance the model folder records) and reports the share the classifier recognises as the
   label they were conditioned on (target >= 0.80), per class and in all, with the confusion
   matrix (a classifier that calls everything one shape scores 1/4, whatever it is shown) and
   the wall time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent


def load_folder(root: Path, classes: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [-1, 1] and labels of an ImageFolder, classes in the given order."""
    import numpy as np
    from PIL import Image

    images, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / name).glob("*.png")):
            array = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 127.5 - 1
            images.append(torch.from_numpy(array).permute(2, 0, 1))
            labels.append(label)
    return torch.stack(images), torch.tensor(labels)


def classifier(num_classes: int) -> nn.Module:
    """A small CNN for 32x32 images."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, num_classes),
    )


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A Gaussian blur of random width (sigma 0-1.5) and a random order of the colour channels."""
    from torchvision.transforms.v2.functional import gaussian_blur

    sigmas = torch.rand(len(x), generator=generator) * 1.5
    blurred = [
        gaussian_blur(image[None], [5, 5], [s.item(), s.item()])[0] if s > 0.2 else image
        for image, s in zip(x, sigmas, strict=True)
    ]
    return torch.stack(blurred)[:, torch.randperm(3, generator=generator)]


def train_classifier(x: torch.Tensor, y: torch.Tensor, epochs: int = 20) -> nn.Module:
    """The independent judge, trained on real images only."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = classifier(int(y.max()) + 1)
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for start in range(0, len(x), 64):
            batch = order[start : start + 64]
            loss = nn.functional.cross_entropy(model(augment(x[batch], generator)), y[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (model(x).argmax(1) == y).float().mean().item()


def recognition(pipe, judge: nn.Module, classes: list[str], per_class: int, guidance: float):
    """(hits per class, samples per class, confusion [asked for][recognised as]) of
    `per_class` samples of each client's classes at `guidance` (DDIM-50, fixed seeds)."""
    names = pipe.collafuse_config["class_names"]
    hits, counts = {}, {}
    confusion = [[0] * len(classes) for _ in classes]
    for cid, entry in pipe.collafuse_config["clients"].items():
        for label in entry["classes"]:
            generators = [
                torch.Generator().manual_seed(10_000 * label + k) for k in range(per_class)
            ]
            images = pipe(
                client_id=int(cid),
                class_labels=[label] * per_class,
                generator=generators,
                num_inference_steps=50,
                guidance_scale=guidance,
                output_type="pt",
            ).images
            predicted = judge(images * 2 - 1).argmax(1)
            wanted = classes.index(names[label])
            hits[names[label]] = int((predicted == wanted).sum())
            for recognised in predicted.tolist():
                confusion[wanted][recognised] += 1
            counts[names[label]] = per_class
    return hits, counts, confusion


def run(
    work: Path,
    per_class: int,
    max_steps: int | None,
    sweep: tuple[float, ...] = (),
    overrides: tuple[str, ...] = (),
    palette: str = "grey",
) -> dict:
    """Steps 1-4; the figures as a dict (also written to work/result.json)."""
    from latentfuse.cli.main import main as latentfuse
    from latentfuse.pipelines import CollaFusePipeline
    from latentfuse.testing.shapes import SHAPES, make_shapes

    work.mkdir(parents=True, exist_ok=True)
    classes = list(SHAPES[:4])
    data = make_shapes(work / "data", classes=4, per_class=200, seed=0, palette=palette)
    start = time.time()
    extra = ["--max-steps", str(max_steps)] if max_steps else []
    resume = ["--resume"] if (work / "run" / "checkpoint").exists() else []
    code = latentfuse(
        ["train", "--data", str(data), "--output-dir", str(work / "run")]
        + extra
        + resume
        + list(overrides)
    )
    if code != 0:
        raise SystemExit(f"latentfuse train exited with {code}")
    train_seconds = time.time() - start
    judge_x, judge_y = load_folder(
        make_shapes(work / "judge", 4, 500, seed=1, palette=palette), classes
    )
    check_x, check_y = load_folder(
        make_shapes(work / "check", 4, 100, seed=2, palette=palette), classes
    )
    judge = train_classifier(judge_x, judge_y)
    real_accuracy = accuracy(judge, check_x, check_y)
    from latentfuse.data.autoencoder import decode, encode, load_vae, psnr

    config = json.loads((work / "run" / "config.json").read_text())
    vae = load_vae(config["vae"])
    rebuilt = torch.cat(
        [decode(vae, encode(vae, check_x[i : i + 100])) for i in range(0, len(check_x), 100)]
    )
    ceiling = accuracy(judge, rebuilt.float(), check_y)
    reconstruction_db = psnr(check_x, rebuilt).mean().item()
    pipe = CollaFusePipeline.from_pretrained(work / "run" / "model")
    pipe.set_progress_bar_config(disable=True)
    guidance = pipe.collafuse_config.get("guidance_scale", 3.0)
    recognised = {
        scale: recognition(pipe, judge, classes, per_class, scale)
        for scale in dict.fromkeys([guidance, *sweep])
    }
    hits, counts, confusion = recognised[guidance]
    result = {
        "recognised": sum(hits.values()) / sum(counts.values()),
        "per_class": {k: hits[k] / counts[k] for k in hits},
        "confusion": {"classes": classes, "asked_for_by_recognised_as": confusion},
        "classifier_accuracy_on_real": real_accuracy,
        "classifier_accuracy_on_reconstructions": ceiling,
        "reconstruction_psnr_db": reconstruction_db,
        "autoencoder": config["vae"],
        "train_seconds": train_seconds,
        "steps": json.loads((work / "run" / "config.json").read_text())["train"]["max_steps"],
        "guidance_scale": guidance,
        "recognised_by_guidance": {
            str(scale): sum(h.values()) / sum(c.values()) for scale, (h, c, _) in recognised.items()
        },
        "samples_per_class": per_class,
        "overrides": list(overrides),
        "palette": palette,
    }
    (work / "result.json").write_text(json.dumps(result, indent=2))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "shapes")
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--max-steps", type=int, default=None, help="default: derived")
    parser.add_argument("--palette", choices=("grey", "colour"), default="grey")
    parser.add_argument(
        "--guidance-sweep",
        type=float,
        nargs="*",
        default=[],
        help="also score these guidance scales (the headline stays the model's own)",
    )
    parser.add_argument(
        "overrides", nargs="*", help="section.key=value passed to latentfuse train (default none)"
    )
    args = parser.parse_args(argv)
    r = run(
        args.work,
        args.per_class,
        args.max_steps,
        tuple(args.guidance_sweep),
        tuple(args.overrides),
        args.palette,
    )
    print(
        f"shapes ({r['palette']}): {r['steps']} steps in {r['train_seconds'] / 60:.1f} min; "
        f"the classifier recognises {r['recognised']:.1%} of {r['samples_per_class']} samples "
        f"a class as their label (target >= 80%); per class {json.dumps(r['per_class'])}; "
        f"confusion (rows asked for "
        f"{r['confusion']['classes']}) {r['confusion']['asked_for_by_recognised_as']}; the same "
        "classifier on "
        f"real held-out shapes: {r['classifier_accuracy_on_real']:.1%}, on their "
        f"reconstructions by the autoencoder ({r['reconstruction_psnr_db']:.1f} dB): "
        f"{r['classifier_accuracy_on_reconstructions']:.1%} (the ceiling of any latent model); "
        f"recognised by guidance scale {json.dumps(r['recognised_by_guidance'])}"
    )
    return 0 if r["recognised"] >= 0.8 else 1


if __name__ == "__main__":
    sys.exit(main())
