"""Carve per-client ImageFolders out of CIFAR-10's train split, one disjoint set of classes each.

    python examples/make_client_data.py --out demo/data --clients 2 --classes-per-client 2 \
        --per-class 100 --seed 0

Client i gets `--classes-per-client` classes of its own (CollaFuse's non-IID setting: no two
clients share a class) and `--per-class` images of each, copied (not linked) to
`<out>/client-<i>/<class>/<image>.jpg`. That folder is what `latentfuse client --data` reads.
The choice is deterministic given `--seed`. The default `--out` is `demo/data`, which
.gitignore keeps out of git; name any other folder, outside the repository if you like.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np

from latentfuse.checkpointing import atomic_write_dir
from latentfuse.data.datasets import ImageDataset, load_cifar10


def choose(
    dataset: ImageDataset, clients: int, classes_per_client: int, per_class: int, seed: int
) -> list[dict[str, list[Path]]]:
    """For each client, {class name: image paths}: disjoint classes, `per_class` images each."""
    num_classes = len(dataset.class_names)
    if min(clients, classes_per_client, per_class) < 1:
        raise ValueError("--clients, --classes-per-client and --per-class must all be >= 1")
    if clients * classes_per_client > num_classes:
        raise ValueError(
            f"--clients {clients} x --classes-per-client {classes_per_client} needs "
            f"{clients * classes_per_client} distinct classes, the data set has {num_classes}"
        )
    rng = np.random.default_rng(seed)
    order = rng.permutation(num_classes)
    labels = dataset.labels
    shares = []
    for client in range(clients):
        chosen = sorted(order[client * classes_per_client : (client + 1) * classes_per_client])
        share = {}
        for label in chosen:
            pool = np.flatnonzero(labels == label)
            name = dataset.class_names[label]
            if per_class > len(pool):
                raise ValueError(f"--per-class {per_class}: class {name} has {len(pool)} images")
            picks = np.sort(rng.choice(pool, per_class, replace=False))
            share[name] = [dataset.records[i].path for i in picks]
        shares.append(share)
    return shares


def write_client(share: dict[str, list[Path]], target: Path) -> None:
    """Copy one client's images into `target/<class>/`; a temporary folder renamed at the end."""

    def write(tmp: Path) -> None:
        for name, paths in share.items():
            (tmp / name).mkdir()
            for path in paths:
                shutil.copyfile(path, tmp / name / path.name)

    atomic_write_dir(target, write)


def main(argv: list[str] | None = None) -> int:
    """Load CIFAR-10 train, choose each client's classes and images, copy them."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("demo/data"))
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--classes-per-client", type=int, default=2)
    parser.add_argument("--per-class", type=int, default=100, help="images per class")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="replace existing client folders")
    args = parser.parse_args(argv)

    targets = [args.out / f"client-{client}" for client in range(args.clients)]
    existing = [str(target) for target in targets if target.exists()]
    if existing and not args.force:
        parser.error(f"{', '.join(existing)} already exist(s); pass --force to replace")
    dataset = load_cifar10("train")
    try:
        shares = choose(dataset, args.clients, args.classes_per_client, args.per_class, args.seed)
    except ValueError as error:
        parser.error(str(error))
    for target, share in zip(targets, shares, strict=True):
        write_client(share, target)
        count = sum(len(paths) for paths in share.values())
        print(f"{target.name}: {count} images of {', '.join(share)} in {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
