"""The cascade through the proxy's HTTP path (in-process ASGI), every path of CONTRACT section 1."""

from __future__ import annotations

from typing import Any

import httpx
import orjson
import pytest
from asgi_lifespan import LifespanManager
from prometheus_client import CollectorRegistry

from app import main as main_module
from app.config import parse_config
from app.main import create_app
from tests.conftest import Router, base_config, chat, proxy, sse_events, two_stage, upstream
from tests.fake_upstream import BAD_CHUNKS, FakeUpstream
from tests.schema import check_chunk, check_completion, check_error

pytestmark = pytest.mark.anyio


def _attempts(body: dict[str, Any]) -> list[tuple[int, str, str]]:
    return [(a["stage"], a["upstream"], a["outcome"]) for a in body["cascade"]["attempts"]]


async def test_accept_at_stage_zero(fake: FakeUpstream) -> None:
    async with proxy(base_config(), fake) as (c, _):
        r = await c.post("/v1/chat/completions", json=chat())
    assert r.status_code == 200
    body = r.json()
    check_completion(body)
    assert body["choices"][0]["message"]["content"] == "The answer is 42."
    assert body["model"] == "ok"  # the model name the accepting upstream returned
    assert body["id"].startswith("chatcmpl-") and body["id"] != "chatcmpl-fake-1"
    ext = body["cascade"]
    assert (ext["stage"], ext["upstream"], ext["escalations"]) == (0, "small", 0)
    assert _attempts(body) == [(0, "small", "accepted")]
    assert ext["attempts"][0]["scores"] == {"heuristic": 1.0}
    # cost = 7 prompt tokens * $0.1/M + 4 completion tokens * $0.2/M; baseline at the last stage's prices.
    assert ext["cost_usd"] == pytest.approx((7 * 0.1 + 4 * 0.2) / 1e6)
    assert ext["baseline_cost_usd"] == pytest.approx((7 * 10 + 4 * 20) / 1e6)
    assert ext["savings_usd"] == pytest.approx(ext["baseline_cost_usd"] - ext["cost_usd"])
    assert r.headers["x-cascade-upstream"] == "small"
    assert r.headers["x-cascade-stage"] == "0"
    assert r.headers["x-cascade-escalations"] == "0"
    assert float(r.headers["x-cascade-cost-usd"]) == pytest.approx(ext["cost_usd"])
    assert r.headers["x-request-id"]
    assert len(fake.requests) == 1 and fake.requests[0]["body"]["model"] == "ok"


async def test_ids_are_unique_and_request_id_is_echoed(fake: FakeUpstream) -> None:
    async with proxy(base_config(), fake) as (c, _):
        r1 = await c.post("/v1/chat/completions", json=chat(), headers={"x-request-id": "trace-abc.1"})
        r2 = await c.post("/v1/chat/completions", json=chat())
    assert r1.headers["x-request-id"] == "trace-abc.1"
    assert r1.json()["id"] != r2.json()["id"]


@pytest.mark.parametrize(
    ("model", "detail"),
    [
        ("refuse", "refusal"),
        ("empty", "empty answer"),
        ("truncated", "truncated: finish_reason is length"),
    ],
)
async def test_escalates_on_low_score(fake: FakeUpstream, model: str, detail: str) -> None:
    async with proxy(two_stage(model), fake) as (c, _):
        r = await c.post("/v1/chat/completions", json=chat())
    body = r.json()
    check_completion(body)
    assert r.status_code == 200
    assert body["choices"][0]["message"]["content"] == "large says hi"
    assert _attempts(body) == [(0, "small", "rejected"), (1, "large", "accepted")]
    first = body["cascade"]["attempts"][0]
    assert first["reason"] == "low_score" and first["detail"] == detail and first["score"] == 0.0
    assert body["cascade"]["escalations"] == 1
    assert r.headers["x-cascade-stage"] == "1" and r.headers["x-cascade-escalations"] == "1"
    # Both answers were paid for.
    assert body["cascade"]["cost_usd"] == pytest.approx(
        sum(a["cost_usd"] for a in body["cascade"]["attempts"])
    )


async def test_a_cut_at_the_clients_own_max_tokens_is_not_escalated(fake: FakeUpstream) -> None:
    """``finish_reason: length`` from the client's own limit is what it asked for; from a limit the proxy
    added (the upstream's ``defaults``) it is a truncated answer, escalated as before."""
    async with proxy(two_stage("truncated"), fake) as (c, _):
        own = (await c.post("/v1/chat/completions", json=chat(max_tokens=5))).json()
        own_mct = (await c.post("/v1/chat/completions", json=chat(max_completion_tokens=5))).json()
        resp = (
            await c.post("/v1/responses", json={"model": "default", "input": "x", "max_output_tokens": 16})
        ).json()
    for body in (own, own_mct):
        check_completion(body)
        assert _attempts(body) == [(0, "small", "accepted")]
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["cascade"]["attempts"][0]["reasons"]["heuristic"] == "cut at the client's max_tokens"
    assert resp["status"] == "incomplete" and resp["cascade"]["stage"] == 0
    cfg = two_stage("truncated")
    cfg["upstreams"]["small"]["defaults"] = {"max_tokens": 5}
    async with proxy(cfg, fake) as (c, _):
        body = (await c.post("/v1/chat/completions", json=chat())).json()
    assert _attempts(body) == [(0, "small", "rejected"), (1, "large", "accepted")]
    assert fake.requests[-2]["body"]["max_tokens"] == 5  # the proxy's limit, not the client's


async def test_escalates_on_upstream_500_after_retry(fake: FakeUpstream) -> None:
    async with proxy(two_stage("error-500"), fake) as (c, _):
        r = await c.post("/v1/chat/completions", json=chat())
    body = r.json()
    assert r.status_code == 200
    assert _attempts(body) == [(0, "small", "error"), (1, "large", "accepted")]
    assert body["cascade"]["attempts"][0]["reason"] == "upstream_error"
    assert "HTTP 500" in body["cascade"]["attempts"][0]["detail"]
    assert fake.counts["error-500"] == 2  # max_retries: 1 -> two tries inside one attempt


async def test_retry_recovers_a_flaky_upstream_inside_one_attempt(fake: FakeUpstream) -> None:
    async with proxy(two_stage("flaky-1"), fake) as (c, _):
        r = await c.post("/v1/chat/completions", json=chat())
    body = r.json()
    assert _attempts(body) == [(0, "small", "accepted")]
    assert fake.counts["flaky-1"] == 2


async def test_escalates_on_timeout(fake: FakeUpstream) -> None:
    cfg = two_stage("slow-3000")
    cfg["upstreams"]["small"]["timeout_s"] = 0.2
    async with proxy(cfg, fake) as (c, _):
        r = await c.post("/v1/chat/completions", json=chat())
    body = r.json()
    assert r.status_code == 200
    assert _attempts(body) == [(0, "small", "error"), (1, "large", "accepted")]
    assert body["cascade"]["attempts"][0]["reason"] == "timeout"


@pytest.mark.parametrize("model", ["badjson-body", "error-in-200", "html", "drop"])
async def test_escalates_on_protocol_faults(fake: FakeUpstream, model: str) -> None:
    async with proxy(two_stage(model), fake) as (c, _):
        r = await c.post("/v1/chat/completions", json=chat())
    body = r.json()
    assert r.status_code == 200, body
    assert _attempts(body) == [(0, "small", "error"), (1, "large", "accepted")]
    assert body["cascade"]["attempts"][0]["reason"] == "upstream_error"


async def test_all_stages_fail_gives_502_listing_every_attempt(fake: FakeUpstream) -> None:
    cfg = two_stage("error-503", "error-500")
    async with proxy(cfg, fake) as (c, _):
        r = await c.post("/v1/chat/completions", json=chat())
    assert r.status_code == 502
    err = r.json()
    check_error(err)
    msg = err["error"]["message"]
    assert err["error"]["code"] == "all_stages_failed"
    assert "stage 0 (small): upstream_error (HTTP 503" in msg
    assert "stage 1 (large): upstream_error (HTTP 500" in msg


async def test_rejected_then_last_stage_fails_is_502(fake: FakeUpstream) -> None:
    async with proxy(two_stage("refuse", "error-500"), fake) as (c, _):
        r = await c.post("/v1/chat/completions", json=chat())
    assert r.status_code == 502
    assert "stage 0 (small): low_score (score 0.00: refusal)" in r.json()["error"]["message"]


async def test_429_everywhere_is_429_with_retry_after(fake: FakeUpstream) -> None:
    async with proxy(two_stage("error-429", "error-429"), fake) as (c, _):
        r = await c.post("/v1/chat/completions", json=chat())
    assert r.status_code == 429
    assert r.json()["error"]["type"] == "rate_limit_error"
    assert r.headers["retry-after"] == "1"


async def test_every_stage_rejecting_the_request_is_400(fake: FakeUpstream) -> None:
    async with proxy(two_stage("error-400", "error-400"), fake) as (c, _):
        r = await c.post("/v1/chat/completions", json=chat())
    assert r.status_code == 400
    assert "Every stage rejected the request" in r.json()["error"]["message"]


async def test_upstream_key_is_sent_and_never_echoed(fake: FakeUpstream) -> None:
    cfg = two_stage("error-500", "error-401")
    cfg["upstreams"]["small"]["api_key"] = "sk-test-SECRET-upstream-key-123"
    async with proxy(cfg, fake) as (c, _):
        r = await c.post("/v1/chat/completions", json=chat())
    assert r.status_code == 502
    assert "SECRET" not in r.text
    assert fake.requests[0]["headers"]["authorization"] == "Bearer sk-test-SECRET-upstream-key-123"


async def test_passthrough_by_upstream_name(fake: FakeUpstream) -> None:
    async with proxy(base_config(), fake) as (c, _):
        r = await c.post("/v1/chat/completions", json=chat("large"))
    body = r.json()
    check_completion(body)
    assert body["choices"][0]["message"]["content"] == "large says hi"
    ext = body["cascade"]
    assert (ext["cascade"], ext["stage"], ext["upstream"]) == ("large", 0, "large")
    assert ext["attempts"][0]["scores"] == {}
    assert ext["savings_usd"] == 0
    assert r.headers["x-cascade-upstream"] == "large"


async def test_every_request_field_passes_through(fake: FakeUpstream) -> None:
    cfg = base_config()
    cfg["upstreams"]["large"]["model"] = "echo"
    extra = {
        "temperature": 0.3,
        "top_p": 0.9,
        "max_tokens": 50,
        "max_completion_tokens": 60,
        "stop": ["\n"],
        "seed": 7,
        "n": 1,
        "user": "u-1",
        "metadata": {"k": "v"},
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        "tool_choice": "auto",
        "response_format": {"type": "text"},
        "logit_bias": {"50256": -100},
        "some_future_field": {"nested": [1, 2]},
    }
    async with proxy(cfg, fake) as (c, _):
        r = await c.post("/v1/chat/completions", json=chat("large", **extra))
    sent = orjson.loads(r.json()["choices"][0]["message"]["content"])
    for key, value in extra.items():
        assert sent[key] == value, key
    assert sent["model"] == "echo"


async def test_tool_calls_are_checked_against_the_tool_schema(fake: FakeUpstream) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                },
            },
        }
    ]
    for model, expected in [("tools", "small"), ("tools-badargs", "large"), ("tools-mismatch", "large")]:
        async with proxy(two_stage(model, "tools"), fake) as (c, _):
            r = await c.post("/v1/chat/completions", json=chat(tools=tools))
        body = r.json()
        check_completion(body)
        assert body["cascade"]["upstream"] == expected, (model, body["cascade"])
        call = body["choices"][0]["message"]["tool_calls"][0]
        assert call["function"]["name"] == "get_weather"
        assert body["choices"][0]["finish_reason"] == "tool_calls"


async def test_bad_json_is_rejected_when_json_was_asked(fake: FakeUpstream) -> None:
    for model, expected in [("json", "small"), ("badjson", "large")]:
        async with proxy(two_stage(model), fake) as (c, _):
            r = await c.post("/v1/chat/completions", json=chat(response_format={"type": "json_object"}))
        assert r.json()["cascade"]["upstream"] == expected


async def test_logprobs_asked_by_client_are_kept_otherwise_absent(fake: FakeUpstream) -> None:
    async with proxy(base_config(), fake) as (c, _):
        r1 = await c.post("/v1/chat/completions", json=chat(logprobs=True, top_logprobs=2))
        r2 = await c.post("/v1/chat/completions", json=chat())
    lp = r1.json()["choices"][0]["logprobs"]
    assert lp and lp["content"][0]["top_logprobs"]
    assert r2.json()["choices"][0]["logprobs"] is None


# --- streaming ---------------------------------------------------------------------------------------


async def test_stream_accepted_early_is_replayed_as_chunks(fake: FakeUpstream) -> None:
    async with proxy(base_config(), fake) as (c, _):
        r = await c.post("/v1/chat/completions", json=chat(stream=True))
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["x-cascade-upstream"] == "small"
    assert "x-cascade-cost-usd" not in r.headers
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    for ch in chunks:
        check_chunk(ch)
    assert "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks if ch["choices"]) == (
        "The answer is 42."
    )
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["cascade"]["stage"] == 0
    assert all("usage" not in ch for ch in chunks)
    assert len({ch["id"] for ch in chunks}) == 1


async def test_stream_escalated_streams_the_last_stage_with_usage(fake: FakeUpstream) -> None:
    async with proxy(two_stage("refuse"), fake) as (c, _):
        r = await c.post(
            "/v1/chat/completions", json=chat(stream=True, stream_options={"include_usage": True})
        )
    assert r.headers["x-cascade-upstream"] == "large" and r.headers["x-cascade-stage"] == "1"
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    for ch in chunks:
        check_chunk(ch)
    text = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks if ch["choices"])
    assert text == "large says hi"
    last = chunks[-1]
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 3
    ext = last["cascade"]
    assert ext["escalations"] == 1 and [a["outcome"] for a in ext["attempts"]] == ["rejected", "accepted"]
    assert ext["cost_usd"] == pytest.approx(sum(a["cost_usd"] for a in ext["attempts"]))
    # usage was asked upstream even though... the client asked too here; the proxy always asks:
    assert fake.requests[-1]["body"]["stream_options"] == {"include_usage": True}


async def test_stream_without_include_usage_strips_usage_and_keeps_cost_exact(fake: FakeUpstream) -> None:
    async with proxy(two_stage("refuse"), fake) as (c, _):
        r = await c.post("/v1/chat/completions", json=chat(stream=True))
    chunks = sse_events(r.text)[:-1]
    assert all("usage" not in ch for ch in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    att = chunks[-1]["cascade"]["attempts"][1]
    assert att["cost_usd"] == pytest.approx((7 * 10 + 3 * 20) / 1e6)  # exact usage, asked upstream
    assert fake.requests[-1]["body"]["stream_options"] == {"include_usage": True}


async def test_stream_usage_is_estimated_when_upstream_sends_none(fake: FakeUpstream) -> None:
    async with proxy(two_stage("refuse", "no-usage+answer-large_says_hi"), fake) as (c, _):
        r = await c.post(
            "/v1/chat/completions", json=chat(stream=True, stream_options={"include_usage": True})
        )
    chunks = sse_events(r.text)[:-1]
    last = chunks[-1]
    assert last["usage"]["completion_tokens"] > 0
    assert last["cascade"]["attempts"][1]["usage_estimated"] is True


async def test_stream_error_after_first_byte_is_an_error_event_then_done(fake: FakeUpstream) -> None:
    async with proxy(two_stage("refuse", "drop"), fake) as (c, _):
        r = await c.post("/v1/chat/completions", json=chat(stream=True))
    assert r.status_code == 200
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    err = events[-2]
    check_error(err)
    assert err["error"]["code"] == "upstream_stream_failed"
    assert any(e["choices"] and e["choices"][0]["delta"].get("content") for e in events[:-2])


def _protocol_errors(registry: CollectorRegistry, upstream: str) -> float:
    labels = {"upstream": upstream, "kind": "protocol"}
    return registry.get_sample_value("cascade_upstream_errors_total", labels) or 0.0


@pytest.mark.parametrize("kind", sorted(BAD_CHUNKS))
async def test_a_malformed_chunk_after_the_first_byte_is_a_protocol_error_event(
    fake: FakeUpstream, kind: str
) -> None:
    registry = CollectorRegistry()
    async with proxy(two_stage("refuse", f"badchunk-{kind}"), fake, registry=registry) as (c, _):
        r = await c.post("/v1/chat/completions", json=chat(stream=True))
    assert r.status_code == 200
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    err = events[-2]
    check_error(err)
    assert (err["error"]["type"], err["error"]["code"]) == ("upstream_error", "upstream_stream_failed")
    assert "malformed chunk" in err["error"]["message"]
    assert any(e.get("choices") and e["choices"][0]["delta"].get("content") for e in events[:-2])
    assert _protocol_errors(registry, "large") == 1
    labels = {"cascade": "default", "stage": "1", "upstream": "large", "outcome": "error"}
    assert registry.get_sample_value("cascade_attempts_total", labels) == 1
    assert (
        registry.get_sample_value("cascade_requests_total", {"cascade": "default", "outcome": "error"}) == 1
    )


@pytest.mark.parametrize("kind", sorted(BAD_CHUNKS))
@pytest.mark.parametrize("early_abort", [False, True])
async def test_a_malformed_reply_from_a_scored_stage_escalates(
    fake: FakeUpstream, kind: str, early_abort: bool
) -> None:
    """A whole reply, or a stream read whole to be scored (early abort), of the wrong shape is an
    upstream protocol error: the cascade escalates, as for bad JSON."""
    registry = CollectorRegistry()
    cfg = two_stage(f"badchunk-{kind}", scorers=[{"type": "heuristic"}], early_abort=early_abort)
    async with proxy(cfg, fake, registry=registry) as (c, _):
        r = await c.post("/v1/chat/completions", json=chat())
    assert r.status_code == 200
    check_completion(r.json())
    first = r.json()["cascade"]["attempts"][0]
    assert r.json()["cascade"]["upstream"] == "large"
    assert (first["outcome"], first["reason"]) == ("error", "upstream_error")
    assert "malformed" in first["detail"]
    assert _protocol_errors(registry, "small") == 1


async def test_stream_failure_before_first_byte_is_a_status_error(fake: FakeUpstream) -> None:
    async with proxy(two_stage("refuse", "error-500"), fake) as (c, _):
        r = await c.post("/v1/chat/completions", json=chat(stream=True))
    assert r.status_code == 502
    check_error(r.json())


async def test_a_stream_that_ends_before_any_chunk_is_an_upstream_error(fake: FakeUpstream) -> None:
    """An upstream that opens a stream and sends only ``[DONE]``: nothing has reached the client yet, so
    it gets a 502 that says what happened, not an empty 200 stream."""
    registry = CollectorRegistry()
    async with proxy(two_stage("refuse", "hollow"), fake, registry=registry) as (c, _):
        r = await c.post("/v1/chat/completions", json=chat(stream=True))
    assert r.status_code == 502, r.text
    check_error(r.json())
    assert "stream ended before any chunk" in r.json()["error"]["message"]
    assert _protocol_errors(registry, "large") == 1
    # A scored stage read as a stream (early abort) that sends nothing: escalated past, as any failure.
    cfg = two_stage("hollow", scorers=[{"type": "heuristic"}], early_abort=True)
    async with proxy(cfg, fake, registry=(registry := CollectorRegistry())) as (c, _):
        r = await c.post("/v1/chat/completions", json=chat())
    assert r.status_code == 200 and r.json()["cascade"]["upstream"] == "large"
    first = r.json()["cascade"]["attempts"][0]
    assert (first["outcome"], first["reason"]) == ("error", "upstream_error")
    assert "stream ended before any chunk" in first["detail"] and _protocol_errors(registry, "small") == 1


async def test_stream_passthrough_streams_straight_through(fake: FakeUpstream) -> None:
    async with proxy(base_config(), fake) as (c, _):
        r = await c.post("/v1/chat/completions", json=chat("large", stream=True))
    chunks = sse_events(r.text)[:-1]
    assert len(chunks) == 5  # role, 3 words, finish: nothing merged or re-chunked
    assert chunks[-1]["cascade"]["cascade"] == "large"


async def test_stream_tool_call_replay_is_valid(fake: FakeUpstream) -> None:
    tools = [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    ]
    async with proxy(two_stage("tools"), fake) as (c, _):
        r = await c.post("/v1/chat/completions", json=chat(stream=True, tools=tools))
    chunks = sse_events(r.text)[:-1]
    for ch in chunks:
        check_chunk(ch)
    call = chunks[0]["choices"][0]["delta"]["tool_calls"][0]
    assert call["index"] == 0 and call["function"]["name"] == "f"
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


# --- bad input ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "status", "needle"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b"", 400, "empty"),
        (b"[1, 2]", 400, "must be a JSON object"),
        (b'{"messages": [{"role": "user", "content": "hi"}]}', 400, "'model': is required"),
        (b'{"model": "default"}', 400, "'messages': is required"),
        (b'{"model": "default", "messages": []}', 400, "'messages': must contain at least one"),
        (b'{"model": "default", "messages": "hi"}', 400, "'messages': must be an array"),
        (
            b'{"model": 5, "messages": [{"role": "user", "content": "x"}]}',
            400,
            "'model': must be a non-empty",
        ),
        (
            b'{"model": "default", "messages": [{"role": "wizard", "content": "x"}]}',
            400,
            "'messages[0].role'",
        ),
        (b'{"model": "default", "messages": [{"role": "user", "content": 5}]}', 400, "'messages[0].content'"),
        (
            b'{"model": "default", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}',
            400,
            "'stream'",
        ),
        (
            b'{"model": "default", "messages": [{"role": "user", "content": "x"}], "temperature": 9}',
            400,
            "'temperature'",
        ),
        (b'{"model": "default", "messages": [{"role": "user", "content": "x"}], "n": 0}', 400, "'n'"),
        (
            b'{"model": "default", "messages": [{"role": "user", "content": "x"}], "tools": [{}]}',
            400,
            "'tools[0]",
        ),
        (b'{"model": "nope", "messages": [{"role": "user", "content": "x"}]}', 404, "'nope' does not exist"),
        # the other checks of app/protocol.py, each naming the field it refused
        (
            b'{"model": "default", "messages": ["hi"]}',
            400,
            "'messages[0]': must be an object",
        ),
        (
            b'{"model": "default", "messages": [{"role": "user", "content": "x"}], "stream_options": true}',
            400,
            "'stream_options': must be an object",
        ),
        (
            b'{"model": "default", "messages": [{"role": "user", "content": "x"}], '
            b'"stream_options": {"include_usage": "yes"}}',
            400,
            "'stream_options.include_usage'",
        ),
        (
            b'{"model": "default", "messages": [{"role": "user", "content": "x"}], "stop": [1, 2]}',
            400,
            "'stop'",
        ),
        (
            b'{"model": "default", "messages": [{"role": "user", "content": "x"}], '
            b'"tools": {"type": "function"}}',
            400,
            "'tools': must be an array",
        ),
        (
            b'{"model": "default", "messages": [{"role": "user", "content": "x"}], "tools": [5]}',
            400,
            "'tools[0]': must be an object",
        ),
        (
            b'{"model": "default", "messages": [{"role": "user", "content": "x"}], '
            b'"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}',
            400,
            "'tools[0].function.parameters'",
        ),
        (
            b'{"model": "default", "messages": [{"role": "user", "content": "x"}], '
            b'"response_format": {"schema": {}}}',
            400,
            "'response_format.type'",
        ),
        (
            b'{"model": "default", "messages": [{"role": "user", "content": "x"}], "user": 7}',
            400,
            "'user'",
        ),
        (
            b'{"model": "default", "messages": [{"role": "user", "content": "x"}], "metadata": ["a"]}',
            400,
            "'metadata'",
        ),
        (
            b'{"model": "default", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 21}',
            400,
            "'top_logprobs'",
        ),
    ],
)
async def test_bad_requests_get_clear_errors(
    fake: FakeUpstream, payload: bytes, status: int, needle: str
) -> None:
    async with proxy(base_config(), fake) as (c, _):
        r = await c.post(
            "/v1/chat/completions", content=payload, headers={"content-type": "application/json"}
        )
    assert r.status_code == status
    body = r.json()
    check_error(body)
    assert needle in body["error"]["message"]
    assert not fake.requests


async def test_more_messages_than_the_limit_are_refused_on_both_apis(fake: FakeUpstream) -> None:
    cfg = base_config()
    cfg["server"]["max_messages"] = 3
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}"} for i in range(4)]
    async with proxy(cfg, fake) as (c, _):
        chat_r = await c.post("/v1/chat/completions", json={"model": "default", "messages": turns})
        resp_r = await c.post("/v1/responses", json={"model": "default", "input": turns})
        ok = await c.post("/v1/chat/completions", json={"model": "default", "messages": turns[:3]})
    for r, param in ((chat_r, "messages"), (resp_r, "input")):
        assert r.status_code == 400, r.text
        check_error(r.json())
        assert r.json()["error"]["param"] == param and "the limit is 3" in r.json()["error"]["message"]
    assert ok.status_code == 200


async def test_a_bare_upstream_reply_is_completed_to_the_schema(fake: FakeUpstream) -> None:
    """An upstream that sends no ``created``, ``model``, choice ``index`` or message ``role``, a null
    ``system_fingerprint`` and a finish reason of its own ("eos"): the client still gets a completion
    that OpenAI's schema accepts, from the cascade and passed through alike."""
    cfg = two_stage("bare+answer-small_is_fine", "bare+answer-large_says_hi")
    async with proxy(cfg, fake) as (c, _):
        replies = [
            await c.post("/v1/chat/completions", json=chat()),
            await c.post("/v1/chat/completions", json=chat(model="large")),
        ]
    for r, text in zip(replies, ("small is fine", "large says hi"), strict=True):
        assert r.status_code == 200, r.text
        body = r.json()
        check_completion(body)
        assert isinstance(body["created"], int) and body["model"] and "system_fingerprint" not in body
        ch = body["choices"][0]
        assert (ch["index"], ch["finish_reason"], ch["message"]["role"]) == (0, "stop", "assistant")
        assert ch["message"]["content"] == text


async def test_body_too_large_is_413(fake: FakeUpstream) -> None:
    cfg = base_config()
    cfg["server"]["max_body_bytes"] = 2048
    async with proxy(cfg, fake) as (c, _):
        r = await c.post("/v1/chat/completions", json=chat(content="x" * 5000))
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large"


async def test_unknown_route_and_method_use_the_openai_envelope(fake: FakeUpstream) -> None:
    async with proxy(base_config(), fake) as (c, _):
        r1 = await c.get("/v1/nothing")
        r2 = await c.get("/v1/chat/completions")
    assert r1.status_code == 404 and r1.json()["error"]["type"] == "invalid_request_error"
    assert r2.status_code == 405 and r2.json()["error"]["code"] == "method_not_allowed"


# --- models, health --------------------------------------------------------------------------------------


async def test_models_list_and_retrieve(fake: FakeUpstream) -> None:
    from tests.schema import check

    async with proxy(base_config(), fake) as (c, _):
        lst = (await c.get("/v1/models")).json()
        one = await c.get("/v1/models/default")
        up = await c.get("/v1/models/small")
        missing = await c.get("/v1/models/nope")
    check("ListModelsResponse", lst)
    assert [m["id"] for m in lst["data"]] == ["default", "small", "large"]
    check("Model", one.json())
    assert one.json()["owned_by"] == "cascade" and up.json()["owned_by"] == "upstream"
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


async def test_health_and_readiness(fake: FakeUpstream) -> None:
    async with proxy(base_config(), fake) as (c, app):
        assert (await c.get("/healthz")).status_code == 200
        assert (await c.get("/readyz")).status_code == 200
        app.state.cascade.draining = True
        assert (await c.get("/readyz")).status_code == 503
        assert (await c.get("/healthz")).status_code == 200


async def test_deadline_gives_504_with_attempts(fake: FakeUpstream) -> None:
    cfg = two_stage("refuse", "slow-3000")
    cfg["cascades"]["default"]["deadline_s"] = 0.3
    async with proxy(cfg, fake) as (c, _):
        r = await c.post("/v1/chat/completions", json=chat())
    assert r.status_code == 504
    msg = r.json()["error"]["message"]
    assert "stage 0 (small): low_score" in msg and "stage 1 (large): timeout" in msg


async def test_three_stage_cascade_walks_every_stage(fake: FakeUpstream) -> None:
    cfg = base_config()
    cfg["upstreams"]["small"]["model"] = "refuse"
    cfg["upstreams"]["medium"] = upstream("empty")
    cfg["cascades"]["default"]["stages"].insert(
        1, {"upstream": "medium", "threshold": 0.5, "scorers": [{"type": "heuristic"}]}
    )
    async with proxy(cfg, fake) as (c, _):
        r = await c.post("/v1/chat/completions", json=chat())
    body = r.json()
    assert _attempts(body) == [(0, "small", "rejected"), (1, "medium", "rejected"), (2, "large", "accepted")]
    assert body["cascade"]["escalations"] == 2


async def test_a_bug_on_the_chat_path_answers_500_and_logs_no_data(
    fake: FakeUpstream, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The chat path runs ahead of FastAPI's middleware, so it has its own last-resort handler.
    from app.cascade.engine import Engine
    from tests.conftest import SECRET_PROMPT

    async def broken(self: Engine, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"a bug that mentions {SECRET_PROMPT}")

    monkeypatch.setattr(Engine, "run", broken)
    async with proxy(base_config(), fake) as (c, _):
        r = await c.post("/v1/chat/completions", json=chat(content=SECRET_PROMPT))
        models = await c.get("/v1/models")  # the process serves on
    assert r.status_code == 500
    check_error(r.json())
    assert r.json()["error"]["code"] == "internal_error" and SECRET_PROMPT not in r.text
    assert models.status_code == 200
    errors = [rec for rec in caplog.records if rec.getMessage() == "unhandled error"]
    assert len(errors) == 1 and errors[0].exc_info is not None


@pytest.mark.parametrize("stream", [False, True])
async def test_a_middleware_added_later_sees_chat_completions_too(
    fake: FakeUpstream, monkeypatch: pytest.MonkeyPatch, stream: bool
) -> None:
    """Chat completions are answered ahead of the middleware stack (CascadeApp.__call__) only while the
    app has no middleware of its own: one added later must not silently skip the path that matters."""
    fast = []
    real = main_module.serve_chat

    async def counted(*args: Any) -> None:
        fast.append(1)
        await real(*args)

    monkeypatch.setattr(main_module, "serve_chat", counted)
    app = create_app(parse_config(base_config(), env={}), transport=Router({"fake.local": fake}))
    async with (
        LifespanManager(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://p") as c,
    ):
        r = await c.post("/v1/chat/completions", json=chat(stream=stream))
    assert r.status_code == 200 and fast == [1]  # no middleware: the fast path

    seen: list[str] = []
    app = create_app(parse_config(base_config(), env={}), transport=Router({"fake.local": fake}))

    @app.middleware("http")
    async def note(request: Any, call_next: Any) -> Any:
        seen.append(request.url.path)
        return await call_next(request)

    async with (
        LifespanManager(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://p") as c,
    ):
        r = await c.post("/v1/chat/completions", json=chat(stream=stream))
        bad = await c.post("/v1/chat/completions", json={"model": "default"})
    assert r.status_code == 200 and seen == ["/v1/chat/completions"] * 2 and fast == [1]
    if stream:
        assert sse_events(r.text)[-1] == "[DONE]"
    else:
        check_completion(r.json())
    assert bad.status_code == 400
    check_error(bad.json())
