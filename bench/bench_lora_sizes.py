"""What LoRA trains on the shipped public base, per rank: trainable parameters and the size of
the adapter file against the base's weights.

    python bench/bench_lora_sizes.py [--out results/lora-sizes.json]

The base is checkpoints/cifar10-public-base with the run's class rows (its 10 classes and the
null) as a run on CIFAR-10 builds it; the adapter file is what `save_denoiser` writes.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from latentfuse.config import UNetConfig
from latentfuse.training.pretrained import (
    ADAPTER_WEIGHTS,
    WEIGHTS,
    denoiser_from_base,
    find_base,
    save_denoiser,
    trainable_parameters,
)

BASE = "checkpoints/cifar10-public-base"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    base = find_base(BASE)
    names = tuple(json.loads((Path(BASE) / "base.json").read_text())["class_names"])
    rows = []
    for rank in (4, 8, 16):
        cfg = UNetConfig(pretrained=BASE, adapter="lora", lora_rank=rank, lora_alpha=rank)
        channels = base.config["in_channels"]
        module = denoiser_from_base(
            cfg, "class", 16, channels, where="server_unet",
            num_class_embeds=len(names) + 1, class_names=names,
        )  # fmt: skip
        with tempfile.TemporaryDirectory() as folder:
            save_denoiser(module, Path(folder), BASE)
            size = (Path(folder) / ADAPTER_WEIGHTS).stat().st_size
        total = sum(p.numel() for p in module.parameters())
        row = {
            "rank": rank,
            "trainable": trainable_parameters(module),
            "parameters": total,
            "share": trainable_parameters(module) / total,
            "adapter_bytes": size,
            "base_bytes": (base.folder / WEIGHTS).stat().st_size,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out is not None:
        record = {"command": "python bench/bench_lora_sizes.py --out " + str(args.out)}
        args.out.write_text(json.dumps({**record, "base": BASE, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
