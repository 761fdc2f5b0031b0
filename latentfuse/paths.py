"""Where latentfuse finds its shipped files and keeps its caches."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CHECKPOINTS_DIR = REPO_ROOT / "checkpoints"
DEFAULT_VAE_DIR = CHECKPOINTS_DIR / "cifar10-vae"
SHARED_DATA_DIR = REPO_ROOT.parent / "shared" / "data"
CIFAR10_ARCHIVE = SHARED_DATA_DIR / "cifar10-jpg.tar.gz"
CIFAR10_SHA256 = "7854ea059adc7729ab5267c5269ccc01e6eaeea6549d5f3c834c106bae86e8ee"


def cache_dir() -> Path:
    """The cache root: `$LATENTFUSE_CACHE`, else `~/.cache/latentfuse` (never inside git)."""
    root = os.environ.get("LATENTFUSE_CACHE") or Path.home() / ".cache" / "latentfuse"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def resolve_path(path: str) -> str:
    """A relative path that exists under the repository root, else the path unchanged."""
    candidate = REPO_ROOT / path
    return str(candidate) if not Path(path).exists() and candidate.exists() else path
