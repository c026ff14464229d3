"""The streamed answers: a whole answer replayed as chunks, and the last stage relayed as it streams.

Each has one way out, ``end``: it records the request (and, for the relay, closes the upstream stream
and charges what was generated), once, whether the events finished, broke off, or never started. A
``Streamed`` hands that to whoever sends it (``aclose``). After the first byte an error is one SSE error
event (the OpenAI envelope) and ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from app.cascade.accounting import account_stream, record_failure
from app.cascade.plan import Stage
from app.cascade.relay import StreamRelay
from app.cascade.trace import Attempt, Trace, client_left
from app.errors import UpstreamError
from app.upstream.client import UpstreamEvents
from app.upstream.sse import DONE, encode

Json = dict[str, Any]


class Endings(Protocol):
    """What a stream reports to the engine: its first byte, and its end."""

    def first_byte(self, trace: Trace) -> None: ...

    def finish(self, trace: Trace, ok: bool) -> None: ...


class Run(Protocol):
    """A streamed answer's events and their one way out (``Replayed``, ``Relayed``)."""

    ended: bool

    def events(self) -> AsyncGenerator[bytes, None]: ...

    async def end(self, ok: bool) -> None: ...


class Streamed:
    """A streamed answer, and who owns it. ``events`` yields the SSE bytes to send. Whoever gets this from
    ``Engine.run`` calls ``aclose()`` when done with it (unless ``ended``), however that went (sent in
    full, client gone, or never started because building the response failed): that closes the upstream
    stream and records the request, exactly once. When the events ran, their own clean-up did it."""

    __slots__ = ("_run", "events", "trace")

    def __init__(self, trace: Trace, run: Run) -> None:
        self.trace = trace
        self.events = run.events()
        self._run = run

    @property
    def ended(self) -> bool:
        return self._run.ended

    async def aclose(self) -> None:
        if not self._run.ended:
            await self.events.aclose()
            await self._run.end(False)


def error_event(message: str, type_: str, code: str) -> bytes:
    return encode(orjson.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}))


class Replayed:
    """An answer that is whole already (a scored stage, a fallback), sent as a stream: the chunks of
    ``completion_to_chunks`` (a few words each, one choice a chunk)."""

    __slots__ = ("_chunks", "_engine", "_trace", "ended")

    def __init__(self, engine: Endings, trace: Trace, chunks: list[Json]) -> None:
        self._engine = engine
        self._trace = trace
        self._chunks = chunks
        self.ended = False

    async def events(self) -> AsyncGenerator[bytes, None]:
        ok = False
        try:
            # The whole answer is here: its events go out in one write (no pacing: nothing to wait for).
            yield b"".join([*(encode(orjson.dumps(c)) for c in self._chunks), DONE])
            self._engine.first_byte(self._trace)
            ok = True
        except asyncio.CancelledError as exc:
            self._trace.cancelled = self._trace.cancelled or client_left(exc)
            raise
        finally:
            self._end(ok)

    async def end(self, ok: bool) -> None:
        self._end(ok)

    def _end(self, ok: bool) -> None:
        if not self.ended:
            self.ended = True
            self._engine.finish(self._trace, ok)


@dataclass(slots=True, eq=False)
class Relayed:
    """The streamed last stage: relays the open upstream stream to the client, then accounts for it.
    ``end`` is its one way out: it closes the upstream stream, charges what was generated and records
    the request, once, whether ``events`` finished, broke off, or never started.

    Each upstream read becomes one write to the client (``StreamRelay.process_batch``). The cascade
    deadline is one timer for the whole stream, not one per chunk: it cancels a wait on the upstream
    (as ``asyncio.timeout`` would), and a deadline that passed while the client was being written to
    ends the stream at the next read."""

    engine: Endings
    stage: Stage
    body: Json
    trace: Trace
    att: Attempt
    t0: float
    deadline: float
    stack: AsyncExitStack  # holds the open upstream stream
    chunks: UpstreamEvents
    first: list[tuple[bytes, Json]]  # the first read's events, already parsed
    relay: StreamRelay
    accounted: bool = False
    ended: bool = False
    _expired: bool = False
    _waiting: asyncio.Task[Any] | None = None  # the task waiting on the upstream, while it does
    _cancelled: bool = False  # the deadline cancelled that wait

    async def events(self) -> AsyncGenerator[bytes, None]:
        engine, trace, att, relay = self.engine, self.trace, self.att, self.relay
        ok = False
        sent_any = False
        timer = asyncio.get_running_loop().call_at(self.deadline, self._expire)
        try:
            try:
                batch = self.first
                while batch:
                    out = relay.process_batch(batch)
                    if out:
                        yield out
                        if not sent_any:
                            sent_any = True
                            engine.first_byte(trace)
                    batch = await self._next()
            except UpstreamError as err:
                record_failure(att, err, self.t0, self.body, final=True)
                self._account()
                yield error_event(
                    f"The upstream stream failed: {att.detail}", "upstream_error", "upstream_stream_failed"
                )
                yield DONE
                return
            except TimeoutError:
                att.outcome, att.reason, att.error_kind = "error", "timeout", "timeout"
                att.detail = "cascade deadline passed while streaming"
                att.latency_ms = (time.perf_counter() - self.t0) * 1000
                self._account()
                yield error_event(
                    "The cascade deadline passed while streaming.", "timeout_error", "deadline_exceeded"
                )
                yield DONE
                return
            finally:
                timer.cancel()
            att.latency_ms = (time.perf_counter() - self.t0) * 1000
            usage = self._account()
            att.outcome, att.reason, att.detail = "accepted", "accepted", "last stage"
            trace.accepted = att
            tail = relay.finish(trace.extension(), usage)
            tail.append(DONE)
            yield b"".join(tail)
            if not sent_any:
                engine.first_byte(trace)
            ok = True
        except asyncio.CancelledError as exc:
            # The client left while the upstream was being waited on (``SSEResponse`` says so itself
            # when it was being written to); the server's cancellation at a shutdown is an error.
            trace.cancelled = trace.cancelled or client_left(exc)
            raise
        finally:
            await self.end(ok)

    def _expire(self) -> None:
        self._expired = True
        task = self._waiting
        if task is not None and not self._cancelled:
            self._cancelled = True
            task.cancel()

    async def _next(self) -> list[tuple[bytes, Json]]:
        """The upstream's next events, within the deadline (TimeoutError)."""
        if self._expired:
            raise TimeoutError
        task = asyncio.current_task()
        assert task is not None
        cancelling = task.cancelling()
        self._waiting = task
        try:
            return await self.chunks.batch()
        except asyncio.CancelledError:
            if self._cancelled and task.uncancel() <= cancelling:
                raise TimeoutError from None
            raise
        finally:
            self._waiting = None

    def _account(self) -> Json:
        self.accounted = True
        return account_stream(self.att, self.stage, self.body, self.relay)

    async def end(self, ok: bool) -> None:
        if self.ended:
            return
        self.ended = True
        try:
            await self.stack.aclose()
        finally:
            if not self.accounted:
                # The client went away mid-stream, or the events never started (the response could not be
                # sent): charge what was generated.
                att = self.att
                if self.trace.cancelled:
                    att.outcome, att.reason, att.detail = (
                        "cancelled",
                        "client_disconnected",
                        "client disconnected",
                    )
                else:  # the server stopped it (end of a shutdown's grace), or the response failed
                    att.outcome, att.reason, att.detail = (
                        "error",
                        "cancelled",
                        "the stream was not sent in full",
                    )
                att.latency_ms = (time.perf_counter() - self.t0) * 1000
                self._account()
            self.engine.finish(self.trace, ok)
