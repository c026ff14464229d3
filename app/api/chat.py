"""``POST /v1/chat/completions`` as a plain ASGI endpoint: the hot path.

Every request crosses this code, so it skips the framework's routing, dependency solving and request
objects (about 45 us of CPU per request measured in-process) and works on the ASGI scope directly:
parse, call the engine once, render. ``CascadeApp`` (app.main) routes the one path here ahead of FastAPI
while the app has no middleware of its own (with one, the path goes through it like any other); the
FastAPI route of the same path (the OpenAPI document, and that case) answers through the same function.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from typing import Any

import orjson
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from app.api.admission import admit
from app.api.auth import check_presented
from app.api.http_io import ClientGone, SSEResponse, parse_json, run_or_cancel, shutting_down
from app.cascade.engine import Completed
from app.cascade.streams import Streamed
from app.cascade.trace import Trace
from app.errors import InternalError, PayloadTooLarge, ProxyError, error_body
from app.protocol import Json, new_id, validate_chat_request
from app.state import AppState

log = logging.getLogger("cascade.app")
request_log = logging.getLogger("cascade.request")

PATH = "/v1/chat/completions"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_JSON = (b"content-type", b"application/json")
_NO_STATE: Mapping[str, Any] = {}


class _Head:
    """The request headers the proxy reads, in one pass over the raw list."""

    __slots__ = ("authorization", "content_length", "max_stage", "min_stage", "request_id", "x_api_key")

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        self.authorization = self.x_api_key = self.request_id = self.content_length = None
        self.min_stage = self.max_stage = None
        for k, v in raw:
            if k == b"authorization":
                self.authorization = v.decode("latin-1")
            elif k == b"x-api-key":
                self.x_api_key = v.decode("latin-1")
            elif k == b"x-request-id":
                self.request_id = v.decode("latin-1")
            elif k == b"content-length":
                self.content_length = v.decode("latin-1")
            elif k == b"x-cascade-min-stage":
                self.min_stage = v.decode("latin-1")
            elif k == b"x-cascade-max-stage":
                self.max_stage = v.decode("latin-1")

    authorization: str | None
    x_api_key: str | None
    request_id: str | None
    content_length: str | None
    min_stage: str | None
    max_stage: str | None


async def _read_body(receive: Receive, content_length: str | None, limit: int) -> bytes:
    if content_length is not None and content_length.isdigit() and int(content_length) > limit:
        raise PayloadTooLarge(f"Request body is {int(content_length)} bytes; the limit is {limit} bytes.")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"Request body exceeds the limit of {limit} bytes.")
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _send_json(send: Send, status: int, body: object, headers: Mapping[str, str]) -> None:
    # Serialised before the status goes out: an answer orjson cannot write (an upstream reply nested
    # past its 254 levels) was a 200 with an empty body; now it fails before the reply starts.
    try:
        payload = orjson.dumps(body)
    except orjson.JSONEncodeError as exc:
        status, headers = 502, {k: v for k, v in headers.items() if k == "x-request-id"}
        message = f"The upstream's answer cannot be sent on: {exc}."
        payload = orjson.dumps(error_body(message, "upstream_error", "upstream_protocol_error"))
    raw = [_JSON, *((k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items())]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload, "more_body": False})


def _cascade_headers(trace: Trace, request_id: str) -> dict[str, str]:
    a = trace.serving
    h = {"x-request-id": request_id, "x-cascade-escalations": str(trace.escalations)}
    if a is not None:
        h["x-cascade-upstream"] = a.upstream
        h["x-cascade-stage"] = str(a.stage)
    if trace.fallback:
        h["x-cascade-fallback"] = trace.fallback
    if trace.routed:
        h["x-cascade-routed"] = "true"
    return h


def refused(state: AppState, exc: ProxyError, request_id: str, path: str, body: object) -> None:
    """A request refused before the cascade ran (bad body, unknown model, too large, bad key): counted
    as ``cascade_requests_total{outcome="invalid"}`` and logged in one line, without the body or the
    error's message (which may quote what the client sent). The ``cascade`` label is the requested
    cascade or upstream when the config has it, else empty: a client's model string never becomes a
    label."""
    model = body.get("model") if isinstance(body, dict) else None
    cfg = state.runtime.config
    name = model if isinstance(model, str) and (model in cfg.cascades or model in cfg.upstreams) else ""
    state.metrics.refused(name)
    request_log.info(
        "refused",
        extra={
            "request_id": request_id,
            "path": path,
            "cascade": name or None,
            "outcome": "invalid",
            "status": exc.status,
            "code": exc.code,
            "param": exc.param,
        },
    )


def request_id(presented: str | None) -> str:
    """The client's ``x-request-id`` when it is a sane token (echoed for its own tracing), else a new one."""
    return presented if presented and _REQUEST_ID.match(presented) else new_id("req-")


def _body(request: object, body: Json, result: Completed) -> object:
    return result.body


def _events(request: object, body: Json, result: Streamed) -> AsyncIterator[bytes]:
    return result.events


class Api:
    """What one OpenAI endpoint on the chat engine does of its own: ``to_chat`` checks the parsed JSON
    body and gives the chat request to run (raising ``InvalidRequest`` naming the field), ``reply``
    renders a completed answer (from the parsed body, the chat request and the engine's result),
    ``events`` the SSE bytes of a streamed one. All else (keys, body limits, admission, running,
    errors, closing the stream, metrics) is ``serve``'s, the same for every such endpoint."""

    __slots__ = ("events", "path", "reply", "to_chat")

    def __init__(
        self,
        path: str,
        to_chat: Callable[..., Json],
        reply: Callable[[object, Json, Completed], object] = _body,
        events: Callable[[object, Json, Streamed], AsyncIterator[bytes]] = _events,
    ) -> None:
        self.path = path
        self.to_chat = to_chat
        self.reply = reply
        self.events = events


async def serve(scope: Scope, receive: Receive, send: Send, api: Api) -> None:
    """One request to an ``Api``: parse, admit, run the engine once, render. The hot path of every
    request (``chat`` and ``responses`` return this coroutine itself: no frame of their own, which
    every resumption of the request would pass through)."""
    state: AppState = scope["app"].state.cascade
    rt = state.runtime  # read once: a reload mid-request does not change this request's config
    head = _Head(scope["headers"])
    # the id CascadeApp gave the request where it went through the framework (its log lines use it)
    rid = scope.get("state", _NO_STATE).get("request_id") or request_id(head.request_id)
    parsed: object = None
    metrics = state.metrics
    try:
        key = check_presented(head.authorization, head.x_api_key, rt.keys)
        raw = await _read_body(receive, head.content_length, rt.config.server.max_body_bytes)
        parsed = parse_json(raw)
        body = api.to_chat(parsed, max_messages=rt.config.server.max_messages)
        plan = rt.plans.resolve(body["model"])
        window, key_name = admit(rt, state.budgets, metrics, key, plan, body, head.min_stage, head.max_stage)
        plan.check_n(body, window)
    except ProxyError as exc:
        refused(state, exc, rid, api.path, parsed)
        await _send_json(send, exc.status, exc.body(), {**exc.headers, "x-request-id": rid})
        return
    except ClientGone:
        return
    stream = body.get("stream") is True
    metrics.in_flight.inc()
    result: Completed | Streamed | None = None
    try:
        try:
            result = await run_or_cancel(
                receive, rt.engine.run(plan, body, request_id=rid, stream=stream, window=window, key=key_name)
            )
        except ClientGone:
            return
        except ProxyError as exc:
            await _send_json(send, exc.status, exc.body(), {**exc.headers, "x-request-id": rid})
            return
        except asyncio.CancelledError:
            await shutting_down(send, rid)  # the server's cancellation (its grace period is over)
            raise
        headers = _cascade_headers(result.trace, rid)
        if isinstance(result, Completed):
            headers["x-cascade-cost-usd"] = f"{result.trace.cost_usd:.10f}"
            await _send_json(send, 200, api.reply(parsed, body, result), headers)
            return
        events = api.events(parsed, body, result)
        await SSEResponse(events, headers, result.trace.client_gone)(scope, receive, send)
    finally:
        if isinstance(result, Streamed) and not result.ended:
            # This handler owns the stream: whatever happened since the engine opened it (even the
            # response failing to build), it is closed and the request recorded here, once.
            await result.aclose()
        metrics.in_flight.dec()


CHAT = Api(PATH, validate_chat_request)


def chat(scope: Scope, receive: Receive, send: Send) -> Coroutine[Any, Any, None]:
    return serve(scope, receive, send, CHAT)


class ChatEndpoint(Response):
    """Lets the FastAPI route of the same path answer through ``chat``."""

    def __init__(self) -> None:
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await chat(scope, receive, send)


def is_chat(scope: Scope) -> bool:
    return bool(scope["type"] == "http" and scope["path"] == PATH and scope["method"] == "POST")


async def serve_chat(app: object, scope: Scope, receive: Receive, send: Send) -> None:
    """``chat`` ahead of the framework (``CascadeApp.__call__``): none of its middleware layers, each of
    which every resumption of the request's coroutine passes through. What the outermost of them did
    for this path is done here: a bug answers 500 in the OpenAI envelope and is logged without data."""
    scope["app"] = app
    try:
        await chat(scope, receive, send)
    except Exception as exc:
        log.error("unhandled error", exc_info=exc)
        err = InternalError("The proxy hit an internal error; it has been logged.")
        with contextlib.suppress(Exception):  # the reply had started: the server closes the connection
            await _send_json(send, 500, err.body(), {})
