"""Key budgets across replicas: two apps sharing one learning store (SQLite here, PostgreSQL when
``scripts/test`` provides one) see each other's spend, so a key over its budget on one is over on both."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import chat, proxy, two_stage, wait_for
from tests.fake_upstream import FakeUpstream
from tests.learning.learning_helpers import sqlite_url, with_learning
from tests.learning.test_postgres import pg_url  # noqa: F401  (the fixture)

pytestmark = pytest.mark.anyio

KEY = "team-a-key-0123456789"


def replica_config(store: str) -> dict[str, Any]:
    cfg = with_learning(two_stage("answer-small"), store)
    cfg["auth"] = {
        "budget_sync_s": 0.05,
        "keys": [{"name": "team-a", "key": KEY, "budget_usd_per_day": 1e-9}],
    }
    return cfg


async def _budget_holds_across_replicas(store: str) -> None:
    cfg = replica_config(store)
    headers = {"authorization": f"Bearer {KEY}"}
    fake_a, fake_b = FakeUpstream(), FakeUpstream()
    async with proxy(cfg, fake_a) as (a, _), proxy(cfg, fake_b) as (b, app_b):
        first = await a.post("/v1/chat/completions", json=chat(), headers=headers)
        assert first.status_code == 200, first.text
        spent = first.json()["cascade"]["cost_usd"]
        budgets_b = app_b.state.cascade.budgets
        await wait_for(lambda: budgets_b.spent("team-a") >= spent * 0.999, "replica B saw A's spend")
        r = await b.post("/v1/chat/completions", json=chat(), headers=headers)
    assert r.status_code == 429 and r.json()["error"]["code"] == "budget_exceeded"
    assert fake_b.requests == []  # replica B never called an upstream for it


async def test_a_budget_holds_across_replicas_sharing_sqlite(tmp_path: Path) -> None:
    await _budget_holds_across_replicas(sqlite_url(tmp_path))


async def test_a_budget_holds_across_replicas_sharing_postgres(pg_url: str) -> None:  # noqa: F811
    await _budget_holds_across_replicas(pg_url)
