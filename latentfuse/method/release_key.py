"""A client's secret release key and the release noise eps_c derived from it (method.md §2).

z_r = sqrt(abar_r) z0 + sqrt(1 - abar_r) eps_c is safe to send only while eps_c is unknown
to the server: with both, z0 = (z_r - sqrt(1 - abar_r) eps_c) / sqrt(abar_r) exactly. So
eps_c is a keyed pseudo-random function of (client id, image id, epoch) under a 256-bit key
made by the operating system's CSPRNG and kept only on the client:

    seed_i = HMAC-SHA256(key, "latentfuse/release-noise/v2" | client_id | image_id | epoch
                              | handoff_t | clip_norm)
    bytes_i = SHAKE-256(seed_i) (16 bytes per pair of normals)
    eps_c[i] = Box-Muller(bytes_i)                       # float64, then the latent dtype

Each image's noise depends only on its own fields, so batching and order do not change it, a
resumed run reproduces it, and without the key nobody can. The release settings (cut, clip
norm) are in the input too: two releases of one image under one key at different settings
would otherwise share eps_c, and two equations in (z0, eps_c) give z0 exactly. With them in,
such a pair is two independent noisy copies (what `fresh` also hands over), never an
inversion. no torch or NumPy generator, whose
state could be recovered from its outputs, stands between the key and the noise.

Losing the key loses no training: the releases already sent stay valid server-side (the
server never needed the key). The client simply cannot reproduce them; with a new key its
next releases are new draws, which under `once` hands the server a second noisy copy of each
image (see the README's privacy section).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import secrets
import stat
import struct
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

KEY_BYTES = 32  # 256 bits
KEY_FILE = "release.key"
_DOMAIN = b"latentfuse/release-noise/v2"
_TWO_53 = float(2**53)


def new_release_key() -> bytes:
    """A fresh 256-bit key from the operating system's CSPRNG."""
    return secrets.token_bytes(KEY_BYTES)


def check_release_key(key: bytes) -> bytes:
    """`key` if it is a bytes key of at least 256 bits, else a ValueError."""
    if not isinstance(key, bytes | bytearray) or len(key) < KEY_BYTES:
        size = f"{len(key)} bytes" if isinstance(key, bytes | bytearray) else type(key).__name__
        raise ValueError(f"release_key must be at least {KEY_BYTES} bytes, got {size}")
    return bytes(key)


def client_key_path(run_dir: str | Path, client_id: int) -> Path:
    """Where a simulated client's key lives in a run folder: `clients/client-<id>/release.key`."""
    return Path(run_dir) / "clients" / f"client-{client_id}" / KEY_FILE


def load_release_key(path: str | Path) -> bytes:
    """Read a key file (hex); refuse one that others than its owner may read."""
    path = Path(path)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise PermissionError(
            f"release key {path} has mode {mode:o}: it must be readable by its owner only "
            f"(chmod 600 {path})"
        )
    text = path.read_text().strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise ValueError(f"release key {path} must hold {2 * KEY_BYTES} hex digits") from None
    return check_release_key(key)


def load_or_create_release_key(path: str | Path) -> bytes:
    """The key at `path`, made (CSPRNG, mode 600, written atomically) if there is none."""
    path = Path(path)
    if path.exists():
        return load_release_key(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = new_release_key()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(key.hex() + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # never replaces a key another process made meanwhile
        except FileExistsError:
            return load_release_key(path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # the key survives a crash right after the first release
        finally:
            os.close(directory)
    finally:
        tmp.unlink(missing_ok=True)
    logger.info(
        "made %s: the secret key that draws this client's release noise (with it anyone "
        "recovers the client's latents from its releases: it stays on this machine, unshared)",
        path,
    )
    return key


def noise_seed(
    key: bytes, client_id: int, image_id: int, epoch: int, handoff_t: int, clip_norm: float
) -> bytes:
    """The 256-bit PRF output that seeds one image's release noise."""
    message = _DOMAIN + struct.pack(">qqqqd", client_id, image_id, epoch, handoff_t, clip_norm)
    return hmac.new(check_release_key(key), message, hashlib.sha256).digest()


def _normals(seed: bytes, count: int) -> np.ndarray:
    """`count` standard normals (float64) from SHAKE-256(seed) by the Box-Muller transform."""
    pairs = math.ceil(count / 2)
    words = np.frombuffer(hashlib.shake_256(seed).digest(16 * pairs), dtype=">u8")
    # 53-bit uniforms in (0, 1): never 0, so the log is finite.
    uniform = ((words >> np.uint64(11)).astype(np.float64) + 0.5) / _TWO_53
    radius = np.sqrt(-2.0 * np.log(uniform[:pairs]))
    angle = 2.0 * np.pi * uniform[pairs:]
    return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:count]


def release_noise(
    key: bytes,
    client_id: int,
    image_ids: list[int] | range,
    epoch: int,
    shape: tuple[int, ...],
    handoff_t: int,
    clip_norm: float = 0.0,
) -> torch.Tensor:
    """eps_c (n, *shape), float64, of the images `image_ids` at `epoch` under `key`, for
    releases for the hand-off `handoff_t` of latents clipped to `clip_norm` (0: unclipped)."""
    count = math.prod(shape)
    seeds = [noise_seed(key, client_id, i, epoch, handoff_t, float(clip_norm)) for i in image_ids]
    rows = [_normals(seed, count) for seed in seeds]
    if not rows:
        return torch.empty((0, *shape), dtype=torch.float64)
    return torch.from_numpy(np.stack(rows)).view(len(rows), *shape)
