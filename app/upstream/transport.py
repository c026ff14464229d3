"""The HTTP seam under the upstream client: POST a body, get the whole reply or a byte stream.

Two implementations behind one small protocol:
- ``AiohttpTransport`` (production): aiohttp's pooled client. Measured on the fast fake upstream it serves
  4-7x the requests per second of a default ``httpx.AsyncClient`` at the same CPU, and keeps its
  throughput at concurrency 64 where httpx's pool collapses (see bench/overhead.py and the README).
- ``HttpxTransport``: wraps any ``httpx.AsyncClient``; tests use it with ``httpx.ASGITransport`` to run
  upstreams in-process.
Both translate their library's exceptions into the three ``TransportError`` kinds here, ``from exc``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Protocol

import aiohttp
import httpx

from app.errors import CascadeBaseError


class TransportError(CascadeBaseError):
    """Base: the connection broke or the bytes are not HTTP."""


class TransportTimeout(TransportError):
    pass


class TransportConnectError(TransportError):
    pass


class TransportTooLarge(TransportError):
    """A whole reply over ``MAX_REPLY_BYTES``: refused, not held in memory."""


# A non-streamed answer, or an error page, bigger than this is refused (the call fails as a protocol
# error): a broken upstream sending hundreds of megabytes took the proxy's memory with it. A chat
# completion of a million tokens is a few megabytes.
MAX_REPLY_BYTES = 64 * 2**20


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float
    read: float  # ``stream``: longest silence between bytes; ``post``: callers bound the whole call


@dataclass(slots=True)
class RawReply:
    """An HTTP reply as received: status, headers, body bytes (``Upstream`` parses it)."""

    status: int
    headers: Mapping[str, str]  # lower-case keys
    body: bytes


@dataclass(slots=True)
class Stream:
    status: int
    headers: Mapping[str, str]
    chunks: AsyncIterator[bytes]

    async def read(self) -> bytes:
        parts = [c async for c in self.chunks]
        return b"".join(parts)


class Transport(Protocol):
    async def post(
        self, url: str, headers: Mapping[str, str], body: bytes, timeouts: Timeouts
    ) -> RawReply: ...

    def stream(
        self, url: str, headers: Mapping[str, str], body: bytes, timeouts: Timeouts
    ) -> AbstractAsyncContextManager[Stream]:
        """Leaving the context early closes the connection (which tells the upstream to stop)."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


# --- aiohttp ---------------------------------------------------------------------------------------------


class AiohttpTransport:
    def __init__(self, *, max_connections: int, keepalive_s: float = 30.0) -> None:
        self._max = max_connections
        self._keepalive = keepalive_s
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self._max, limit_per_host=0, keepalive_timeout=self._keepalive, ttl_dns_cache=300
            )
            self._session = aiohttp.ClientSession(
                connector=connector, auto_decompress=True, trust_env=False, skip_auto_headers=("User-Agent",)
            )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _s(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise TransportError("transport used before start()")
        return self._session

    async def post(self, url: str, headers: Mapping[str, str], body: bytes, timeouts: Timeouts) -> RawReply:
        # No total timeout here: the caller bounds the whole call (``asyncio.timeout``), and a second
        # timer per request in aiohttp would only cost CPU.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeouts.connect)
        try:
            async with self._s().post(url, data=body, headers=headers, timeout=timeout) as r:
                return RawReply(r.status, _lower(r.headers), await _read_capped(r))
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise _from_aiohttp(exc, "timed out") from exc

    @asynccontextmanager
    async def stream(
        self, url: str, headers: Mapping[str, str], body: bytes, timeouts: Timeouts
    ) -> AsyncIterator[Stream]:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeouts.connect, sock_read=timeouts.read)
        try:
            resp = await self._s().post(url, data=body, headers=headers, timeout=timeout)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise _from_aiohttp(exc, "timed out before the first byte") from exc
        try:
            yield Stream(resp.status, _lower(resp.headers), _aiohttp_chunks(resp))
        finally:
            # close(), not release(): an unfinished answer must not go back to the pool, and closing the
            # socket is how the upstream learns to stop generating.
            if resp.content.at_eof():
                resp.release()
            else:
                resp.close()


async def _aiohttp_chunks(resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    try:
        async for chunk in resp.content.iter_any():
            yield chunk
    except (TimeoutError, aiohttp.ClientError) as exc:
        raise _from_aiohttp(exc, "stalled") from exc


async def _read_capped(r: aiohttp.ClientResponse) -> bytes:
    """The whole body, at most ``MAX_REPLY_BYTES``: a declared length is checked first (the common case,
    one read), a chunked body as it arrives."""
    cap = MAX_REPLY_BYTES
    if r.content_length is not None:
        if r.content_length > cap:
            raise TransportTooLarge(f"reply of {r.content_length} bytes, over the {cap}-byte limit")
        return await r.read()
    chunks: list[bytes] = []
    size = 0
    async for chunk in r.content.iter_any():
        size += len(chunk)
        if size > cap:
            raise TransportTooLarge(f"reply over the {cap}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


def _from_aiohttp(exc: BaseException, timed_out: str) -> TransportError:
    """aiohttp's exception as one of ours (its ServerTimeoutError is a TimeoutError too)."""
    if isinstance(exc, TimeoutError):
        return TransportTimeout(timed_out)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return TransportConnectError("cannot connect")
    return TransportError(type(exc).__name__)


def _lower(headers: Mapping[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


# --- httpx -----------------------------------------------------------------------------------------------


class HttpxTransport:
    def __init__(self, client: httpx.AsyncClient) -> None:
        self._client = client

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        await self._client.aclose()

    async def post(self, url: str, headers: Mapping[str, str], body: bytes, timeouts: Timeouts) -> RawReply:
        try:
            r = await self._client.post(
                url, content=body, headers=dict(headers), timeout=_httpx_timeout(timeouts)
            )
        except httpx.HTTPError as exc:
            raise _from_httpx(exc, "timed out") from exc
        return RawReply(r.status_code, _lower(r.headers), r.content)

    @asynccontextmanager
    async def stream(
        self, url: str, headers: Mapping[str, str], body: bytes, timeouts: Timeouts
    ) -> AsyncIterator[Stream]:
        req = self._client.build_request(
            "POST", url, content=body, headers=dict(headers), timeout=_httpx_timeout(timeouts)
        )
        try:
            resp = await self._client.send(req, stream=True)
        except httpx.HTTPError as exc:
            raise _from_httpx(exc, "timed out before the first byte") from exc
        try:
            yield Stream(resp.status_code, _lower(resp.headers), _httpx_chunks(resp))
        finally:
            await resp.aclose()


async def _httpx_chunks(resp: httpx.Response) -> AsyncIterator[bytes]:
    try:
        async for chunk in resp.aiter_raw():
            yield chunk
    except httpx.HTTPError as exc:
        raise _from_httpx(exc, "stalled") from exc


def _httpx_timeout(timeouts: Timeouts) -> httpx.Timeout:
    return httpx.Timeout(
        connect=timeouts.connect, read=timeouts.read, write=timeouts.read, pool=timeouts.read
    )


def _from_httpx(exc: httpx.HTTPError, timed_out: str) -> TransportError:
    """httpx's exception as one of ours."""
    if isinstance(exc, httpx.ConnectError):
        return TransportConnectError("cannot connect")
    if isinstance(exc, httpx.TimeoutException):
        return TransportTimeout(timed_out)
    return TransportError(type(exc).__name__)
