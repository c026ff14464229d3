"""Trace retention: traces older than ``learning.retention_days`` go, with their attempts and labels,
at start and hourly, in small transactions; newer ones and everything with ``retention_days: 0`` stay."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest

from app.learning import service as service_mod
from app.learning.store import SCHEMA_VERSION, Store
from tests.conftest import base_config, chat, proxy, two_stage
from tests.fake_upstream import FakeUpstream
from tests.learning.learning_helpers import learning_of, query, settle, sqlite_url, synthetic, with_learning

pytestmark = pytest.mark.anyio

DAY = 86400.0


def age(url: str, ids: list[str], days: float) -> None:
    """Make the given traces (and their labels) ``days`` old."""
    conn = sqlite3.connect(url.removeprefix("sqlite:///"))
    with conn:
        for tid in ids:
            conn.execute("UPDATE traces SET created = ? WHERE id = ?", (time.time() - days * DAY, tid))
    conn.close()


def rows(url: str, table: str, ids: list[str]) -> int:
    column = "id" if table == "traces" else "trace_id"
    marks = ",".join("?" * len(ids))
    return int(query(url, f"SELECT count(*) FROM {table} WHERE {column} IN ({marks})", tuple(ids))[0][0])


async def test_old_traces_go_with_their_attempts_and_labels(fake: FakeUpstream, tmp_path: Path) -> None:
    url = sqlite_url(tmp_path)
    # escalates: free labels too (the refusal next to the answer, compared exactly)
    cfg = with_learning(two_stage("refuse"), url, retention_days=7, compare="exact")
    async with proxy(cfg, fake) as (c, app):
        ids = [(await c.post("/v1/chat/completions", json=chat())).json()["id"] for _ in range(4)]
        await settle(app)
        old, recent = ids[:3], ids[3:]
        fb = await c.post("/v1/feedback", json={"id": old[0], "score": 1.0})
        assert fb.status_code == 200
        await settle(app)
        assert rows(url, "labels", old) == 4  # 3 free + 1 user
        age(url, old, days=8)
        age(url, recent, days=6)
        assert await learning_of(app).prune() == 3
        assert await learning_of(app).prune() == 0  # nothing left to do
        # Feedback for a pruned answer is for an unknown id now.
        gone = await c.post("/v1/feedback", json={"id": old[1], "score": 1.0})
        assert gone.status_code == 404
    for table in ("traces", "attempts", "labels"):
        assert rows(url, table, old) == 0, table
    assert rows(url, "traces", recent) == 1 and rows(url, "attempts", recent) == 2
    assert rows(url, "labels", recent) == 1


async def test_pruning_runs_at_start_in_small_batches(
    fake: FakeUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = sqlite_url(tmp_path)
    cfg = with_learning(two_stage("ok"), url, retention_days=30)
    traces, labels = synthetic(cfg, 25)
    store = Store(url)
    await store.open()
    await store.write(traces, labels)
    await store.close()
    old = [t.id for t in traces[:23]]
    age(url, old, days=31)
    calls: list[int] = []
    real = Store.prune

    async def counting(self: Store, before: float, limit: int = 1000) -> int:
        n = await real(self, before, limit)
        calls.append(n)
        return n

    monkeypatch.setattr(service_mod, "PRUNE_BATCH", 5)
    monkeypatch.setattr(Store, "prune", counting)
    async with proxy(cfg, fake) as (c, _):
        for _ in range(100):  # the retention task runs once at start, then hourly
            if sum(calls) == 23:
                break
            await asyncio.sleep(0.02)
        assert (await c.post("/v1/chat/completions", json=chat())).status_code == 200
    assert calls == [5, 5, 5, 5, 3]
    assert int(query(url, "SELECT count(*) FROM traces")[0][0]) == 3  # 2 recent + the request above
    assert rows(url, "labels", old) == 0


async def test_retention_zero_keeps_everything(fake: FakeUpstream, tmp_path: Path) -> None:
    url = sqlite_url(tmp_path)
    async with proxy(with_learning(base_config(), url, retention_days=0), fake) as (c, app):
        rid = (await c.post("/v1/chat/completions", json=chat())).json()["id"]
        await settle(app)
        age(url, [rid], days=3650)
        assert await learning_of(app).prune() == 0
    assert rows(url, "traces", [rid]) == 1


async def test_a_version_1_store_migrates_to_the_current_schema(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path)
    Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True)
    conn = sqlite3.connect(url.removeprefix("sqlite:///"))
    with conn:  # a store written by the first release
        from app.learning.store import MIGRATIONS

        for ddl in MIGRATIONS[0]:
            conn.execute(ddl.format(F="REAL", ID="INTEGER PRIMARY KEY AUTOINCREMENT"))
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        conn.execute("INSERT INTO schema_version VALUES (1)")
        conn.execute(  # with one trace in it
            "INSERT INTO traces VALUES ('t1', 'r1', 'default', 'fp', 0, 1.0, 1, 0, 2, 0, 0.1, 0.2, 5.0, "
            "'h', 3, NULL)"
        )
    conn.close()
    s = Store(url)
    assert await s.open() == SCHEMA_VERSION == 3
    # v3: the trace gained an (empty) sampling outcome, and incremental reads see it
    assert [t[:4] for t in (await s.traces_after("default", "fp", 0, 10)).traces] == [(1, "t1", 2, 0)]
    await s.close()
    indexes = {r[0] for r in query(url, "SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {"traces_created", "traces_plan_seq"} <= indexes
    assert query(url, "SELECT sampling FROM traces") == [("",)]


async def test_pruning_keeps_the_newest_trace_so_sqlite_never_reuses_row_ids(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    """SQLite numbers a new row after the largest row id in the table: once retention emptied ``traces``
    (a quiet spell longer than ``retention_days``), new traces started again at 1, below what the online
    tuner had read up to, and it missed every one of them until the numbers caught up."""
    url = sqlite_url(tmp_path)
    async with proxy(with_learning(two_stage("ok"), url, retention_days=7), fake) as (c, app):
        ids = [(await c.post("/v1/chat/completions", json=chat())).json()["id"] for _ in range(3)]
        await settle(app)
        before = max(r[0] for r in query(url, "SELECT rowid FROM traces"))
        age(url, ids, days=8)
        assert await learning_of(app).prune() == 2  # all old; the newest stays
        assert await learning_of(app).prune() == 0
        new = (await c.post("/v1/chat/completions", json=chat())).json()["id"]
        await settle(app)
    [(rowid,)] = query(url, "SELECT rowid FROM traces WHERE id = ?", (new,))
    assert rowid > before
    assert [r[0] for r in query(url, "SELECT id FROM traces ORDER BY rowid")] == [ids[-1], new]
