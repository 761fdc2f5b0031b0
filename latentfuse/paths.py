"""Where latentfuse finds its shipped files and keeps its caches."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# A source checkout holds checkpoints/ beside the package; an installed wheel ships the
# autoencoder and the configs under <prefix>/share/latentfuse (pyproject's data-files).
REPO_ROOT = Path(__file__).resolve().parent.parent
INSTALLED_DATA = Path(sys.prefix) / "share" / "latentfuse"
SHIPPED_ROOT = REPO_ROOT if (REPO_ROOT / "checkpoints").is_dir() else INSTALLED_DATA
CHECKPOINTS_DIR = SHIPPED_ROOT / "checkpoints"
DEFAULT_VAE_DIR = CHECKPOINTS_DIR / "cifar10-vae"
SHARED_DATA_DIR = REPO_ROOT.parent / "shared" / "data"
# The CIFAR-10 JPEG archive: $LATENTFUSE_CIFAR10, else ../shared/data beside a source checkout.
CIFAR10_ARCHIVE = Path(
    os.environ.get("LATENTFUSE_CIFAR10") or SHARED_DATA_DIR / "cifar10-jpg.tar.gz"
)
CIFAR10_SHA256 = "7854ea059adc7729ab5267c5269ccc01e6eaeea6549d5f3c834c106bae86e8ee"


def cache_dir() -> Path:
    """The cache root: `$LATENTFUSE_CACHE`, else `~/.cache/latentfuse` (never inside git)."""
    root = os.environ.get("LATENTFUSE_CACHE") or Path.home() / ".cache" / "latentfuse"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def resolve_path(path: str) -> str:
    """A relative path that does not exist here but under the shipped files (the source
    checkout, or an installed wheel's share/latentfuse: `checkpoints/cifar10-vae`), else the
    path unchanged."""
    if Path(path).exists():
        return path
    for root in (REPO_ROOT, SHIPPED_ROOT):
        if (root / path).exists():
            return str(root / path)
    return path


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
