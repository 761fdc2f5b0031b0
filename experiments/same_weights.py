"""Does a source tree train the same weights as another? The same config, seed and release keys
through `train.py` in each tree; the SHA-256 of every exported denoiser compared.

    python -m experiments.same_weights --before ../before-wt --config configs/smoke.toml \
        --out results/same-weights.json

`--before` is a checkout of the earlier commit (a `git worktree`); this tree is the after. Both
runs get the same release keys (copied from the first run's folder), so releases, batches and
initial weights are the same wherever the code is.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def train(source: Path, config: Path, out: Path, keys_from: Path | None) -> dict[str, str]:
    """Run `source`/train.py on `config` into `out`; the SHA-256 of each exported denoiser."""
    if keys_from is not None:
        shutil.copytree(keys_from / "clients", out / "clients")
    env = {**os.environ, "PYTHONPATH": str(source), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "train.py", "--config", str(config.resolve()), "--output-dir"]
    subprocess.run([*command, str(out.resolve())], cwd=source, env=env, check=True)
    weights = sorted((out / "model").rglob("*.safetensors"))
    return {
        str(p.relative_to(out / "model")): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in weights
        if "vae" not in p.parts
    }


def main(argv: list[str] | None = None) -> int:
    """Train in both trees and report whether every denoiser's weights are identical."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--before", required=True, type=Path, help="the earlier checkout")
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--out", type=Path, help="write the comparison here (JSON)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        before = train(args.before, args.config, Path(tmp) / "before", None)
        after = train(ROOT, args.config, Path(tmp) / "after", Path(tmp) / "before")
    result = {
        "config": str(args.config),
        "before": subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=args.before, capture_output=True, text=True
        ).stdout.strip(),
        "weights": {name: {"before": before[name], "after": after.get(name)} for name in before},
        "identical": before == after,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
