"""One structured log line per request, without the prompt, the answer or any key."""

from __future__ import annotations

import logging
import sys
import threading

import orjson
import pytest

from app.logs import JsonFormatter, TextFormatter, setup_logging, stop_logging
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


class _Stderr:
    """Stands in for the process's stderr: records which thread writes each line."""

    def __init__(self) -> None:
        self.writes: list[tuple[str, int]] = []

    def write(self, text: str) -> int:
        self.writes.append((text, threading.get_ident()))
        return len(text)

    def flush(self) -> None:
        pass


def test_log_lines_are_written_off_the_calling_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """A request's log line must not wait on stderr (a slow pipe, a full terminal): the event loop hands
    the record over and a writer thread formats and writes it."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    err = _Stderr()
    monkeypatch.setattr(sys, "stderr", err)
    try:
        setup_logging("info", "json")
        try:
            exc = ValueError("detail")
            logging.getLogger("cascade.request").info("request", extra={"n": 1})
            logging.getLogger("cascade.app").error("failed %s", "here", exc_info=exc)
        finally:
            stop_logging()  # flushes what is queued
        logging.getLogger("cascade.app").warning("after the writer stopped")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    lines = [(orjson.loads(text), thread) for text, thread in err.writes if text.strip()]
    assert [(x["msg"], x.get("n")) for x, _ in lines] == [
        ("request", 1),
        ("failed here", None),
        ("after the writer stopped", None),
    ]
    assert lines[1][0]["error"] == "ValueError" and "Traceback" not in str(err.writes)
    me = threading.get_ident()
    assert lines[0][1] != me and lines[1][1] != me  # written by the writer thread
    assert lines[2][1] == me  # once it has stopped (at exit), directly
