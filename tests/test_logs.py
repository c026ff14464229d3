"""One structured log line per request, without the prompt, the answer or any key."""

from __future__ import annotations

import logging

import orjson
import pytest

from app.logs import JsonFormatter, TextFormatter
from tests.conftest import chat, proxy, two_stage
from tests.fake_upstream import FakeUpstream

pytestmark = pytest.mark.anyio

PROMPT = "PROMPT-MARKER-do-not-log-7f3a"


async def test_one_json_line_per_request(fake: FakeUpstream, caplog: pytest.LogCaptureFixture) -> None:
    cfg = two_stage("refuse")
    cfg["upstreams"]["small"]["api_key"] = "sk-LOGTEST-secret-123456"
    caplog.set_level(logging.INFO)
    async with proxy(cfg, fake) as (c, _):
        await c.post("/v1/chat/completions", json=chat(content=PROMPT), headers={"x-request-id": "rid-1"})
        await c.post("/v1/chat/completions", json=chat(content=PROMPT, stream=True))
    records = [r for r in caplog.records if r.name == "cascade.request"]
    assert len(records) == 2
    line = orjson.loads(JsonFormatter().format(records[0]))
    assert line["msg"] == "request" and line["level"] == "info"
    assert line["request_id"] == "rid-1"
    assert (line["cascade"], line["stage"], line["upstream"], line["escalations"]) == (
        "default",
        1,
        "large",
        1,
    )
    assert line["outcome"] == "success" and line["cost_usd"] > 0 and line["latency_ms"] >= 0
    assert orjson.loads(JsonFormatter().format(records[1]))["stream"] is True
    for r in caplog.records:
        for fmt in (JsonFormatter(), TextFormatter()):
            text = fmt.format(r)
            assert PROMPT not in text and "LOGTEST" not in text and "large says hi" not in text


def test_exceptions_are_logged_without_a_stack_trace() -> None:
    try:
        raise ValueError("detail")
    except ValueError as exc:
        record = logging.LogRecord(
            "x", logging.ERROR, __file__, 1, "failed", (), (ValueError, exc, exc.__traceback__)
        )
    line = orjson.loads(JsonFormatter().format(record))
    assert line["error"] == "ValueError" and "test_logs.py" in line["where"]
    assert "Traceback" not in JsonFormatter().format(record) and "Traceback" not in TextFormatter().format(
        record
    )
