"""HTTP plumbing the routes share: bounded body reads, JSON/SSE responses, client disconnects.

A client that goes away must stop the work done for it: ``run_or_cancel`` runs the handler's work and
cancels it the moment the server reports ``http.disconnect`` (uvicorn never cancels a handler by
itself). ``SSEResponse`` does the same for the sending loop, and always closes its event
iterator, so the upstream connection is released and the request accounted for exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from typing import Any, TypeVar

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from app.cascade.trace import CLIENT_GONE
from app.errors import CascadeBaseError, InvalidRequest, PayloadTooLarge, ServiceUnavailable

T = TypeVar("T")


class ClientGone(CascadeBaseError):
    """The client disconnected before the answer was ready."""


def json_response(body: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, headers=headers, media_type="application/json")


async def read_body(request: Request, limit: int) -> bytes:
    cl = request.headers.get("content-length")
    if cl is not None and cl.isdigit() and int(cl) > limit:
        raise PayloadTooLarge(f"Request body is {int(cl)} bytes; the limit is {limit} bytes.")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"Request body exceeds the limit of {limit} bytes.")
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def parse_json(raw: bytes) -> Any:
    if not raw:
        raise InvalidRequest("Request body is empty; expected a JSON object.")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(
            f"Request body is not valid JSON: {exc.args[0] if exc.args else 'parse error'}"
        ) from exc


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def run_or_cancel(receive: Receive, work: Coroutine[Any, Any, T]) -> T:
    """Await ``work`` in this task; if the client disconnects first, cancel it and raise ClientGone.

    The work runs in the caller's task (no task of its own: one fewer task and one fewer event-loop hop
    per request); a watcher task cancels the caller's task on ``http.disconnect``, and that one
    cancellation is taken back (``uncancel``) once it has unwound the work."""
    me = asyncio.current_task()
    assert me is not None
    watcher = asyncio.create_task(_cancel_on_disconnect(receive, me))
    try:
        return await work
    except asyncio.CancelledError:
        if watcher.done() and not watcher.cancelled() and watcher.result():
            me.uncancel()
            raise ClientGone from None
        raise
    finally:
        watcher.cancel()


async def _cancel_on_disconnect(receive: Receive, task: asyncio.Future[Any]) -> bool:
    """Cancel ``task`` when the client goes away before it is done; True when that happened."""
    await _wait_disconnect(receive)
    if task.done():
        return False
    task.cancel(CLIENT_GONE)
    return True


async def shutting_down(send: Send, request_id: str) -> None:
    """A request the server cancelled at the end of a shutdown's grace period (``server.shutdown_grace_s``),
    before its reply started: a 503 in the OpenAI envelope a client can retry elsewhere (the server's own
    answer was a plain-text 500). Best effort: the connection may be gone already."""
    err = ServiceUnavailable(
        "The proxy is shutting down and could not finish this request in time; retry it.",
        code="shutting_down",
    )
    body = orjson.dumps(err.body())
    headers = [(b"content-type", b"application/json"), (b"x-request-id", request_id.encode("latin-1"))]
    with contextlib.suppress(Exception):
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})


class SSEResponse(Response):
    media_type = "text/event-stream"

    def __init__(
        self,
        events: AsyncIterator[bytes],
        headers: Mapping[str, str],
        on_client_gone: Callable[[], None] | None = None,
    ) -> None:
        # Like StreamingResponse: no body attribute, so no content-length header is added.
        self.status_code = 200
        self.background = None
        self.init_headers({"cache-control": "no-cache", "x-accel-buffering": "no", **headers})
        self.events = events
        self.on_client_gone = on_client_gone

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await run_or_cancel(receive, self._pump(send))
        except ClientGone:
            # The client left: the stream ends here (any other cancellation propagates). Said before the
            # events are closed, which records the request.
            if self.on_client_gone is not None:
                self.on_client_gone()
        finally:
            aclose = getattr(self.events, "aclose", None)
            if aclose is not None:
                await aclose()

    async def _pump(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        async for chunk in self.events:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
