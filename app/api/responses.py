"""``POST /v1/responses``: the OpenAI Responses API, stateless, on the chat-completions engine.

Parse, translate the body into the chat request (``app.responses.request``), call the engine once exactly
as ``/v1/chat/completions`` does (same cascades, scoring, escalation, metrics, traces, errors), and
render its answer as a ``response`` object or as Responses stream events (``app.responses``). Errors
before the first byte are HTTP errors in the OpenAI envelope; after it, an ``error`` event and
``response.failed``. The handler owns the engine's stream exactly as the chat handler does.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from app.api.chat import Api, serve
from app.cascade.engine import Completed
from app.cascade.streams import Streamed
from app.protocol import Json
from app.responses.events import ResponseEvents, chat_payloads
from app.responses.reply import from_completion, response_id
from app.responses.request import to_chat

PATH = "/v1/responses"


def _reply(request: Any, body: Json, result: Completed) -> object:
    return from_completion(request, result.body, result.trace.completion_id)


def _events(request: Any, body: Json, result: Streamed) -> AsyncIterator[bytes]:
    model = result.trace.serving.upstream if result.trace.serving is not None else body["model"]
    frames = ResponseEvents(request, response_id(result.trace.completion_id), model, _now())
    return _translate(result.events, frames)


RESPONSES = Api(PATH, to_chat, _reply, _events)


def responses(scope: Scope, receive: Receive, send: Send) -> Coroutine[Any, Any, None]:
    return serve(scope, receive, send, RESPONSES)


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
