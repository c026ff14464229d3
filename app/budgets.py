"""Daily spend per configured key (``auth.keys``), for budgets: what each key's requests cost today.

The day is the UTC day; at midnight every key starts again from zero. A request's cost counts when it
ends (answers and scoring, as in its ``cascade.cost_usd``); a key is over budget once today's spend
reaches ``budget_usd_per_day``, so one request may take it past the line, never two in a row.

One ``Budgets`` per process, kept across config reloads. Alone it counts this process's spend. With a
shared store (the learning store: PostgreSQL across replicas, or SQLite across the workers of one
host), ``sync`` runs every ``auth.budget_sync_s``: it adds this process's spend since the last sync to
the store and reads every replica's total back, so a key's budget holds across replicas, give or take
what they spend in one sync interval. A store that fails leaves each process counting on its own
(logged), never failing a request.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from app.cascade.control import Policy
from app.config import AuthConfig
from app.errors import CascadeBaseError

log = logging.getLogger("cascade.budgets")
DAY_S = 86_400
# (day number, this process's spend per key since the last sync) -> every replica's total per key today
Shared = Callable[[int, dict[str, float]], Awaitable[dict[str, float]]]


@dataclass(slots=True, frozen=True)
class NamedKey:
    """A configured key (``auth.keys``) as requests use it, built once per config load."""

    name: str
    policy: Policy
    budget: float | None = None
    over_budget: Policy | None = None  # the policy once over budget; None: 429 instead
    models: frozenset[str] | None = None  # the models it may use; None: all


def named_keys(auth: AuthConfig) -> tuple[tuple[bytes, NamedKey | None], ...]:
    """Every proxy key, as (secret, its named key or None for an ``api_keys`` key)."""
    out: list[tuple[bytes, NamedKey | None]] = [(k.encode(), None) for k in auth.api_keys]
    for k in auth.keys:
        policy = Policy(k.max_stage, k.stage_control)
        capped = None
        if k.over_budget_max_stage is not None:
            cap = k.over_budget_max_stage
            capped = Policy(cap if k.max_stage is None else min(cap, k.max_stage), k.stage_control)
        models = frozenset(k.cascades) if k.cascades else None
        out.append((k.key.encode(), NamedKey(k.name, policy, k.budget_usd_per_day, capped, models)))
    return tuple(out)


class Budgets:
    __slots__ = ("_clock", "_day", "_pending", "_spent")

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._day = int(clock() // DAY_S)
        self._spent: dict[str, float] = {}  # today's spend, everything known (ours and others')
        self._pending: dict[str, float] = {}  # ours not yet added to the shared store

    def _roll(self) -> int:
        day = int(self._clock() // DAY_S)
        if day != self._day:
            self._day = day
            self._spent.clear()
            self._pending.clear()
        return day

    def add(self, key: str, usd: float) -> None:
        if usd <= 0 or not math.isfinite(usd):
            return
        self._roll()
        self._spent[key] = self._spent.get(key, 0.0) + usd
        self._pending[key] = self._pending.get(key, 0.0) + usd

    def spent(self, key: str) -> float:
        self._roll()
        return self._spent.get(key, 0.0)

    def over(self, key: str, budget: float) -> bool:
        return self.spent(key) >= budget

    def retry_after(self) -> int:
        """Whole seconds until the day window ends (UTC midnight), at least 1."""
        now = self._clock()
        return max(1, math.ceil((int(now // DAY_S) + 1) * DAY_S - now))

    async def sync(self, shared: Shared) -> None:
        """Add this process's spend since the last sync to the shared store; adopt everyone's totals."""
        day = self._roll()
        sent, self._pending = self._pending, {}
        try:
            totals = await shared(day, sent)
        except (CascadeBaseError, OSError) as exc:
            for k, v in sent.items():  # not added: try again next time
                self._pending[k] = self._pending.get(k, 0.0) + v
            log.warning("budgets: the shared spend store failed", extra={"error": type(exc).__name__})
            return
        if self._roll() != day:
            return  # midnight passed meanwhile: those totals were yesterday's
        for k, total in totals.items():
            # Ours that came in during the call is not in the store's total yet.
            self._spent[k] = total + self._pending.get(k, 0.0)

    async def sync_forever(self, shared: Shared, every_s: float) -> None:
        while True:
            await self.sync(shared)
            await asyncio.sleep(every_s)
