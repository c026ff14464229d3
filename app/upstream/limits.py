"""Per-upstream concurrency limit with a bounded wait (``max_concurrency``, ``queue_timeout_s``).

A call takes a slot for its whole attempt (retries included) and gives it back when it ends. When every
slot is taken it waits, first come first served, up to ``queue_timeout_s``; then it fails as saturated
(``UpstreamSaturated``) without calling the upstream. The cascade escalates past a saturated stage like
past any failed one, and answers 429 with ``retry-after`` only when every stage was saturated or
rate-limited, so overload turns into quick refusals instead of a pile-up of waiting requests.
"""

from __future__ import annotations

import asyncio

from app.errors import UpstreamSaturated


class Limiter:
    __slots__ = ("_sem", "in_flight", "limit", "name", "queue_timeout_s")

    def __init__(self, name: str, limit: int | None, queue_timeout_s: float) -> None:
        self.name = name
        self.limit = limit
        self.queue_timeout_s = queue_timeout_s
        self.in_flight = 0
        # Created lazily: a Semaphore binds to the event loop that first waits on it.
        self._sem: asyncio.Semaphore | None = None

    async def acquire(self) -> None:
        """Take a slot or raise UpstreamSaturated after ``queue_timeout_s``."""
        if self.limit is None:
            self.in_flight += 1
            return
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.limit)
        sem = self._sem
        if sem.locked():
            if self.queue_timeout_s <= 0:
                raise self._saturated()
            try:
                async with asyncio.timeout(self.queue_timeout_s):
                    await sem.acquire()
            except TimeoutError:
                raise self._saturated() from None
        else:
            await sem.acquire()
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1
        if self._sem is not None:
            self._sem.release()

    def _saturated(self) -> UpstreamSaturated:
        return UpstreamSaturated(
            self.name,
            f"saturated: {self.in_flight} of max_concurrency {self.limit} calls in flight "
            f"for {self.queue_timeout_s:g}s",
        )
