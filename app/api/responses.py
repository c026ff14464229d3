"""``POST /v1/responses``: the OpenAI Responses API, stateless, on the chat-completions engine.

Parse, translate the body into the chat request (``app.responses.request``), call the engine once exactly
as ``/v1/chat/completions`` does (same cascades, scoring, escalation, metrics, traces, errors), and
render its answer as a ``response`` object or as Responses stream events (``app.responses``). Errors
before the first byte are HTTP errors in the OpenAI envelope; after it, an ``error`` event and
``response.failed``. The handler owns the engine's stream exactly as the chat handler does.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from app.api.admission import admit
from app.api.auth import check_presented
from app.api.chat import _cascade_headers, _Head, _read_body, _send_json, refused, request_id
from app.api.http_io import ClientGone, SSEResponse, parse_json, run_or_cancel, shutting_down
from app.cascade.engine import Completed
from app.cascade.streams import Streamed
from app.errors import ProxyError
from app.responses.events import ResponseEvents, chat_payloads
from app.responses.reply import from_completion, response_id
from app.responses.request import to_chat
from app.state import AppState

PATH = "/v1/responses"


async def responses(scope: Scope, receive: Receive, send: Send) -> None:
    state: AppState = scope["app"].state.cascade
    rt = state.runtime
    head = _Head(scope["headers"])
    rid = scope.get("state", {}).get("request_id") or request_id(head.request_id)  # CascadeApp's
    request: Any = None  # the parsed body (a dict once to_chat accepted it)
    try:
        key = check_presented(head.authorization, head.x_api_key, rt.keys)
        raw = await _read_body(receive, head.content_length, rt.config.server.max_body_bytes)
        request = parse_json(raw)
        body = to_chat(request, max_messages=rt.config.server.max_messages)
        plan = rt.plans.resolve(body["model"])
        window, key_name = admit(
            rt, state.budgets, state.metrics, key, plan, body, head.min_stage, head.max_stage
        )
    except ProxyError as exc:
        refused(state, exc, rid, PATH, request)
        await _send_json(send, exc.status, exc.body(), {**exc.headers, "x-request-id": rid})
        return
    except ClientGone:
        return
    stream = body.get("stream") is True
    metrics = state.metrics
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
            reply = from_completion(request, result.body, result.trace.completion_id)
            await _send_json(send, 200, reply, headers)
            return
        model = result.trace.serving.upstream if result.trace.serving is not None else body["model"]
        events = ResponseEvents(request, response_id(result.trace.completion_id), model, _now())
        await SSEResponse(_translate(result.events, events), headers, result.trace.client_gone)(
            scope, receive, send
        )
    finally:
        if isinstance(result, Streamed) and not result.ended:
            await result.aclose()
        metrics.in_flight.dec()


async def _translate(chat: AsyncIterator[bytes], events: ResponseEvents) -> AsyncGenerator[bytes, None]:
    """The engine's chat SSE bytes -> Responses frames. Closing this closes the engine's stream."""
    try:
        for b in events.start():
            yield b
        async for data in chat:
            out: list[bytes] = []
            for payload in chat_payloads(data):
                if payload == "[DONE]":
                    if not events.done:
                        out += events.end()
                elif isinstance(payload, dict) and isinstance(payload.get("error"), dict):
                    err = payload["error"]
                    out += events.fail(str(err.get("message") or "The stream failed."), err.get("code"))
                elif isinstance(payload, dict) and not events.done:
                    out += events.chunk(payload)
            if out:
                yield b"".join(out)
    finally:
        aclose = getattr(chat, "aclose", None)
        if aclose is not None:
            await aclose()


def _now() -> int:
    return int(time.time())


class ResponsesEndpoint(Response):
    """The FastAPI route's answer: runs ``responses`` on the raw ASGI request."""

    def __init__(self) -> None:
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await responses(scope, receive, send)
