"""The trace store through the real HTTP path: records after requests, text only on request, free
labels, never blocking or failing a request (full queue, broken store), schema versioning."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from app.learning import store as store_mod
from app.learning.records import TraceRow
from app.learning.store import SCHEMA_VERSION, Store, StoreError
from tests.conftest import SECRET_PROMPT, base_config, chat, proxy, sse_events, two_stage, wait_for
from tests.fake_upstream import FakeUpstream
from tests.learning.learning_helpers import db_bytes, query, settle, sqlite_url, with_learning

pytestmark = pytest.mark.anyio


async def test_every_request_is_recorded_without_text(fake: FakeUpstream, tmp_path: Path) -> None:
    url = sqlite_url(tmp_path)
    cfg = with_learning(two_stage("refuse"), url, compare="exact")  # free text compared exactly
    cfg["upstreams"]["ok_up"] = {**cfg["upstreams"]["small"], "model": "ok"}
    async with proxy(cfg, fake) as (c, app):
        r1 = await c.post("/v1/chat/completions", json=chat(content=SECRET_PROMPT))  # escalates
        r2 = await c.post("/v1/chat/completions", json=chat("ok_up"))  # pass-through
        await settle(app)
    assert r1.status_code == r2.status_code == 200
    traces = query(
        url, "SELECT id, request_id, cascade, n_stages, accepted_stage, ok, prompt_text FROM traces"
    )
    by_id = {t[0]: t for t in traces}
    t1 = by_id[r1.json()["id"]]
    assert t1[1] == r1.headers["x-request-id"] and t1[2:6] == ("default", 2, 1, 1) and t1[6] is None
    assert by_id[r2.json()["id"]][2:5] == ("ok_up", 1, 0)
    atts = query(
        url,
        "SELECT stage, upstream, outcome, reason, score, threshold, scores, reasons, cost_usd, answer_hash,"
        " answer_chars, answer_text, finish_reason FROM attempts WHERE trace_id = ? ORDER BY stage",
        (r1.json()["id"],),
    )
    ext = r1.json()["cascade"]["attempts"]
    assert [(a[0], a[1], a[2], a[3]) for a in atts] == [
        (0, "small", "rejected", "low_score"),
        (1, "large", "accepted", "accepted"),
    ]
    assert atts[0][4] == 0.0 and atts[0][5] == 0.7 and json.loads(atts[0][6]) == ext[0]["scores"]
    assert json.loads(atts[0][7]) == ext[0]["reasons"]
    assert atts[0][8] == pytest.approx(ext[0]["cost_usd"]) and atts[1][8] == pytest.approx(ext[1]["cost_usd"])
    assert all(a[9] and a[10] > 0 and a[11] is None and a[12] == "stop" for a in atts)
    # The refusal is not as good as the last stage's answer: a free label 0, weight 1.
    labels = query(url, "SELECT trace_id, stage, source, value, weight FROM labels")
    assert labels == [(r1.json()["id"], 0, "free", 0.0, 1.0)]
    dump = db_bytes(url)
    assert SECRET_PROMPT.encode() not in dump and b"large says hi" not in dump


async def test_equal_json_answers_hash_alike_and_label_as_good(fake: FakeUpstream, tmp_path: Path) -> None:
    """``answer_hash`` is of the canonical answer (key order aside), the form labels compare."""
    url = sqlite_url(tmp_path)
    first = 'answer-{"a":1,"b":[2,3]}+conf-0.1'
    cfg = two_stage(first, 'answer-{"b":[2,3],"a":1}', threshold=0.99, scorers=[{"type": "logprob"}])
    async with proxy(with_learning(cfg, url), fake) as (c, app):
        r = await c.post("/v1/chat/completions", json=chat(content="Give me the JSON."))
        await settle(app)
    assert r.json()["cascade"]["upstream"] == "large"
    hashes = [h for (h,) in query(url, "SELECT answer_hash FROM attempts ORDER BY stage")]
    assert len(hashes) == 2 and hashes[0] == hashes[1] is not None
    assert query(url, "SELECT stage, source, value FROM labels") == [(0, "free", 1.0)]


async def test_store_text_keeps_prompt_and_answers(fake: FakeUpstream, tmp_path: Path) -> None:
    url = sqlite_url(tmp_path)
    async with proxy(with_learning(two_stage("refuse"), url, store_text=True), fake) as (c, app):
        await c.post("/v1/chat/completions", json=chat(content="Capital of France?"))
        await settle(app)
    assert query(url, "SELECT prompt_text FROM traces") == [("Capital of France?",)]
    texts = [r[0] for r in query(url, "SELECT answer_text FROM attempts ORDER BY stage")]
    assert texts[1] == "large says hi" and texts[0].startswith("I'm sorry")


@pytest.mark.parametrize("stream", [False, True])
async def test_free_labels_when_the_last_stage_answered(
    fake: FakeUpstream, tmp_path: Path, stream: bool
) -> None:
    # Stage 0 says "Paris" with low token confidence (rejected by the logprob scorer); the last stage says
    # "Paris" too (agree: 1.0) or "London" (0.0). Streamed, the last stage's text comes from the relay.
    url = sqlite_url(tmp_path)
    cfg = two_stage("answer-Paris+logprobs+conf-0.2", scorers=[{"type": "logprob"}])
    cfg["upstreams"]["london"] = {**cfg["upstreams"]["large"], "model": "answer-London"}
    cfg["upstreams"]["large"]["model"] = "answer-Paris"
    cfg["cascades"]["other"] = {
        "stages": [dict(cfg["cascades"]["default"]["stages"][0]), {"upstream": "london"}]
    }
    async with proxy(with_learning(cfg, url, compare="exact"), fake) as (c, app):
        for cascade in ("default", "other"):
            r = await c.post("/v1/chat/completions", json=chat(cascade, stream=stream))
            assert r.status_code == 200
            if stream:
                assert sse_events(r.text)[-1] == "[DONE]"
        await settle(app)
    got = query(
        url,
        "SELECT t.cascade, l.stage, l.source, l.value FROM labels l JOIN traces t ON t.id = l.trace_id "
        "ORDER BY t.cascade",
    )
    assert got == [("default", 0, "free", 1.0), ("other", 0, "free", 0.0)]
    assert (
        app.state.cascade.metrics.registry.get_sample_value(
            "cascade_labels_total", {"cascade": "default", "source": "free"}
        )
        == 1.0
    )


async def test_a_slow_store_never_slows_requests_and_a_full_queue_drops(
    fake: FakeUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = store_mod._Backend.write
    release, writing = threading.Event(), threading.Event()

    def stuck_write(
        self: store_mod._Backend, traces: list[TraceRow], labels: list, attempts: Any = ()
    ) -> None:  # type: ignore[type-arg]
        writing.set()
        release.wait(30)
        real_write(self, traces, labels, attempts)

    monkeypatch.setattr(store_mod._Backend, "write", stuck_write)
    url = sqlite_url(tmp_path)
    reg = CollectorRegistry()
    async with proxy(with_learning(base_config(), url, queue_size=2), fake, registry=reg) as (c, app):
        try:
            first = await c.post("/v1/chat/completions", json=chat())
            await wait_for(writing.is_set, "the first record's write is stuck")
            # Requests that waited for the store would never be answered while its write is stuck.
            async with asyncio.timeout(10):
                rs = await asyncio.gather(*(c.post("/v1/chat/completions", json=chat()) for _ in range(11)))
            assert all(r.status_code == 200 for r in [first, *rs])
        finally:
            release.set()
        await settle(app)
    dropped = reg.get_sample_value("cascade_trace_dropped_total", {"reason": "queue_full"})
    stored = query(url, "SELECT count(*) FROM traces")[0][0]
    assert dropped is not None and dropped >= 1
    assert stored + dropped == 12


async def test_a_broken_store_drops_records_but_serves(fake: FakeUpstream, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    reg = CollectorRegistry()
    url = f"sqlite:///{tmp_path / 'file' / 'traces.db'}"  # its parent is a file: cannot be created
    async with proxy(with_learning(base_config(), url), fake, registry=reg) as (c, app):
        r = await c.post("/v1/chat/completions", json=chat())
        assert r.status_code == 200
        await settle(app)
    assert reg.get_sample_value("cascade_trace_dropped_total", {"reason": "store_error"}) == 1.0


async def test_feedback_while_the_store_is_down_is_503_not_a_label_thrown_away(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    """A label for an answer whose record is still queued was acknowledged (200, counted in
    ``cascade_labels_total``) although the store could not be opened and the writer dropped it."""
    (tmp_path / "file").write_text("not a directory")
    reg = CollectorRegistry()
    url = f"sqlite:///{tmp_path / 'file' / 'traces.db'}"
    async with proxy(with_learning(base_config(), url), fake, registry=reg) as (c, app):
        for _ in range(5):
            cid = (await c.post("/v1/chat/completions", json=chat())).json()["id"]
            r = await c.post("/v1/feedback", json={"id": cid, "score": 1})  # queued or not: 503
            assert r.status_code == 503 and r.json()["error"]["code"] == "store_unavailable", r.text
        await settle(app)
    assert reg.get_sample_value("cascade_labels_total", {"cascade": "default", "source": "user"}) is None


async def test_a_sqlite_file_deleted_while_serving_is_created_again(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    """Deleting the SQLite file under a running proxy (a clean-up job, a restore) lost every record after
    it, silently: writes went on into the deleted file, and a reader reopened the path to an empty
    database without tables (feedback then 503 until a restart)."""
    url = sqlite_url(tmp_path)
    path = Path(url.removeprefix("sqlite:///"))
    async with proxy(with_learning(base_config(), url), fake) as (c, app):
        first = (await c.post("/v1/chat/completions", json=chat())).json()["id"]
        await settle(app)
        assert (await c.post("/v1/feedback", json={"id": first, "score": 1})).status_code == 200
        for f in path.parent.glob(path.name + "*"):  # the database, its WAL and shared memory
            f.unlink()
        second = (await c.post("/v1/chat/completions", json=chat())).json()["id"]
        await settle(app)
        r = await c.post("/v1/feedback", json={"id": second, "score": 0})
        assert r.status_code == 200, r.text
        assert (await c.post("/v1/feedback", json={"id": first, "score": 1})).status_code == 404  # gone
        await settle(app)
    assert query(url, "SELECT id FROM traces") == [(second,)]
    assert query(url, "SELECT trace_id, value FROM labels") == [(second, 0.0)]


async def test_schema_is_versioned_and_a_newer_one_is_refused(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path)
    for _ in range(2):  # opening again is a no-op
        s = Store(url)
        assert await s.open() == SCHEMA_VERSION
        await s.close()
    assert query(url, "SELECT version FROM schema_version ORDER BY version") == [
        (v,) for v in range(1, SCHEMA_VERSION + 1)
    ]
    assert query(url, "PRAGMA journal_mode") == [("wal",)]
    conn_rows = query(url, "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
    assert {"traces", "attempts", "labels", "fits", "schema_version"} <= {r[0] for r in conn_rows}
    import sqlite3

    conn = sqlite3.connect(url.removeprefix("sqlite:///"))
    conn.execute("INSERT INTO schema_version VALUES (99)")
    conn.commit()
    conn.close()
    s = Store(url)
    with pytest.raises(StoreError, match="newer"):
        await s.open()
    await s.close()


async def test_an_absurd_usage_report_is_estimated_and_recorded(fake: FakeUpstream, tmp_path: Path) -> None:
    """``prompt_tokens: 2**64-1`` fits no INTEGER column (SQLite raised OverflowError, which ended the
    writer for good). It is no token count: the attempt is charged an estimate, and recorded."""
    url = sqlite_url(tmp_path)
    cfg = with_learning(base_config(), url)
    cfg["upstreams"]["small"]["model"] = f"ptokens-{2**64 - 1}"
    async with proxy(cfg, fake) as (c, app):
        for stream in (False, True):
            r = await c.post("/v1/chat/completions", json=chat("small", stream=stream))
            assert r.status_code == 200
        r = await c.post("/v1/chat/completions", json=chat())
        assert r.status_code == 200 and r.json()["cascade"]["attempts"][0]["usage_estimated"] is True
        assert r.json()["usage"]["prompt_tokens"] < 1000
        async with asyncio.timeout(10):
            await settle(app)
        r = await c.post("/v1/chat/completions", json=chat("large"))
        async with asyncio.timeout(10):
            await settle(app)
    got = query(url, "SELECT a.prompt_tokens FROM attempts a JOIN traces t ON t.id = a.trace_id")
    assert len(got) == 4 and all(0 < pt < 1000 for (pt,) in got)


async def test_a_record_the_store_cannot_take_is_dropped_alone_and_the_writer_carries_on(
    fake: FakeUpstream, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Whatever the cause (here a value no INTEGER column holds, put on a finished trace), a record that
    cannot be written is dropped and counted on its own; the rest of its batch and every later one is
    written, and the log line names no data."""
    url = sqlite_url(tmp_path)
    reg = CollectorRegistry()
    async with proxy(with_learning(base_config(), url), fake, registry=reg) as (c, app):
        learning = app.state.cascade.learning
        real = learning.on_finish
        poisoned: list[str] = []

        def poison(trace: Any, ok: bool, seconds: float) -> None:
            if trace.request["messages"][0]["content"] == "poison":
                trace.attempts[0].prompt_tokens = 2**64 - 1
                poisoned.append(trace.completion_id)
            real(trace, ok, seconds)

        rt = app.state.cascade.runtime
        rt.finish_hooks[rt.finish_hooks.index(real)] = poison
        # One batch: the writer takes everything queued when it wakes; the replies come first.
        rs = await asyncio.gather(
            *(c.post("/v1/chat/completions", json=chat(content=t)) for t in ("a", "poison", "b"))
        )
        async with asyncio.timeout(10):
            await settle(app)
        later = await c.post("/v1/chat/completions", json=chat(content="after"))
        async with asyncio.timeout(10):
            await settle(app)
    ids = {r[0] for r in query(url, "SELECT id FROM traces")}
    assert len(poisoned) == 1 and poisoned[0] not in ids
    assert ids == {r.json()["id"] for r in [*rs, later]} - set(poisoned)
    assert reg.get_sample_value("cascade_trace_dropped_total", {"reason": "bad_record"}) == 1.0
    logged = [rec for rec in caplog.records if rec.name == "cascade.learning" and rec.levelname == "WARNING"]
    assert logged and all("poison" not in rec.getMessage() for rec in logged)


async def test_a_slow_read_does_not_hold_up_trace_writes(
    fake: FakeUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reads (a /v1/feedback lookup, the tuner's queries) use a connection and thread of their own: while
    one is stuck, requests are still recorded."""
    url = sqlite_url(tmp_path)
    release, entered = threading.Event(), threading.Event()
    real = store_mod._Backend.trace_info

    def stuck(self: store_mod._Backend, trace_id: str) -> Any:
        entered.set()
        release.wait(30)
        return real(self, trace_id)

    monkeypatch.setattr(store_mod._Backend, "trace_info", stuck)
    async with proxy(with_learning(base_config(), url), fake) as (c, app):
        lookup = asyncio.create_task(c.post("/v1/feedback", json={"id": "chatcmpl-unknown", "score": 1.0}))
        try:
            await wait_for(entered.is_set, "the lookup is stuck")
            r = await c.post("/v1/chat/completions", json=chat())
            async with asyncio.timeout(10):
                await settle(app)
            assert query(url, "SELECT id FROM traces") == [(r.json()["id"],)]
            assert not lookup.done()
        finally:
            release.set()
        assert (await lookup).status_code == 404


async def test_closing_the_store_is_bounded_even_with_a_write_stuck(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hung database call must not hold up shutdown: close() gives up on it after its bound."""
    release = threading.Event()
    stuck = threading.Event()

    def hang(self: store_mod._Backend, traces: Any, labels: Any, attempts: Any = ()) -> None:
        stuck.set()
        release.wait(30)

    s = Store(sqlite_url(tmp_path))
    await s.open()
    monkeypatch.setattr(store_mod._Backend, "write", hang)
    writing = asyncio.create_task(s.write([], []))
    try:
        await wait_for(stuck.is_set, "the write hangs")
        async with asyncio.timeout(10):
            await s.close(timeout_s=0.1)
        assert not writing.done()  # close() returned while the write was still stuck
    finally:
        release.set()
    writing.cancel()
    await asyncio.gather(writing, return_exceptions=True)


async def test_a_streamed_tool_call_is_recorded_like_a_non_streamed_one(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    """The last stage streams straight through; its tool call is assembled from the deltas and stored
    as the same text (calls as compact JSON) a non-streamed answer gets, so labels compare like with like."""
    url = sqlite_url(tmp_path)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    async with proxy(with_learning(two_stage("refuse", "tools"), url, store_text=True), fake) as (c, app):
        for stream in (False, True):
            r = await c.post("/v1/chat/completions", json=chat(tools=tools, stream=stream))
            assert r.status_code == 200
        await settle(app)
    texts = [r[0] for r in query(url, "SELECT answer_text FROM attempts WHERE stage = 1 ORDER BY rowid")]
    assert len(texts) == 2 and texts[0] and texts[0] == texts[1]
    calls = json.loads(texts[1])
    assert calls[0]["name"] == "get_weather" and json.loads(calls[0]["arguments"]) is not None
