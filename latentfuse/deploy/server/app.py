"""`latentfuse serve`: the FastAPI app over a ServerService, and uvicorn to run it.

    GET  /healthz                                   liveness, versions and limits (no token)
    GET  /v1/status                                 step, releases per client, last checkpoint
    GET  /v1/clients/{id}/uploads                   this client's committed upload ids
    PUT  /v1/clients/{id}/releases/{upload_id}      one ReleaseBatch (safetensors), idempotent
    POST /v1/clients/{id}/sample                    SampleRequest (JSON) -> HandOff (safetensors)

Every route but /healthz takes `Authorization: Bearer <token>`; a client reaches only its own
id. Errors are JSON: {"error": code, "detail": message}.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from latentfuse import __version__
from latentfuse.checkpointing import atomic_write_json
from latentfuse.deploy.server.admission import Admission, sampling_cost
from latentfuse.deploy.server.auth import parse_client_id
from latentfuse.deploy.server.connections import uvicorn_limits
from latentfuse.deploy.server.service import ServerService
from latentfuse.deploy.wire import SAFETENSORS_TYPE, WireError, decode_sample_request

logger = logging.getLogger(__name__)

REFUSAL_DELAY_S = 0.5  # how long a 429/503 is held before it is sent
WATCH_SECONDS = 0.2  # how often a sampling request looks whether its client is still there
SAMPLE_BODY_LIMIT = 64 * 1024  # a sampling request is small JSON (at most a few hundred seeds)


def bearer_token(request: Request) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, else None."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) past `limit` bytes before more of it is read."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise WireError(f"bad Content-Length {declared!r}")
        if int(declared) > limit:
            raise WireError(
                f"body of {declared} bytes exceeds the limit of {limit}", 413, "too_large"
            )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise WireError(f"body exceeds the limit of {limit} bytes", 413, "too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def path_client(text: str) -> int:
    """The client id of a URL path, spelt strictly (ASCII digits, no sign, no leading zero);
    WireError 404 otherwise (no other spelling names a client)."""
    client_id = parse_client_id(text)
    if client_id is None:
        raise WireError(f"no such client path {text!r}", 404, "not_found")
    return client_id


def create_app(
    service: ServerService,
    endpoint_file: Path | None = None,
    url: str = "",
    api_docs: bool = False,
) -> FastAPI:
    """The app; its lifespan starts and stops the training thread (and writes `endpoint_file`)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        """Start training on start-up; stop it (it checkpoints) on shutdown."""
        service.start()
        if endpoint_file is not None:
            atomic_write_json(endpoint_file, {"url": url, "version": __version__})
        try:
            yield
        finally:
            await run_in_threadpool(service.stop)

    docs = {} if api_docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="latentfuse server", version=__version__, lifespan=lifespan, **docs)
    limit = service.deploy.max_body_bytes
    admission = app.state.admission = Admission(service.deploy)

    async def authenticate(client: int, request: Request) -> None:
        """A known token in the event loop; a key derivation (the slow path) in a thread, at
        most `deploy.key_derivations_per_minute` per sender address."""
        token = bearer_token(request)
        if not service.authenticated_before(client, token):
            admission.key_derivation(request.client.host if request.client else "unknown")
            await run_in_threadpool(service.authenticate, client, token)

    app.add_middleware(HeaderCount, most=service.deploy.max_headers)

    @app.exception_handler(WireError)
    async def wire_error(request: Request, error: WireError) -> JSONResponse:
        """A refused request: its status and {"error", "detail"} JSON."""
        retry = error.extra.get("retry_after")
        headers = {"Retry-After": str(retry)} if retry is not None else None
        if error.status in (429, 503):
            # A client that ignores Retry-After and retries at once would keep the event loop
            # busy with refusals; holding the answer a moment costs the server nothing.
            await asyncio.sleep(REFUSAL_DELAY_S)
        return JSONResponse(error.payload(), status_code=error.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        """Starlette's own refusals (an unknown path, a wrong method) in the same shape."""
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "refused")
        return JSONResponse(
            {"error": code, "detail": str(error.detail)},
            status_code=error.status_code,
            headers=getattr(error, "headers", None),
        )

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        """A request FastAPI could not parse, in the same shape (400, as every bad input)."""
        return JSONResponse({"error": "bad_request", "detail": "malformed request"}, 400)

    @app.get("/healthz")
    async def health() -> dict[str, Any]:
        """Liveness, versions and the limits a client sizes its requests by."""
        return service.health()

    @app.get("/v1/status")
    async def status(request: Request) -> dict[str, Any]:
        """Training step and state, releases held per client, the last checkpoint."""
        token = bearer_token(request)
        claimed = service.tokens.claimed_id(token) if token else None
        if claimed is None or not service.authenticated_before(claimed, token):
            admission.key_derivation(request.client.host if request.client else "unknown")
            await run_in_threadpool(service.authenticate_any, token)
        caller = claimed if claimed is not None else service.tokens.claimed_id(token)
        return {**service.client_status(caller), "refused": dict(admission.refused)}

    @app.get("/v1/clients/{client_id}/uploads")
    async def uploads(client_id: str, request: Request) -> dict[str, Any]:
        """The upload ids (and sha256) the server holds from this client."""
        client = path_client(client_id)
        await authenticate(client, request)
        return {"client_id": client, "uploads": service.committed(client)}

    @app.put("/v1/clients/{client_id}/releases/{upload_id}")
    async def put_release(client_id: str, upload_id: str, request: Request) -> dict[str, Any]:
        """Store one release upload durably; a replayed upload id gets 409."""
        client = path_client(client_id)
        await authenticate(client, request)
        with admission.upload(client):  # before the body is read: a refusal costs nothing
            body = await read_body(request, limit)
            return await run_in_threadpool(service.submit, client, upload_id, body)

    @app.post("/v1/clients/{client_id}/sample")
    async def sample(client_id: str, request: Request) -> Response:
        """Run the server's steps of a sampling request; the hand-off as safetensors."""
        client = path_client(client_id)
        await authenticate(client, request)
        body = await read_body(request, SAMPLE_BODY_LIMIT)  # parsed in the event loop: small
        wanted = decode_sample_request(body, SAMPLE_BODY_LIMIT)  # its cost, before a thread
        if len(wanted.seeds) > service.deploy.max_sample_batch:  # 413 before any budget is spent
            raise WireError(
                f"at most {service.deploy.max_sample_batch} images per request, "
                f"got {len(wanted.seeds)}",
                413,
                "too_large",
            )
        cost = sampling_cost(len(wanted.seeds), wanted.num_inference_steps, wanted.guidance_scale)
        cap = service.sample_cost_cap()
        if cost > cap:  # it can never run: no Retry-After would help
            raise WireError(
                f"this request costs {cost} denoiser evaluations (images x steps, x2 with "
                f"guidance); at most {cap} fit one request: ask for fewer images or steps",
                413,
                "too_large",
                max_sample_cost=cap,
            )
        gone = threading.Event()  # the client hung up: a sampling process stops the work

        async def watch() -> None:
            while not await request.is_disconnected():
                await asyncio.sleep(WATCH_SECONDS)
            gone.set()

        watcher = asyncio.create_task(watch())
        try:
            with admission.sampling_request(client, cost):
                started = time.monotonic()
                payload = await run_in_threadpool(service.sample, client, body, gone.is_set)
                admission.finished(cost, time.monotonic() - started)
        finally:
            watcher.cancel()
        return Response(payload, media_type=SAFETENSORS_TYPE)

    return app


class HeaderCount:
    """431 for a request of more than `most` header fields (0: no limit). Plain ASGI, not
    BaseHTTPMiddleware: that one hides a client's disconnect from the routes."""

    def __init__(self, app: Any, most: int):
        self.app, self.most = app, most

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and self.most and len(scope["headers"]) > self.most:
            detail = f"at most {self.most} header fields"
            response = JSONResponse({"error": "too_many_headers", "detail": detail}, 431)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def bind_socket(host: str, port: int, nodelay: bool = True) -> socket.socket:
    """A listening-ready TCP socket on (host, port); port 0 picks a free one.

    Made with proto=IPPROTO_TCP: asyncio sets TCP_NODELAY on an accepted connection only when
    its socket says so, and without it every keep-alive response waits ~40 ms for Nagle's
    algorithm and the peer's delayed ACK (`nodelay=False` keeps that, for bench_http.py)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP if nodelay else 0)
    if nodelay:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def serve(
    service: ServerService,
    host: str = "127.0.0.1",
    port: int = 8000,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    endpoint_file: Path | None = None,
    api_docs: bool = False,
) -> None:
    """Run the app under uvicorn until interrupted (TLS when a certificate is given)."""
    import uvicorn

    if (tls_cert is None) != (tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together")
    try:
        sock = bind_socket(host, port)
    except OSError as error:  # a port in use, an address not on this machine
        raise ValueError(
            f"cannot listen on {host}:{port}: {error.strerror or error} "
            "(choose another --port; --port 0 picks a free one)"
        ) from None
    bound = sock.getsockname()[1]
    scheme = "https" if tls_cert else "http"
    shown = f"[{host}]" if ":" in host else host
    url = f"{scheme}://{shown}:{bound}"
    app = create_app(service, endpoint_file, url, api_docs=api_docs)
    config = uvicorn.Config(
        app,
        ssl_certfile=tls_cert,
        ssl_keyfile=tls_key,
        log_level="warning",
        **uvicorn_limits(service.deploy),  # header deadline and size, per-address cap, ...
    )
    logger.info("latentfuse server listening on %s", url)
    uvicorn.Server(config).run(sockets=[sock])


class BackgroundServer:
    """The app under uvicorn in a thread of this process, on loopback (tests, benchmarks).

    Example:
        >>> with BackgroundServer(service) as url:
        ...     httpx.get(f"{url}/healthz").json()
    """

    def __init__(
        self,
        service: ServerService,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        host: str = "127.0.0.1",
    ):
        import uvicorn

        self.sock = bind_socket(host, 0)
        scheme = "https" if tls_cert else "http"
        self.url = f"{scheme}://{host}:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(
            create_app(service),
            ssl_certfile=tls_cert,
            ssl_keyfile=tls_key,
            log_level="warning",
            **uvicorn_limits(service.deploy),
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the background server did not start")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)
        self.sock.close()
