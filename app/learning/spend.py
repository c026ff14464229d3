"""Key spend per day in the learning store (PostgreSQL or SQLite), so budgets hold across replicas.

One small table of its own, created on first use (``CREATE TABLE IF NOT EXISTS``: it needs no
migration and leaves the trace schema's version alone): a row per (UTC day, key name) whose ``usd``
every replica adds to in one upsert, then reads back. Rows older than a week are deleted as it goes.
"""

from __future__ import annotations

from typing import Any

from app.learning.store import Store, _Backend

KEEP_DAYS = 7
_LOCK_KEY = 7_220_114  # advisory lock: replicas creating the table at once (PostgreSQL)
_created: set[int] = set()  # backends (by id) that have made sure the table exists
_TABLE = (
    "CREATE TABLE IF NOT EXISTS key_spend (day INTEGER NOT NULL, key TEXT NOT NULL, usd {F} NOT NULL, "
    "PRIMARY KEY (day, key))"
)
_ADD = (
    "INSERT INTO key_spend (day, key, usd) VALUES (?, ?, ?) "
    "ON CONFLICT (day, key) DO UPDATE SET usd = key_spend.usd + excluded.usd"
)


def add_and_read(b: _Backend, day: int, deltas: dict[str, float]) -> dict[str, float]:
    """Add ``deltas`` to today's spend and return every key's total today (runs in the store's thread)."""
    rows = [(day, k, v) for k, v in deltas.items() if v > 0]

    def work(cur: Any) -> dict[str, float]:
        if id(b) not in _created:
            if b.postgres:
                cur.execute(f"SELECT pg_advisory_xact_lock({_LOCK_KEY})")
            cur.execute(_TABLE.format(F="DOUBLE PRECISION" if b.postgres else "REAL"))
        if rows:
            cur.executemany(b._sql(_ADD), rows)
            cur.execute(b._sql("DELETE FROM key_spend WHERE day < ?"), (day - KEEP_DAYS,))
        cur.execute(b._sql("SELECT key, usd FROM key_spend WHERE day = ?"), (day,))
        return {str(k): float(v) for k, v in cur.fetchall()}

    out = b._tx(work)
    _created.add(id(b))
    return out


def shared_spend(store: Store) -> Any:
    """The ``Shared`` function of ``app.budgets`` over ``store``."""

    async def shared(day: int, deltas: dict[str, float]) -> dict[str, float]:
        return await store.run(add_and_read, store.backend, day, deltas)

    return shared
