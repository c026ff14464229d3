"""Talking to one OpenAI-compatible upstream: request building, retries, error mapping, SSE chunks.

Over 400 lines on purpose: one call's whole life (admission, retries, parsing, error mapping) reads in
one place; the pieces that stand alone are modules of their own (breaker, limits, sse, shapes, transport).

One pooled HTTP transport per process is shared by every ``Upstream`` (lifespan-owned; see
``app.upstream.transport``). Transport errors and bad payloads are translated here into the
``UpstreamError`` tree, ``from exc``. Retries (connect errors, 429, 5xx) happen only before the first
byte of an answer, with exponential backoff and jitter, honouring ``retry-after`` up to a cap.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import orjson

from app.config import Price, UpstreamConfig
from app.errors import (
    CascadeBaseError,
    InvalidRequest,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamSaturated,
    UpstreamStatusError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from app.protocol import token_count
from app.upstream.breaker import Breaker, Ticket
from app.upstream.latency import LatencyStats
from app.upstream.limits import Limiter
from app.upstream.shapes import chunk_problem, completion_problem
from app.upstream.sse import SSEDecoder, SSEEventTooLarge
from app.upstream.transport import (
    Stream,
    Timeouts,
    Transport,
    TransportConnectError,
    TransportError,
    TransportTimeout,
    TransportTooLarge,
)

Json = dict[str, Any]
# Called with (upstream name, error kind) for every failed call, retried or not.
ErrorHook = Callable[[str, str], None]
DurationHook = Callable[[str, float], None]
# Called with (upstream name, "circuit_open" | "saturated") for every call refused without being made.
RejectHook = Callable[[str, str], None]

_KEYLIKE = re.compile(r"(sk|pk|rk|key)[-_][A-Za-z0-9_\-*]{6,}", re.IGNORECASE)
_RETRY_AFTER_CAP_S = 5.0
_BACKOFF_BASE_S = 0.05
_BACKOFF_CAP_S = 2.0


def price_usd(price: Price, prompt_tokens: int, completion_tokens: int, reported: object = None) -> float:
    """USD for a call: the upstream's own ``usage.cost`` when ``price.reported``, else tokens x prices."""
    if price.reported and isinstance(reported, int | float) and not isinstance(reported, bool):
        return float(reported)
    return (prompt_tokens * price.input + completion_tokens * price.output) / 1_000_000


_LIMITS = ("max_tokens", "max_completion_tokens")  # one setting, two names (an upstream default fills either)


@dataclass(slots=True)
class CompletionReply:
    """A whole non-streamed answer, parsed (the transport's ``RawReply`` is the bytes it came in)."""

    body: Json
    latency_s: float


def _serialised(body: Json) -> bytes:
    """The request as JSON for the upstream; a body orjson parses (1,024 levels) but cannot write (254)
    is the client's 400, not a 500."""
    try:
        return orjson.dumps(body)
    except orjson.JSONEncodeError as exc:
        raise InvalidRequest(f"The request cannot be sent on: {exc}.") from None


def _secrets_of(cfg: UpstreamConfig) -> tuple[str, ...]:
    """What an upstream's error messages must never pass on: its ``api_key`` and every value of its
    ``headers`` (an Azure ``api-key``, a gateway token: upstreams echo what they were sent), with and
    without a scheme word (``Bearer xyz`` and ``xyz``), longest first. Values too short to be secrets
    (``json``, ``v1``) are left alone."""
    found = {v for value in cfg.headers.values() for v in (value, value.split(" ", 1)[-1]) if len(v) >= 8}
    if cfg.api_key:
        found.add(cfg.api_key)
    return tuple(sorted(found, key=len, reverse=True))


class Upstream:
    __slots__ = (
        "_headers",
        "_http",
        "_on_duration",
        "_on_error",
        "_secrets",
        "_timeouts",
        "_url",
        "breaker",
        "cfg",
        "latency",
        "limiter",
        "name",
        "on_rejected",
    )

    def __init__(
        self,
        name: str,
        cfg: UpstreamConfig,
        http: Transport,
        *,
        on_error: ErrorHook | None = None,
        on_duration: DurationHook | None = None,
    ) -> None:
        self.name = name
        self.cfg = cfg
        self._http = http
        self._url = cfg.base_url + "/chat/completions"
        self._headers = {"content-type": "application/json", "accept": "application/json, text/event-stream"}
        self._headers.update(cfg.headers)
        if cfg.api_key:
            self._headers["authorization"] = f"Bearer {cfg.api_key}"
        self._secrets = _secrets_of(cfg)
        self._timeouts = Timeouts(connect=cfg.connect_timeout_s, read=cfg.timeout_s)
        self._on_error = on_error
        self._on_duration = on_duration
        # Guards (see app.upstream.breaker / app.upstream.limits); hooks are wired by the app state.
        self.breaker = Breaker(name, cfg.circuit)
        self.limiter = Limiter(name, cfg.max_concurrency, cfg.queue_timeout_s)
        self.on_rejected: RejectHook | None = None
        # Recent call durations (hedge delays, latency baselines), recorded by the cascade engine.
        self.latency = LatencyStats()

    # --- public ------------------------------------------------------------------------------------

    def cost(self, usage: object) -> tuple[int, int, float]:
        """(prompt tokens, completion tokens, USD) for a reply's ``usage`` (zeros when it has none)."""
        if not isinstance(usage, dict):
            return 0, 0, 0.0
        pt = token_count(usage.get("prompt_tokens")) or 0
        ct = token_count(usage.get("completion_tokens")) or 0
        return pt, ct, price_usd(self.cfg.price, pt, ct, usage.get("cost"))

    def blocked(self) -> str | None:
        """Why this upstream must be skipped right now (e.g. an open circuit), or None to call it.
        A reason means the caller skips the call: it is counted as refused."""
        why = self.breaker.blocked()
        if why is not None:
            self._rejected("circuit_open")
        return why

    def adopt_guards(self, old: Upstream) -> None:
        """On a config reload: keep the previous client's circuit and concurrency slots when their
        settings and endpoint did not change, so a reload neither closes an open circuit nor doubles
        the concurrency an upstream sees."""
        if old.cfg.base_url != self.cfg.base_url:
            return
        if old.cfg.model == self.cfg.model:
            self.latency = old.latency
        if old.cfg.circuit == self.cfg.circuit:
            self.breaker = old.breaker
        if (old.cfg.max_concurrency, old.cfg.queue_timeout_s) == (
            self.cfg.max_concurrency,
            self.cfg.queue_timeout_s,
        ):
            self.limiter = old.limiter

    def prepare(self, body: Json, *, stream: bool) -> Json:
        """The request sent upstream: the client's fields untouched, our model id, stream settings."""
        out = dict(body)
        if self.cfg.defaults:
            for k, v in self.cfg.defaults.items():  # what the client left out (or sent as null: not set)
                if out.get(k) is None and not (k in _LIMITS and any(out.get(x) is not None for x in _LIMITS)):
                    out[k] = v  # (max_tokens and max_completion_tokens are one limit: OpenAI refuses both)
        out["model"] = self.cfg.model
        if stream:
            out["stream"] = True
            so = out.get("stream_options")
            # Always ask for usage so streamed cost is exact; the reply strips it if the client didn't ask.
            out["stream_options"] = {**(so if isinstance(so, dict) else {}), "include_usage": True}
        else:
            out.pop("stream", None)
            out.pop("stream_options", None)
        return out

    async def complete(self, body: Json) -> CompletionReply:
        """POST a non-streamed request (``body`` already prepared). Raises UpstreamError."""
        # The admission of ``_admit``, spelled out: this runs on every request and a generator-based
        # context manager costs more than the call bookkeeping itself.
        ticket = await self._enter()
        try:
            reply = await self._complete(body)
        except UpstreamError as err:
            ticket.failure(err)
            raise
        else:
            ticket.success()
            return reply
        finally:
            self.limiter.release()
            ticket.close()

    async def _enter(self) -> Ticket:
        ticket = self.breaker.enter()
        if ticket is None:
            self._rejected("circuit_open")
            why = self.breaker.blocked() or "circuit open"
            raise UpstreamUnavailable(self.name, why, retry_after=self.breaker.retry_after())
        # Every way out of the wait gives the ticket back (a half-open probe holds the circuit's only
        # probe slot): saturation, and also a cancel (client gone, cascade deadline) while queued.
        try:
            await self.limiter.acquire()
        except UpstreamSaturated:
            ticket.close()
            self._rejected("saturated")
            raise
        except BaseException:
            ticket.close()
            raise
        return ticket

    @asynccontextmanager
    async def stream(self, body: Json) -> AsyncIterator[UpstreamEvents]:
        """Open a streamed request (``body`` already prepared) and yield its events (``UpstreamEvents``:
        the parsed chunks one by one, or a read's worth at a time with their bytes).

        Connection, status and retries are settled before this yields, so an error raised here happened
        before any byte of the answer. Errors while iterating are ``UpstreamError`` too. Leaving the
        ``async with`` early closes the connection, which stops the upstream generating.
        """
        async with self._admit() as ticket:
            try:
                async with self._stream(body) as events:
                    events.ticket = ticket
                    yield events
            except UpstreamError as err:
                if err.upstream == self.name:  # opening failed (iteration errors are reported already)
                    ticket.failure(err)
                raise

    @asynccontextmanager
    async def _admit(self) -> AsyncIterator[Ticket]:
        """One attempt's admission: the circuit must let it through, then it holds a concurrency slot
        until it ends. Refusals raise before anything is sent."""
        ticket = await self._enter()
        try:
            yield ticket
        finally:
            self.limiter.release()
            ticket.close()

    def _rejected(self, reason: str) -> None:
        if self.on_rejected is not None:
            self.on_rejected(self.name, reason)

    async def _complete(self, body: Json) -> CompletionReply:
        payload = _serialised(body)
        started = time.perf_counter()
        attempt = 0
        while True:
            try:
                async with asyncio.timeout(self.cfg.timeout_s):
                    reply = await self._post_once(payload)
            except TimeoutError as exc:
                err: UpstreamError = UpstreamTimeout(self.name, f"no answer within {self.cfg.timeout_s:g}s")
                self._failed(err)
                raise err from exc
            except UpstreamError as failure:
                self._failed(failure)
                if failure.retryable and attempt < self.cfg.max_retries:
                    await asyncio.sleep(self._backoff(attempt, failure))
                    attempt += 1
                    continue
                raise
            latency = time.perf_counter() - started
            if self._on_duration is not None:
                self._on_duration(self.name, latency)
            return CompletionReply(reply, latency)

    @asynccontextmanager
    async def _stream(self, body: Json) -> AsyncIterator[UpstreamEvents]:
        payload = _serialised(body)
        started = time.perf_counter()
        attempt = 0
        while True:
            try:
                async with self._open_stream(payload) as chunks:
                    try:
                        yield chunks
                    finally:
                        if self._on_duration is not None:
                            self._on_duration(self.name, time.perf_counter() - started)
                    return
            except _BeforeFirstByte as wrapped:
                failure = wrapped.error
                self._failed(failure)
                if failure.retryable and attempt < self.cfg.max_retries:
                    await asyncio.sleep(self._backoff(attempt, failure))
                    attempt += 1
                    continue
                raise failure from wrapped.__cause__

    # --- internals -----------------------------------------------------------------------------------

    async def _post_once(self, payload: bytes) -> Json:
        try:
            r = await self._http.post(self._url, self._headers, payload, self._timeouts)
        except TransportTimeout as exc:
            raise UpstreamTimeout(self.name, "timed out") from exc
        except TransportConnectError as exc:
            raise UpstreamConnectError(self.name, "cannot connect", retryable=True) from exc
        except TransportTooLarge as exc:
            raise UpstreamProtocolError(self.name, str(exc)) from exc
        except TransportError as exc:
            raise UpstreamProtocolError(self.name, f"connection failed mid-answer ({exc})") from exc
        if r.status != 200:
            raise self._status_error(r.status, r.headers, r.body)
        return self._parse_body(r.headers, r.body)

    @asynccontextmanager
    async def _open_stream(self, payload: bytes) -> AsyncIterator[UpstreamEvents]:
        """Errors before the first byte of the answer come out wrapped in ``_BeforeFirstByte``."""
        try:
            opened = self._http.stream(self._url, self._headers, payload, self._timeouts)
            resp = await opened.__aenter__()
        except TransportTimeout as exc:
            raise _BeforeFirstByte(UpstreamTimeout(self.name, "timed out before the first byte")) from exc
        except TransportConnectError as exc:
            raise _BeforeFirstByte(UpstreamConnectError(self.name, "cannot connect", retryable=True)) from exc
        except TransportError as exc:
            raise _BeforeFirstByte(UpstreamProtocolError(self.name, f"connection failed ({exc})")) from exc
        try:
            try:
                await self._check_stream(resp)
            except UpstreamError as err:
                raise _BeforeFirstByte(err) from err
            yield UpstreamEvents(self, resp.chunks)
        finally:
            await opened.__aexit__(None, None, None)

    async def _check_stream(self, resp: Stream) -> None:
        if resp.status != 200:
            try:
                content = await resp.read()
            except TransportError:
                content = b""
            raise self._status_error(resp.status, resp.headers, content)
        ctype = resp.headers.get("content-type", "")
        if "json" in ctype:
            # Some servers answer a stream request with a plain JSON error in a 200.
            try:
                content = await resp.read()
            except TransportError:
                content = b""
            self._parse_body(resp.headers, content)  # raises on an error body
            raise UpstreamProtocolError(self.name, "expected an event stream, got a JSON body")
        if "text/event-stream" not in ctype:
            raise UpstreamProtocolError(self.name, f"expected text/event-stream, got '{ctype[:60]}'")

    def _json_object(self, raw: str | bytes, what: str) -> Json:
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise UpstreamProtocolError(self.name, f"invalid JSON in {what}") from exc
        if not isinstance(obj, dict):
            raise UpstreamProtocolError(self.name, f"{what} is not a JSON object")
        return obj

    def _parse_chunk(self, data: bytes, event: str) -> Json:
        chunk = self._json_object(data, "an SSE event")
        if ("error" in chunk and "choices" not in chunk) or event == "error":
            raise UpstreamProtocolError(self.name, f"error event in stream: {self._message_of(chunk)}")
        why = chunk_problem(chunk)
        if why is not None:
            raise UpstreamProtocolError(self.name, f"malformed chunk: {why}")
        return chunk

    def _parse_body(self, headers: Mapping[str, str], content: bytes) -> Json:
        ctype = headers.get("content-type", "")
        if ctype and "json" not in ctype:
            raise UpstreamProtocolError(self.name, f"expected application/json, got '{ctype[:60]}'")
        body = self._json_object(content, "the body")
        if "error" in body and not body.get("choices"):
            raise UpstreamProtocolError(self.name, f"error in a 200 reply: {self._message_of(body)}")
        choices = body.get("choices")
        if not isinstance(choices, list) or not choices:
            raise UpstreamProtocolError(self.name, "reply has no choices")
        why = completion_problem(body)  # choices that are not objects included
        if why is not None:
            raise UpstreamProtocolError(self.name, f"malformed reply: {why}")
        return body

    def _status_error(self, status: int, headers: Mapping[str, str], content: bytes) -> UpstreamStatusError:
        message = f"HTTP {status}"
        try:
            parsed = orjson.loads(content) if content else None
            if isinstance(parsed, dict):
                message = self._message_of(parsed)
        except orjson.JSONDecodeError:
            pass
        retry_after: float | None = None
        ra = headers.get("retry-after")
        if ra:
            try:
                retry_after = max(0.0, float(ra))
            except ValueError:
                retry_after = None
        retryable = status == 429 or status >= 500
        return UpstreamStatusError(self.name, status, message, retryable=retryable, retry_after=retry_after)

    def _message_of(self, body: Json) -> str:
        err = body.get("error")
        msg: object = err.get("message") if isinstance(err, dict) else err
        text = str(msg) if msg else "no message"
        # Redacted before it is cut: a key cut in two no longer matches, and its first part went out.
        return self.redact(text)[:300]

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, "[redacted]")
        return _KEYLIKE.sub("[redacted]", text)

    def _backoff(self, attempt: int, err: UpstreamError) -> float:
        if isinstance(err, UpstreamStatusError) and err.retry_after is not None:
            return min(float(err.retry_after), _RETRY_AFTER_CAP_S)
        return min(_BACKOFF_CAP_S, _BACKOFF_BASE_S * (1 << attempt)) * (0.5 + random.random() / 2)

    def _failed(self, err: UpstreamError) -> None:
        if self._on_error is not None:
            self._on_error(self.name, err.kind)


class UpstreamEvents:
    """An open stream's chunks, parsed and shape-checked, as the upstream sends them. ``batch()`` gives
    every event one read from the socket completed, each with its ``data`` bytes (a relay forwards a
    batch in one write); ``async for`` gives the chunks one by one. The end is reported to the circuit
    breaker: [DONE] is a success, an ``UpstreamError`` a failure; a consumer that stops early leaves
    no verdict. A stream that ends without [DONE] fails after its last complete event, and one that ends
    before any chunk (only [DONE]: no role, no answer) fails: OpenAI's streams always carry a chunk."""

    __slots__ = ("_cut", "_decoder", "_done", "_error", "_pending", "_raw", "_seen", "_up", "ticket")

    def __init__(self, up: Upstream, raw: AsyncIterator[bytes]) -> None:
        self._up = up
        self._raw = raw
        self._decoder = SSEDecoder()
        self._pending: list[tuple[bytes, Json]] = []
        self._done = False
        self._cut = False
        self._error: UpstreamError | None = None
        self._seen = False  # a chunk came
        self.ticket: Ticket | None = None

    async def batch(self) -> list[tuple[bytes, Json]]:
        """The next events, at least one; [] once the stream ended with [DONE]."""
        if self._pending:
            out, self._pending = self._pending, []
            return out
        try:
            return await self._read()
        except UpstreamError as err:
            self._up._failed(err)
            if self.ticket is not None:
                self.ticket.failure(err)
            raise

    async def _read(self) -> list[tuple[bytes, Json]]:
        up = self._up
        if self._error is not None:
            raise self._error
        while not self._done:
            if self._cut:
                raise UpstreamProtocolError(up.name, "stream ended without [DONE]")
            try:
                raw = await anext(self._raw)
            except StopAsyncIteration:
                events = self._decoder.flush()
                self._cut = True
            except TransportTimeout as exc:
                raise UpstreamTimeout(up.name, f"stream stalled for {up.cfg.timeout_s:g}s") from exc
            except TransportError as exc:
                raise UpstreamProtocolError(up.name, f"stream broke off ({exc})") from exc
            else:
                try:
                    events = self._decoder.feed(raw)
                except SSEEventTooLarge as exc:
                    raise UpstreamProtocolError(up.name, str(exc)) from None
            out: list[tuple[bytes, Json]] = []
            for data, name in events:
                if data == b"[DONE]":
                    if not (self._seen or out):
                        raise UpstreamProtocolError(up.name, "stream ended before any chunk")
                    self._done = True
                    if self.ticket is not None:
                        self.ticket.success()
                    break
                try:
                    out.append((data, up._parse_chunk(data, name)))
                except UpstreamError as err:
                    if not out:
                        raise
                    self._error = err  # the good events before it go first
                    return out
            if out:
                self._seen = True
                return out
        return []

    def __aiter__(self) -> UpstreamEvents:
        return self

    async def __anext__(self) -> Json:
        if not self._pending:
            self._pending = await self.batch()
            if not self._pending:
                raise StopAsyncIteration
        return self._pending.pop(0)[1]


class _BeforeFirstByte(CascadeBaseError):
    """Carries an UpstreamError that happened before any byte of the answer (so a retry is safe)."""

    def __init__(self, error: UpstreamError) -> None:
        super().__init__(str(error))
        self.error = error
