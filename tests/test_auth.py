"""Proxy API keys on /v1/*, never on health probes, on /metrics only when asked."""

from __future__ import annotations

import pytest

from tests.conftest import base_config, chat, proxy
from tests.fake_upstream import FakeUpstream
from tests.schema import check_error

pytestmark = pytest.mark.anyio


def _cfg(protect_metrics: bool = False) -> dict:  # type: ignore[type-arg]
    cfg = base_config()
    cfg["auth"] = {"api_keys": ["key-one", "key-two"], "protect_metrics": protect_metrics}
    return cfg


async def test_keys_required_on_v1(fake: FakeUpstream) -> None:
    async with proxy(_cfg(), fake) as (c, _):
        missing = await c.post("/v1/chat/completions", json=chat())
        wrong = await c.post("/v1/chat/completions", json=chat(), headers={"authorization": "Bearer nope"})
        bearer = await c.post(
            "/v1/chat/completions", json=chat(), headers={"authorization": "Bearer key-two"}
        )
        xkey = await c.post("/v1/chat/completions", json=chat(), headers={"x-api-key": "key-one"})
        models = await c.get("/v1/models")
        health = await c.get("/healthz")
        ready = await c.get("/readyz")
        metrics = await c.get("/metrics")
    for r in (missing, wrong):
        assert r.status_code == 401
        check_error(r.json())
        assert "key-one" not in r.text
    assert missing.json()["error"]["code"] == "missing_api_key"
    assert wrong.json()["error"]["code"] == "invalid_api_key"
    assert bearer.status_code == 200 and xkey.status_code == 200
    assert models.status_code == 401
    assert health.status_code == ready.status_code == metrics.status_code == 200
    assert not any(r["body"].get("messages") is None for r in fake.requests)
    assert len(fake.requests) == 2  # rejected requests never reached an upstream


async def test_metrics_protected_when_asked(fake: FakeUpstream) -> None:
    async with proxy(_cfg(protect_metrics=True), fake) as (c, _):
        assert (await c.get("/metrics")).status_code == 401
        assert (await c.get("/metrics", headers={"authorization": "Bearer key-one"})).status_code == 200
