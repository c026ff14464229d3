"""Requests refused before the cascade ran (400, 401, 404, 413) are counted as
``cascade_requests_total{outcome="invalid"}`` and logged in one line without the body."""

from __future__ import annotations

import logging

import pytest
from prometheus_client import CollectorRegistry

from tests.conftest import SECRET_PROMPT, base_config, chat, proxy
from tests.fake_upstream import FakeUpstream

pytestmark = pytest.mark.anyio


def _invalid(registry: CollectorRegistry, cascade: str) -> float:
    return (
        registry.get_sample_value("cascade_requests_total", {"cascade": cascade, "outcome": "invalid"}) or 0.0
    )


async def test_refused_requests_are_counted_and_logged_without_the_body(
    fake: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    registry = CollectorRegistry()
    cfg = base_config()
    cfg["server"]["max_body_bytes"] = 4096
    caplog.set_level(logging.INFO, logger="cascade.request")
    async with proxy(cfg, fake, registry=registry) as (c, _):
        bad_field = await c.post("/v1/chat/completions", json=chat(content=SECRET_PROMPT, temperature=9))
        unknown = await c.post("/v1/chat/completions", json=chat("no-such-" + SECRET_PROMPT))
        not_json = await c.post("/v1/chat/completions", content=b"{" + SECRET_PROMPT.encode())
        too_large = await c.post("/v1/chat/completions", json=chat(content="x" * 5000))
        resp_bad = await c.post(
            "/v1/responses", json={"model": "large", "input": SECRET_PROMPT, "store": True}
        )
        ok = await c.post("/v1/chat/completions", json=chat())
    assert [r.status_code for r in (bad_field, unknown, not_json, too_large, resp_bad, ok)] == [
        400, 404, 400, 413, 400, 200,
    ]  # fmt: skip
    # The label is a configured cascade or upstream, else empty: a client's model string is no label.
    assert _invalid(registry, "default") == 1  # bad_field
    assert _invalid(registry, "large") == 1
    assert _invalid(registry, "") == 3  # unknown model, unparsable body, too large (never read)
    assert (
        registry.get_sample_value("cascade_requests_total", {"cascade": "default", "outcome": "success"}) == 1
    )
    lines = [r for r in caplog.records if r.getMessage() == "refused"]
    assert len(lines) == 5
    first = lines[0].__dict__
    assert (first["status"], first["code"], first["param"], first["cascade"]) == (
        400, "invalid_request", "temperature", "default"
    )  # fmt: skip
    assert (
        first["path"] == "/v1/chat/completions" and first["request_id"] == bad_field.headers["x-request-id"]
    )
    assert [r.__dict__["status"] for r in lines] == [400, 404, 400, 413, 400]
    assert lines[4].__dict__["path"] == "/v1/responses" and lines[4].__dict__["param"] == "store"
    # (the session's secret watch fails the run if SECRET_PROMPT reached any log record)


async def test_a_bad_key_is_refused_and_counted(fake: FakeUpstream) -> None:
    registry = CollectorRegistry()
    cfg = base_config()
    cfg["auth"] = {"api_keys": ["k-1"]}
    async with proxy(cfg, fake, registry=registry) as (c, _):
        r = await c.post("/v1/chat/completions", json=chat(), headers={"authorization": "Bearer nope"})
    assert r.status_code == 401
    assert _invalid(registry, "") == 1  # the body is not read before the key is checked
