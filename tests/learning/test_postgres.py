"""The PostgreSQL trace store, on a real server: records and labels through the proxy, schema set up by
replicas starting together, and two replicas converging on the same fitted thresholds.

``scripts/test`` (and so CI) starts a throw-away server with ``scripts/postgres`` and exports its URL
as CASCADE_TEST_POSTGRES_URL, with CASCADE_TEST_REQUIRE_POSTGRES=1: there these tests fail when the
server is missing. A plain ``pytest`` run without the URL skips them.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from app.learning.store import SCHEMA_VERSION, Store
from tests.conftest import base_config, chat, proxy
from tests.fake_upstream import FakeUpstream
from tests.learning.learning_helpers import learning_of, settle, synthetic, with_learning

pytestmark = pytest.mark.anyio

# Read at import: the autouse fixture in conftest clears CASCADE_* variables for every test.
PG_URL = os.environ.get("CASCADE_TEST_POSTGRES_URL")
REQUIRED = os.environ.get("CASCADE_TEST_REQUIRE_POSTGRES") == "1"


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    """A fresh database on the test server, dropped afterwards."""
    if not PG_URL:
        if REQUIRED:
            pytest.fail("CASCADE_TEST_POSTGRES_URL is not set: scripts/postgres did not start PostgreSQL")
        pytest.skip(
            "no PostgreSQL: run scripts/test, or export CASCADE_TEST_POSTGRES_URL=$(scripts/postgres start)"
        )
    import psycopg

    name = f"cascade_t_{uuid.uuid4().hex[:12]}"
    async with await psycopg.AsyncConnection.connect(PG_URL, autocommit=True) as conn:
        await conn.execute(f"CREATE DATABASE {name}")
    base, _, _ = PG_URL.rpartition("/")
    try:
        yield f"{base}/{name}"
    finally:
        async with await psycopg.AsyncConnection.connect(PG_URL, autocommit=True) as conn:
            await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


async def _rows(url: str, sql: str) -> list[tuple[Any, ...]]:
    import psycopg

    async with await psycopg.AsyncConnection.connect(url) as conn:
        cur = await conn.execute(sql)
        return list(await cur.fetchall())


async def test_records_labels_and_feedback_in_postgres(fake: FakeUpstream, pg_url: str) -> None:
    cfg = with_learning(base_config(), pg_url, shadow_rate=1.0)
    cfg["upstreams"]["refuser"] = {**cfg["upstreams"]["small"], "model": "refuse"}
    cfg["cascades"]["esc"] = {
        "stages": [
            {"upstream": "refuser", "threshold": 0.7, "scorers": [{"type": "heuristic"}]},
            {"upstream": "large"},
        ]
    }
    async with proxy(cfg, fake) as (c, app):
        r1 = await c.post("/v1/chat/completions", json=chat())  # accepted at stage 0: shadowed
        r2 = await c.post("/v1/chat/completions", json=chat("esc"))  # escalated: a free label
        await settle(app)
        fb = await c.post("/v1/feedback", json={"id": r1.json()["id"], "score": 0.5})
        assert fb.status_code == 200
        assert (
            await c.post("/v1/feedback", json={"id": "chatcmpl-unknown", "score": 0.5})
        ).status_code == 404
    traces = await _rows(
        pg_url, "SELECT id, cascade, accepted_stage, prompt_text FROM traces ORDER BY cascade"
    )
    assert [(t[1], t[2], t[3]) for t in traces] == [("default", 0, None), ("esc", 1, None)]
    labels = await _rows(pg_url, "SELECT trace_id, stage, source, value FROM labels ORDER BY source")
    assert labels == [
        (r2.json()["id"], 0, "free", 0.0),
        (r1.json()["id"], 0, "shadow", 0.0),  # "42" vs "large says hi"
        (r1.json()["id"], None, "user", 0.5),
    ]
    assert await _rows(pg_url, "SELECT count(*) FROM attempts") == [(3,)]


async def test_replicas_starting_together_share_one_schema(pg_url: str) -> None:
    stores = [Store(pg_url) for _ in range(4)]
    assert await asyncio.gather(*(s.open() for s in stores)) == [SCHEMA_VERSION] * 4
    for s in stores:
        await s.close()
    assert await _rows(pg_url, "SELECT version FROM schema_version") == [(SCHEMA_VERSION,)]


async def test_two_replicas_converge_on_the_same_thresholds(fake: FakeUpstream, pg_url: str) -> None:
    cfg = with_learning(
        base_config(),
        pg_url,
        auto_tune=True,
        target_quality=0.9,
        tune_every=10,
        min_labels=50,
        max_step=0.05,
        sync_every_s=0.05,
    )
    store = Store(pg_url)
    await store.open()
    traces, labels = synthetic(cfg, 400)
    await store.write(traces, labels)
    await store.close()

    async with proxy(cfg, fake) as (ca, a), proxy(cfg, fake) as (cb, b):
        plans = [x.state.cascade.runtime.plans.get("default") for x in (a, b)]

        async def both(value: float) -> None:
            async with asyncio.timeout(10):
                while any(p.thresholds[0] != pytest.approx(value) for p in plans):  # noqa: ASYNC110
                    await asyncio.sleep(0.01)

        await both(0.65)
        # New labels arrive at replica A only; B adopts A's fit from the store.
        for t in traces[:10]:
            assert (await ca.post("/v1/feedback", json={"id": t.id, "score": 1.0})).status_code == 200
        await both(0.60)
        assert learning_of(a)._meta["default"].fit_version == learning_of(b)._meta["default"].fit_version == 2
        for client in (ca, cb):
            r = await client.post("/v1/chat/completions", json=chat())
            assert r.json()["cascade"]["attempts"][0]["threshold"] == pytest.approx(0.60)
    fits = await _rows(pg_url, "SELECT version, thresholds FROM fits ORDER BY version")
    assert fits == [(1, "[0.65]"), (2, "[0.6]")]
