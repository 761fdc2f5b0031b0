"""The client's side of the HTTP transport: uploads releases, asks for hand-offs, retries.

Safe to retry everything: an upload is keyed by an upload id (the server acknowledges a
replay of committed bytes as 409 `duplicate_upload` with the same sha256, which counts as
done), and a sampling request is a pure function of its seeds and the server's weights.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import torch

from latentfuse.deploy.wire import (
    JSON_TYPE,
    SAFETENSORS_TYPE,
    WIRE_VERSION,
    SampleRequest,
    decode_handoff,
    encode_release,
    encode_sample_request,
)
from latentfuse.method.transport import ReleaseBatch
from latentfuse.pipelines.handoff import HandOff

logger = logging.getLogger(__name__)

RETRY_STATUSES = (408, 425, 429, 500, 502, 503, 504)
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class RemoteError(RuntimeError):
    """The server refused a request (4xx) or stayed unreachable past the retry budget."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.code = status, code


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter: base * 2^k seconds, capped, for at most `budget` s."""

    base: float = 0.25
    cap: float = 5.0
    budget: float = 300.0

    def delay(self, attempt: int) -> float:
        """The wait before retry number `attempt` (0-based)."""
        return min(self.cap, self.base * 2**attempt) * (0.5 + random.random() / 2)


def read_token(path: str | os.PathLike) -> str:
    """The token in a token file; refuses a file that others may read."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"token file not found: {path}")
    if path.stat().st_mode & 0o077:
        raise ValueError(f"token file {path} is readable by others: chmod 600 {path}")
    token = path.read_text().strip()
    if not token:
        raise ValueError(f"token file {path} is empty")
    return token


def upload_id(batch: ReleaseBatch) -> str:
    """The idempotency key of a release chunk: its epoch and image ids, whatever the run."""
    ids = ",".join(map(str, batch.image_ids)).encode()
    digest = hashlib.sha256(ids).hexdigest()[:12]
    return f"e{batch.epoch}-i{batch.image_ids[0]}-n{len(batch.image_ids)}-{digest}"


def held_images(committed: dict[str, str]) -> dict[int, set[int]]:
    """epoch -> image ids that committed uploads (ids as `upload_id` writes them) cover."""
    held: dict[int, set[int]] = {}
    for key in committed:
        match = re.match(r"e(\d+)-i(\d+)-n(\d+)-", key)
        if match:  # chunks are contiguous runs of image ids
            epoch, first, count = map(int, match.groups())
            held.setdefault(epoch, set()).update(range(first, first + count))
    return held


def chunks(batch: ReleaseBatch, size: int) -> list[ReleaseBatch]:
    """`batch` cut into releases of at most `size` images, in image order."""
    out = []
    for start in range(0, len(batch.image_ids), size):
        end = start + size
        labels = None if batch.labels is None else batch.labels[start:end]
        out.append(
            ReleaseBatch(
                batch.client_id,
                batch.image_ids[start:end],
                batch.latents[start:end],
                labels,
                batch.handoff_t,
                batch.epoch,
            )
        )
    return out


class RemoteServer:
    """One client's connection to `latentfuse serve`."""

    def __init__(
        self,
        url: str,
        token: str,
        client_id: int,
        tls_ca: str | os.PathLike | None = None,
        timeout: float = 120.0,
        retry: RetryPolicy | None = None,
    ):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"--server must be an http:// or https:// URL, got {url!r}")
        self.client_id, self.retry = client_id, retry or RetryPolicy()
        verify: Any = True
        if tls_ca is not None and url.startswith("http://"):
            raise ValueError(f"--tls-ca applies to https:// servers; {url!r} is plain HTTP")
        if tls_ca is not None:  # trust this CA (or self-signed certificate) only
            verify = ssl.create_default_context(cafile=str(tls_ca))
        if url.startswith("http://") and urlsplit(url).hostname not in LOOPBACK:
            logger.warning("plain HTTP to %s: the token crosses the network unencrypted", url)
        self.http = httpx.Client(
            base_url=url.rstrip("/"),
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout,
            verify=verify,
        )
        self._limits: dict[str, Any] | None = None

    def close(self) -> None:
        """Close the connection pool."""
        self.http.close()

    def __enter__(self) -> RemoteServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Send with retries on transport errors and 5xx; RemoteError on any other 4xx."""
        start, attempt = time.monotonic(), 0
        while True:
            asked = 0.0  # the server's Retry-After, honoured when longer than our back-off
            try:
                response = self.http.request(method, path, **kwargs)
                if response.status_code not in RETRY_STATUSES:
                    break
                problem = f"HTTP {response.status_code}"
                retry_after = response.headers.get("retry-after", "")
                asked = float(retry_after) if retry_after.isdecimal() else 0.0
            except httpx.TransportError as error:
                if "CERTIFICATE_VERIFY_FAILED" in str(error):  # retrying cannot fix it
                    raise RemoteError(
                        f"{method} {path}: TLS verification failed: {error}"
                    ) from None
                problem = f"{type(error).__name__}: {error}"
            wait = max(self.retry.delay(attempt), min(asked, self.retry.cap))
            if time.monotonic() - start + wait > self.retry.budget:
                raise RemoteError(
                    f"{method} {path}: server unreachable for {self.retry.budget:.0f} s ({problem})"
                )
            logger.info(
                "%s %s failed (%s); retry %d in %.2f s", method, path, problem, attempt + 1, wait
            )
            time.sleep(wait)
            attempt += 1
        if response.status_code >= 400 and response.status_code != 409:
            raise self._error(method, path, response)
        return response

    @staticmethod
    def _error(method: str, path: str, response: httpx.Response) -> RemoteError:
        try:
            body = response.json()
            detail, code = body.get("detail"), body.get("error")
        except ValueError:
            detail, code = response.text[:500], None
        return RemoteError(
            f"{method} {path}: HTTP {response.status_code}: {detail}", response.status_code, code
        )

    def health(self) -> dict[str, Any]:
        """/healthz: versions and limits (checked against this client's wire version)."""
        info = self.request("GET", "/healthz").json()
        if info.get("wire_version") != WIRE_VERSION:
            raise RemoteError(
                f"server speaks wire version {info.get('wire_version')}, this client {WIRE_VERSION}"
            )
        self._limits = info["limits"]
        return info

    def limits(self) -> dict[str, Any]:
        """The server's limits (fetched once)."""
        if self._limits is None:
            self.health()
        return self._limits

    def status(self) -> dict[str, Any]:
        """/v1/status."""
        return self.request("GET", "/v1/status").json()

    def committed(self) -> dict[str, str]:
        """upload id -> sha256 of every upload the server holds from this client."""
        return self.request("GET", f"/v1/clients/{self.client_id}/uploads").json()["uploads"]

    def upload(self, key: str, body: bytes) -> bool:
        """Upload one encoded release; True if stored now, False if it was already committed."""
        response = self.request(
            "PUT",
            f"/v1/clients/{self.client_id}/releases/{key}",
            content=body,
            headers={"Content-Type": SAFETENSORS_TYPE},
        )
        if response.status_code == 409:
            payload = response.json()
            if payload.get("error") == "duplicate_upload" and payload.get("same_content"):
                return False
            raise self._error("PUT", key, response)
        return True

    def upload_release(
        self, batch: ReleaseBatch, chunk_size: int | None = None, fp16: bool = False
    ) -> dict[str, int]:
        """Upload a release in chunks, skipping those the server already holds; counts."""
        limits = self.limits()
        size = min(chunk_size or limits["upload_chunk_size"], limits["upload_chunk_size"])
        done = self.committed()
        held = held_images(done)
        counts = {"uploaded": 0, "skipped": 0}
        for chunk in chunks(batch, size):
            key, body = upload_id(chunk), encode_release(chunk, fp16=fp16)
            if len(body) > limits["max_body_bytes"]:
                raise ValueError(
                    f"a release chunk of {len(chunk.image_ids)} images is {len(body)} bytes, over "
                    f"the server's {limits['max_body_bytes']}: lower the chunk size"
                )
            if done.get(key) == hashlib.sha256(body).hexdigest():
                counts["skipped"] += 1
                continue
            if held.get(chunk.epoch, set()).intersection(chunk.image_ids):
                # Checked before the body leaves: the server already holds a different release
                # of these images, and a second one is a second noisy copy of each.
                raise RuntimeError(
                    f"client {self.client_id}: the server already holds other releases of images "
                    f"{chunk.image_ids[0]}..{chunk.image_ids[-1]} (epoch {chunk.epoch}); this "
                    "client's releases changed (a new release key, cut, clip or chunking?), so "
                    "nothing was sent. Restore the work directory or see docs/privacy.md"
                )
            counts["uploaded" if self.upload(key, body) else "skipped"] += 1
        return counts

    def request_handoff(self, request: SampleRequest) -> tuple[HandOff, torch.Tensor | None]:
        """The server's half of the chains of `request`: the HandOff and the generator states."""
        response = self.request(
            "POST",
            f"/v1/clients/{self.client_id}/sample",
            content=encode_sample_request(request),
            headers={"Content-Type": JSON_TYPE},
        )
        if response.status_code == 409:
            raise self._error("POST", "sample", response)
        return decode_handoff(response.content, max(len(response.content), 1))
