"""Admission control: one client cannot starve the others.

Checked in the event loop before a request takes a worker thread, so refused work costs
nothing and waiting work is bounded:
- sampling: at most `deploy.max_sampling_per_client` requests of one client in the server at
  once (429 beyond), at most `deploy.max_concurrent_sampling` computing and
  `deploy.max_sampling_queue` waiting in all (503 beyond); a per-client budget of sampling cost
  per minute, cost = images x steps x (2 with classifier-free guidance) (429 beyond); requests
  costing more than `deploy.large_sample_cost` hold all sampling places but one at most (429
  beyond), so a small request always finds a place however many clients send large ones;
  `Retry-After` says when a place frees, from the seconds per unit of cost measured so far;
- token checks that need a key derivation (a token not accepted before): a rate per client
  address, `deploy.key_derivations_per_minute` (429 beyond, before the derivation);
- uploads: a per-client rate, `deploy.uploads_per_minute`, and at most
  `deploy.max_uploads_in_flight_per_client` of one client's bodies being read or stored at
  once, so that concurrent large bodies cannot fill the server's memory (429 beyond either).
Every refusal carries `Retry-After`. /healthz takes no part: it never waits for work.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from latentfuse.deploy.config import DeployConfig
from latentfuse.deploy.wire import WireError


@dataclass
class TokenBucket:
    """`rate` units a minute, at most one minute's worth saved up."""

    rate: float
    level: float = 0.0
    stamp: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.level = self.rate

    def take(self, amount: float) -> float:
        """Take `amount` if there is that much; else the seconds until there will be."""
        now = time.monotonic()
        self.level = min(self.rate, self.level + (now - self.stamp) * self.rate / 60.0)
        self.stamp = now
        if amount <= self.level:
            self.level -= amount
            return 0.0
        return (amount - self.level) * 60.0 / self.rate


def sampling_cost(images: int, steps: int, guidance_scale: float) -> int:
    """The cost of a sampling request: denoiser evaluations (a guided step runs two)."""
    return images * steps * (1 if guidance_scale == 1.0 else 2)


class Admission:
    """Counters and buckets of the requests in the server (one event loop: no locks)."""

    def __init__(self, deploy: DeployConfig):
        self.deploy = deploy
        self.sampling: dict[int, int] = {}  # client -> its sampling requests in the server
        self.uploads: dict[int, TokenBucket] = {}
        self.uploading: dict[int, int] = {}  # client -> its upload bodies in the server
        self.budgets: dict[int, TokenBucket] = {}
        self.derivations: dict[str, TokenBucket] = {}  # client address -> its key derivations
        self.refused: dict[str, int] = {"429": 0, "503": 0}
        self.running: dict[int, tuple[float, int]] = {}  # request -> (start, cost)
        self._tickets = 0
        self.seconds_per_cost: float | None = None  # measured on finished requests
        places = deploy.sampling_processes or deploy.max_concurrent_sampling
        self.places = min(places, deploy.max_concurrent_sampling)
        self.large_places = max(1, self.places - 1)

    def is_large(self, cost: int) -> bool:
        """Whether a request of this cost may take only the places large requests share."""
        return bool(self.deploy.large_sample_cost) and cost > self.deploy.large_sample_cost

    def seconds_until_free(self, large_only: bool = False) -> float:
        """When the first running (large) request should end, by the measured seconds per unit
        of cost (2 s while nothing has been measured)."""
        if self.seconds_per_cost is None:
            return 2.0
        now = time.monotonic()
        left = [
            start + cost * self.seconds_per_cost - now
            for start, cost in self.running.values()
            if not large_only or self.is_large(cost)
        ]
        return max(1.0, min(left, default=1.0))

    def finished(self, cost: int, seconds: float) -> None:
        """Learn the seconds per unit of cost from a request that ran to the end."""
        rate = seconds / max(1, cost)
        old = self.seconds_per_cost
        self.seconds_per_cost = rate if old is None else 0.8 * old + 0.2 * rate

    def _refuse(self, message: str, status: int, code: str, seconds: float) -> WireError:
        self.refused[str(status)] += 1
        return WireError(message, status, code, retry_after=max(1, math.ceil(seconds)))

    @contextlib.contextmanager
    def sampling_request(self, client_id: int, cost: int) -> Iterator[None]:
        """Hold one of the client's sampling places for the request's life (or refuse)."""
        d = self.deploy
        mine = self.sampling.get(client_id, 0)
        if mine >= d.max_sampling_per_client:
            raise self._refuse(
                f"client {client_id} has {mine} sampling requests in progress (at most "
                f"{d.max_sampling_per_client}); retry when one finishes",
                429,
                "too_many_requests",
                1,
            )
        if sum(self.sampling.values()) >= d.max_concurrent_sampling + d.max_sampling_queue:
            raise self._refuse(
                "the server is at its sampling capacity; retry shortly",
                503,
                "overloaded",
                self.seconds_until_free(),
            )
        large = sum(self.is_large(c) for _, c in self.running.values())
        if self.is_large(cost) and large >= self.large_places:
            raise self._refuse(
                f"this request costs {cost} (above deploy.large_sample_cost = "
                f"{d.large_sample_cost}) and the {self.large_places} sampling place(s) for "
                "large requests are taken; retry when one frees, or ask for fewer images or steps",
                429,
                "too_many_requests",
                self.seconds_until_free(large_only=True),
            )
        if d.sampling_cost_per_minute:
            bucket = self.budgets.setdefault(client_id, TokenBucket(d.sampling_cost_per_minute))
            wait = bucket.take(cost)
            if wait:
                raise self._refuse(
                    f"client {client_id}'s sampling budget ({d.sampling_cost_per_minute} "
                    f"denoiser evaluations a minute) is spent; this request costs {cost}",
                    429,
                    "budget_exceeded",
                    wait,
                )
        self.sampling[client_id] = mine + 1
        self._tickets += 1
        ticket = self._tickets
        self.running[ticket] = (time.monotonic(), cost)
        try:
            yield
        finally:
            self.sampling[client_id] -= 1
            del self.running[ticket]

    def key_derivation(self, address: str) -> None:
        """Count one token check that needs a key derivation against the sender's address (or
        refuse 429, before the derivation: a flood of bad tokens costs its sender only)."""
        rate = self.deploy.key_derivations_per_minute
        if rate:
            wait = self.derivations.setdefault(address, TokenBucket(rate)).take(1)
            if wait:
                raise self._refuse(
                    f"{address} sent more than {rate} unknown tokens a minute",
                    429,
                    "too_many_requests",
                    wait,
                )

    @contextlib.contextmanager
    def upload(self, client_id: int) -> Iterator[None]:
        """Hold one of the client's upload places while its body is read and stored; count it
        against the client's rate (or refuse)."""
        mine, most = self.uploading.get(client_id, 0), self.deploy.max_uploads_in_flight_per_client
        if mine >= most:
            raise self._refuse(
                f"client {client_id} has {mine} uploads in progress (at most {most}); "
                "retry when one finishes",
                429,
                "too_many_requests",
                1,
            )
        rate = self.deploy.uploads_per_minute
        if rate:
            wait = self.uploads.setdefault(client_id, TokenBucket(rate)).take(1)
            if wait:
                raise self._refuse(
                    f"client {client_id} uploads faster than {rate} a minute",
                    429,
                    "too_many_requests",
                    wait,
                )
        self.uploading[client_id] = mine + 1
        try:
            yield
        finally:
            self.uploading[client_id] -= 1
