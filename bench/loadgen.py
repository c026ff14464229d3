"""A bounded closed-loop load generator (aiohttp) for chat completions, stream and non-stream.

``run_load(url, body, concurrency, total)`` sends exactly ``total`` requests with ``concurrency`` workers,
each on its own keep-alive connection, and returns per-request latencies (and time to first streamed
byte) plus wall time. Loopback only; nothing here retries or hides an error: failures are counted.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson


@dataclass
class LoadResult:
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    errors: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    wall_s: float = 0.0

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.wall_s if self.wall_s else 0.0

    def pct(self, q: float, ttft: bool = False) -> float:
        data = sorted(self.ttfts if ttft else self.latencies)
        if not data:
            return float("nan")
        k = min(len(data) - 1, max(0, round(q / 100 * (len(data) - 1))))
        return data[k]

    def mean(self) -> float:
        return statistics.fmean(self.latencies) if self.latencies else float("nan")


async def _one(
    session: aiohttp.ClientSession,
    url: str,
    payload: bytes,
    stream: bool,
    res: LoadResult,
    headers: dict[str, str] | None = None,
) -> None:
    t0 = time.perf_counter()
    try:
        async with session.post(
            url, data=payload, headers=headers or {"content-type": "application/json"}
        ) as r:
            res.statuses[r.status] = res.statuses.get(r.status, 0) + 1
            if stream:
                first = True
                async for _ in r.content.iter_any():
                    if first:
                        res.ttfts.append(time.perf_counter() - t0)
                        first = False
            else:
                await r.read()
            if r.status != 200:
                res.errors += 1
                return
    except (TimeoutError, aiohttp.ClientError):
        res.errors += 1
        return
    res.latencies.append(time.perf_counter() - t0)


async def run_load(
    url: str,
    body: dict[str, Any],
    *,
    concurrency: int,
    total: int,
    timeout_s: float = 30.0,
    headers: dict[str, str] | None = None,
) -> LoadResult:
    payload = orjson.dumps(body)
    hdrs = {"content-type": "application/json", **(headers or {})}
    stream = body.get("stream") is True
    res = LoadResult()
    remaining = total
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False, ttl_dns_cache=None)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                await _one(session, url, payload, stream, res, hdrs)

        # warm the pool: one request per connection, not counted
        warm = LoadResult()
        await asyncio.gather(*(_one(session, url, payload, stream, warm, hdrs) for _ in range(concurrency)))
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        res.wall_s = time.perf_counter() - t0
    return res
