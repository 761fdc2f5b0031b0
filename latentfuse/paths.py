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


def looks_local(text: str) -> bool:
    """Whether a model argument names a local path rather than a hub id (`owner/name`):
    absolute, relative (`./`, `~`), more or fewer than one `/`, or under a folder that exists
    here (`checkpoints/no-such-model`)."""
    path = Path(text).expanduser()
    return (
        path.is_absolute()
        or text.startswith((".", "~"))
        or text.count("/") != 1
        or Path(path.parts[0]).is_dir()
    )


def check_model_path(text: str, option: str = "--model") -> None:
    """A local-looking path that does not exist is reported as such, before any hub look-up."""
    if looks_local(text) and not Path(text).expanduser().exists():
        raise FileNotFoundError(f"{option} {text}: no such folder (a local path, not a hub id)")
