"""Connection-level limits, before any application code runs (uvicorn's h11 protocol, guarded).

- a request's headers must arrive within `deploy.header_timeout_seconds` of its first byte
  (408 and the connection closed otherwise: a slow-loris connection holds nothing for long);
- a request's headers may take at most `deploy.max_header_bytes` (431 and closed beyond,
  before they are parsed) and at most `deploy.max_headers` fields (431, checked by the app);
- one client address holds at most `deploy.max_connections_per_address` connections (the
  next is closed at once); all of them together stay under `deploy.max_connections`
  (uvicorn's `limit_concurrency`: 503 beyond);
- an idle keep-alive connection is closed after uvicorn's `timeout_keep_alive`.

Behind a reverse proxy (the production set-up, docs/deployment.md) the proxy enforces the same
limits per real client and every connection here comes from the proxy's address.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from latentfuse.deploy.config import DeployConfig


def _plain_response(status: int, reason: str) -> bytes:
    body = f'{{"error": "{reason.lower().replace(" ", "_")}", "detail": "{reason}"}}'.encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


def guarded_protocol(deploy: DeployConfig) -> type[H11Protocol]:
    """An h11 protocol class for uvicorn (`http=`) with the limits of `deploy`; one class per
    server, so its per-address counts are that server's."""
    per_address: Counter[str] = Counter()
    timeout, max_bytes = deploy.header_timeout_seconds, deploy.max_header_bytes
    cap = deploy.max_connections_per_address

    class GuardedH11Protocol(H11Protocol):
        """uvicorn's h11 protocol with a header deadline, a header size bound and a cap per
        client address."""

        _header_timer: asyncio.TimerHandle | None = None
        _address: str | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._address = self.client[0] if self.client else None
            if self._address is not None:
                per_address[self._address] += 1
                if cap and per_address[self._address] > cap:
                    self.transport.write(_plain_response(503, "Too many connections"))
                    self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_timer()
            if self._address is not None:
                per_address[self._address] -= 1
                if per_address[self._address] <= 0:
                    del per_address[self._address]
                self._address = None
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            waiting = self.conn.their_state is h11.IDLE  # no complete request head yet
            if waiting and max_bytes:
                buffered = self.conn.trailing_data[0]
                end = (buffered[-3:] + data).find(b"\r\n\r\n")  # the head's end, if here
                head = len(buffered) + (len(data) if end < 0 else end + 4 - min(3, len(buffered)))
                if head > max_bytes:
                    self._refuse(431, "Request Header Fields Too Large")
                    return
            if waiting and timeout and self._header_timer is None:
                self._header_timer = self.loop.call_later(timeout, self._headers_too_slow)
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:
                self._stop_timer()

        def on_response_complete(self) -> None:
            self._stop_timer()  # the next request's head gets its own deadline
            super().on_response_complete()

        def _stop_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self._refuse(408, "Request Timeout")

        def _refuse(self, status: int, reason: str) -> None:
            self._stop_timer()
            if not self.transport.is_closing():
                self.transport.write(_plain_response(status, reason))
                self.transport.close()

    return GuardedH11Protocol


def uvicorn_limits(deploy: DeployConfig) -> dict[str, Any]:
    """The uvicorn.Config arguments that apply `deploy`'s connection limits."""
    return {
        "http": guarded_protocol(deploy),
        "h11_max_incomplete_event_size": max(deploy.max_header_bytes, 1) + 1024,
        "limit_concurrency": deploy.max_connections,  # 503 beyond: bounded memory
        "timeout_keep_alive": deploy.keep_alive_seconds,
    }
