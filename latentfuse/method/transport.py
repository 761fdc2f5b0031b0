"""Messages that cross between clients and the server, and the in-process transport.

Client and server never import each other: they meet only here. The HTTP transport
(deployment) carries these same messages, so a run is the same whichever carries it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class ReleaseBatch:
    """Noised latents z_r that one client releases at its cut level (never z0, never eps_c)."""

    client_id: int
    image_ids: tuple[int, ...]  # client-local ids: the server's idempotency keys
    latents: torch.Tensor  # z_r, (n, c, h, w)
    # the images' conditioning (class labels (n,), attribute vectors (n, A) or prompt token
    # states (n, L, D)), or None when the server may not learn it
    labels: torch.Tensor | None
    handoff_t: int  # the client's hand-off (the wire's "t_cut"): the server trains s >= it
    epoch: int
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        n = len(self.image_ids)
        if n == 0:
            raise ValueError("a release batch must hold at least one image")
        if min(self.image_ids) < 0:
            raise ValueError(f"image_ids must be >= 0, got {min(self.image_ids)}")
        if self.latents.ndim != 4 or self.latents.shape[0] != n:
            raise ValueError(
                f"latents must have shape ({n}, c, h, w), got {tuple(self.latents.shape)}"
            )
        if not self.latents.dtype.is_floating_point:
            raise ValueError(f"latents must be floating point, got {self.latents.dtype}")
        if not torch.isfinite(self.latents).all():
            raise ValueError("latents contain NaN or Inf")
        if self.labels is not None:
            shape, floating = tuple(self.labels.shape), self.labels.is_floating_point()
            # class labels: integers (n,); attribute vectors (n, A), token states (n, L, D): floats
            if not shape or shape[0] != n or (len(shape) > 1) != floating:
                raise ValueError(
                    f"labels must be class labels ({n},) or float conditioning rows ({n}, ...), "
                    f"got {shape} {self.labels.dtype}"
                )
        if len(set(self.image_ids)) != n:
            raise ValueError("image_ids must be unique within a release batch")


@dataclass
class InProcessTransport:
    """A queue from clients to the server; with `keep_log`, a record of every message that
    crossed it (for tests and audits: it holds every release, so it is off by default)."""

    keep_log: bool = False
    log: list[ReleaseBatch] = field(default_factory=list)
    _queue: deque = field(default_factory=deque)

    def send(self, message: ReleaseBatch) -> None:
        """Client side: hand a message to the server."""
        if not isinstance(message, ReleaseBatch):
            raise TypeError(f"only ReleaseBatch messages cross, got {type(message).__name__}")
        if self.keep_log:
            self.log.append(message)
        self._queue.append(message)

    def receive(self) -> list[ReleaseBatch]:
        """Server side: every message sent since the last call, in order."""
        messages = list(self._queue)
        self._queue.clear()
        return messages
