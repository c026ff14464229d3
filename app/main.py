"""The app factory. Nothing runs at import: ``create_app(config)`` builds everything, the lifespan owns
the shared upstream HTTP client."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from app.api.admin import router as admin_router
from app.api.chat import is_chat, request_id, serve_chat
from app.api.feedback import router as feedback_router
from app.api.http_io import json_response
from app.api.routes import router
from app.config import Config
from app.errors import InternalError, ProxyError, error_body
from app.learning.service import Learning
from app.learning.spend import shared_spend
from app.metrics import Metrics
from app.runtime import build_runtime
from app.state import AppState
from app.upstream.transport import AiohttpTransport, HttpxTransport, Transport

log = logging.getLogger("cascade.app")


class CascadeApp(FastAPI):
    """FastAPI, with ``POST /v1/chat/completions`` (every request the proxy exists for) answered ahead
    of the middleware stack and routing; every other route goes through FastAPI as usual.

    The shortcut holds only while the app has no middleware of its own (``user_middleware``): add one
    (``add_middleware``, ``@app.middleware``) and chat completions go through it, and the framework,
    like every other route, at the framework's cost per request. ``serve_chat`` does for this path what
    Starlette's own outer layers do (a bug answers 500 in the OpenAI envelope, logged without data)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.user_middleware and is_chat(scope):
            await serve_chat(self, scope, receive, send)
            return
        if scope["type"] == "http":
            path = scope["path"]
            if len(path) > 1 and path[-1] == "/":
                # "/v1/chat/completions/" is the route without its slash (the framework's answer, a 307
                # with an empty body, is an error to an SDK that does not follow redirects on POST).
                scope = _without_trailing_slash(scope)
                if not self.user_middleware and is_chat(scope):
                    await serve_chat(self, scope, receive, send)
                    return
            send = _with_request_id(scope, send)
        await super().__call__(scope, receive, send)


def _without_trailing_slash(scope: Scope) -> Scope:
    scope = dict(scope, path=scope["path"].rstrip("/") or "/")
    raw = scope.get("raw_path")
    if isinstance(raw, bytes):
        scope["raw_path"] = raw.rstrip(b"/") or b"/"
    return scope


def _with_request_id(scope: Scope, send: Send) -> Send:
    """Every reply carries ``x-request-id`` as chat completions do (OpenAI's: errors, models, feedback,
    metrics...): the client's own when it sent a sane one, else a new one, also in
    ``request.state.request_id`` for the exception handlers' log lines and the Responses route."""
    presented = next((v for k, v in scope["headers"] if k == b"x-request-id"), None)
    rid = request_id(presented.decode("latin-1") if presented is not None else None)
    scope.setdefault("state", {})["request_id"] = rid
    header = (b"x-request-id", rid.encode("ascii"))

    async def send_with_id(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = list(message.get("headers", ()))
            if not any(k.lower() == b"x-request-id" for k, _ in headers):
                message = {**message, "headers": [*headers, header]}
        await send(message)

    return send_with_id


def _transport(config: Config, httpx_transport: httpx.AsyncBaseTransport | None) -> Transport:
    if httpx_transport is not None:
        return HttpxTransport(
            httpx.AsyncClient(transport=httpx_transport, follow_redirects=False, trust_env=False)
        )
    return AiohttpTransport(max_connections=config.server.max_connections)


# Recent FastAPI wraps every request in OpenTelemetry checks that read os.environ each time (~10 us);
# cascade exports Prometheus metrics and has no OTEL provider, so switch them off where they exist.
_NO_OTEL: dict[str, Any] = (
    {"telemetry": {"tracing": False, "metrics": False, "logs": False}}
    if "telemetry" in inspect.signature(FastAPI.__init__).parameters
    else {}
)


def _start_budget_sync(state: AppState, config: Config) -> asyncio.Task[None] | None:
    """With budgets and a learning store, share each key's spend through the store (``app.budgets``)."""
    if state.learning is None or not any(k.budget_usd_per_day is not None for k in config.auth.keys):
        return None
    shared = shared_spend(state.learning.store)
    return asyncio.create_task(state.budgets.sync_forever(shared, config.auth.budget_sync_s))


def _coro_name(task: asyncio.Task[Any]) -> str:
    coro = task.get_coro()
    return getattr(coro, "__qualname__", type(coro).__name__)


def create_app(
    config: Config,
    *,
    registry: Any = None,
    transport: httpx.AsyncBaseTransport | None = None,
    multiprocess_dir: str | None = None,
) -> FastAPI:
    """Build the proxy. ``registry``: a prometheus ``CollectorRegistry`` (a fresh one when None);
    ``transport``: an httpx transport for upstream calls (tests run upstreams in-process with
    ``httpx.ASGITransport``; production uses aiohttp); ``multiprocess_dir``: the prometheus
    multiprocess directory when running several workers."""
    from prometheus_client import CollectorRegistry

    metrics = Metrics(registry if registry is not None else CollectorRegistry(auto_describe=True))
    http = _transport(config, transport)
    # Built now, not in the lifespan, so a config whose scorers can't be built fails at startup.
    learning = None
    if config.learning is not None:
        learning = Learning(config.learning, metrics, workers=config.server.workers)
    state = AppState(
        build_runtime(config, http, metrics),
        metrics,
        multiprocess_dir=multiprocess_dir,
        http=http,
        learning=learning,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await http.start()
        if learning is not None:
            await learning.start()
        sync = _start_budget_sync(state, config)
        try:
            yield
        finally:
            state.draining = True
            if sync is not None:
                sync.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sync
                with contextlib.suppress(TimeoutError):  # the last spend, for the other replicas
                    async with asyncio.timeout(5):
                        await state.budgets.sync(shared_spend(learning.store))  # type: ignore[union-attr]
            if learning is not None:
                await learning.stop()  # before the HTTP client: shadow calls in flight use it
            await http.close()
            # After the graceful drain nothing of ours should still run: a leak shows up here.
            left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            log.info(
                "stopped",
                extra={"tasks": len(left), "task_names": sorted({_coro_name(t) for t in left})[:10]},
            )
            if multiprocess_dir:
                # Drop this worker's live gauges (in-flight) from the shared multiprocess files.
                from prometheus_client import multiprocess

                multiprocess.mark_process_dead(os.getpid(), multiprocess_dir)  # type: ignore[no-untyped-call]

    app = CascadeApp(
        title="cascade", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None, **_NO_OTEL
    )
    app.state.cascade = state
    app.state.http = http
    app.include_router(router)
    app.include_router(feedback_router)
    app.include_router(admin_router)

    def _rid(request: Request) -> dict[str, str]:
        rid = getattr(request.state, "request_id", None)
        return {"x-request-id": rid} if rid else {}

    @app.exception_handler(ProxyError)
    async def proxy_error(request: Request, exc: ProxyError) -> Response:
        return json_response(exc.body(), exc.status, {**exc.headers, **_rid(request)})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        msg = f"{request.method} {request.url.path}: {exc.detail}"
        return json_response(error_body(msg, "invalid_request_error", code), exc.status_code, _rid(request))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        msg = f"'{loc}': {first.get('msg', 'invalid')}" if loc else "invalid request"
        return json_response(error_body(msg, "invalid_request_error", "invalid_request", loc or None), 400)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        # A bug, not the client's fault: 500, logged by type and place only (no stack trace, no data).
        log.error("unhandled error", exc_info=exc, extra=_rid(request))
        err = InternalError("The proxy hit an internal error; it has been logged.")
        return json_response(err.body(), 500, _rid(request))

    return app
