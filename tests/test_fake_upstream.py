"""Tests of the fake OpenAI-compatible upstream (tests/fake_upstream.py)."""

from __future__ import annotations

import asyncio
import json
import math
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import jsonschema
import orjson
import pytest
from referencing import Registry, Resource

from tests import fake_upstream
from tests.conftest import wait_for
from tests.fake_upstream import (
    DEFAULT_CONTENT,
    REFUSAL,
    Behaviour,
    FakeUpstream,
    build_completion,
    create_fake_upstream,
    iter_chunks,
    parse_directives,
    serve_in_background,
)

ROOT = Path(__file__).resolve().parent.parent
_SCHEMA_CANDIDATES = [
    ROOT / "tests/spec/openai-chat.schema.json",
    ROOT / "shared/spec/openai-chat.schema.json",
    Path("/work/shared/spec/openai-chat.schema.json"),
]
pytestmark = pytest.mark.anyio
SCHEMA_PATH = next((p for p in _SCHEMA_CANDIDATES if p.exists()), None)
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 6 * 7?"}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer"},
                "unit": {"type": "string", "enum": ["c", "f"]},
                "hourly": {"type": "boolean"},
            },
            "required": ["city", "days", "unit"],
        },
    },
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def validator(name: str) -> jsonschema.Draft202012Validator:
    if SCHEMA_PATH is None:
        pytest.skip("openai-chat.schema.json not found")
    schema = json.loads(SCHEMA_PATH.read_text())
    registry: Registry[Any] = Registry().with_resource(schema["$id"], Resource.from_contents(schema))
    return jsonschema.Draft202012Validator({"$ref": f"{schema['$id']}#/$defs/{name}"}, registry=registry)


def sse_payloads(body: bytes) -> list[bytes]:
    """The `data:` payloads of an SSE body, in order."""
    events = [e for e in body.split(b"\n\n") if e.strip()]
    assert all(e.startswith(b"data: ") for e in events), events
    return [e[len(b"data: ") :] for e in events]


def chunks_of(body: bytes) -> list[dict[str, Any]]:
    payloads = sse_payloads(body)
    assert payloads[-1] == b"[DONE]"
    return [orjson.loads(p) for p in payloads[:-1]]


def streamed_content(chunks: list[dict[str, Any]], index: int = 0) -> str:
    return "".join(
        c["choices"][0]["delta"].get("content") or ""
        for c in chunks
        if c["choices"] and c["choices"][0]["index"] == index
    )


@pytest.fixture
def app() -> FakeUpstream:
    return create_fake_upstream()


@pytest.fixture
async def client(app: FakeUpstream) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://fake/v1") as c:
        yield c


async def chat(
    client: httpx.AsyncClient, model: str, *, headers: dict[str, str] | None = None, **fields: Any
) -> httpx.Response:
    body = {"model": model, "messages": MESSAGES, **fields}
    return await client.post("/chat/completions", json=body, headers=headers)


# --- directives, pure ----------------------------------------------------------------------------


def test_parse_directives_combines_and_ignores_unknown() -> None:
    assert parse_directives("gpt-4o-mini") == Behaviour()
    b = parse_directives("slow-200+refuse+conf-0.2+chunkdelay-5+model-big+bogus")
    assert (b.slow_ms, b.content, b.conf, b.chunk_delay_ms, b.reply_model) == (200, REFUSAL, 0.2, 5, "big")
    assert parse_directives("slow").slow_ms == 2000
    assert parse_directives("error-in-200") == Behaviour(error_in_200=True)
    assert parse_directives("error-429").error_status == 429
    assert parse_directives("echo+answer-x").echo is False  # later content directive wins
    assert parse_directives("slow-abc") == Behaviour()
    assert parse_directives("badchunk-index+ptokens-7") == Behaviour(badchunk="index", ptokens=7)
    assert parse_directives("badchunk-nonsense") == Behaviour()


def test_pure_builders_match_schema() -> None:
    request = {"model": "ok", "messages": MESSAGES, "stream_options": {"include_usage": True}}
    validator("CreateChatCompletionResponse").validate(build_completion(request))
    chunks = list(iter_chunks(request))
    for c in chunks:
        validator("CreateChatCompletionStreamResponse").validate(c)
    assert streamed_content(chunks) == DEFAULT_CONTENT
    assert chunks[-1]["usage"] == build_completion(request)["usage"]


# --- non-stream ----------------------------------------------------------------------------------


async def test_ok_completion_is_valid(client: httpx.AsyncClient, app: FakeUpstream) -> None:
    r = await chat(client, "gpt-4o-mini", temperature=0.1, custom_field={"a": 1})
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    validator("CreateChatCompletionResponse").validate(body)
    assert body["id"].startswith("chatcmpl-fake-")
    assert body["model"] == "gpt-4o-mini"
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": DEFAULT_CONTENT, "refusal": None}
    assert (choice["finish_reason"], choice["logprobs"]) == ("stop", None)
    prompt = sum(len(m["content"]) // 4 + 4 for m in MESSAGES)
    completion = len(DEFAULT_CONTENT) // 4
    assert body["usage"] == {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    assert app.counts == {"gpt-4o-mini": 1}
    assert app.requests[-1]["body"]["custom_field"] == {"a": 1}
    assert app.requests[-1]["headers"]["content-type"] == "application/json"
    second = (await chat(client, "gpt-4o-mini")).json()
    assert second["id"] != body["id"]


@pytest.mark.parametrize(
    ("model", "content", "finish"),
    [
        ("ok", DEFAULT_CONTENT, "stop"),
        ("answer-Paris", "Paris", "stop"),
        ("answer-New_York_City", "New York City", "stop"),
        ("refuse", REFUSAL, "stop"),
        ("empty", "", "stop"),
        ("truncated", DEFAULT_CONTENT, "length"),
        ("json", '{"answer": 42}', "stop"),
        ("badjson", '{"answer": 42', "stop"),
        ("words-4", "w0 w1 w2 w3", "stop"),
        ("answer-x+truncated", "x", "length"),
    ],
)
async def test_content_directives(client: httpx.AsyncClient, model: str, content: str, finish: str) -> None:
    body = (await chat(client, model)).json()
    validator("CreateChatCompletionResponse").validate(body)
    assert body["choices"][0]["message"]["content"] == content
    assert body["choices"][0]["finish_reason"] == finish
    assert body["usage"]["completion_tokens"] == max(1, len(content) // 4)


async def test_echo_returns_request_body(client: httpx.AsyncClient) -> None:
    r = await chat(client, "echo", seed=7, tools=[WEATHER_TOOL], metadata={"k": "v"})
    sent = json.loads(r.json()["choices"][0]["message"]["content"])
    assert sent == {
        "model": "echo",
        "messages": MESSAGES,
        "seed": 7,
        "tools": [WEATHER_TOOL],
        "metadata": {"k": "v"},
    }


async def test_model_directive_and_n_choices(client: httpx.AsyncClient) -> None:
    body = (await chat(client, "answer-hi+model-real-model+varied", n=3)).json()
    validator("CreateChatCompletionResponse").validate(body)
    assert body["model"] == "real-model"
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert [c["message"]["content"] for c in body["choices"]] == ["hi v0", "hi v1", "hi v2"]
    same = (await chat(client, "answer-hi", n=2)).json()
    assert [c["message"]["content"] for c in same["choices"]] == ["hi", "hi"]


async def test_logprobs(client: httpx.AsyncClient) -> None:
    body = (await chat(client, "conf-0.2", logprobs=True, top_logprobs=3)).json()
    validator("CreateChatCompletionResponse").validate(body)
    logprobs = body["choices"][0]["logprobs"]
    assert logprobs["refusal"] is None
    tokens = logprobs["content"]
    assert "".join(t["token"] for t in tokens) == DEFAULT_CONTENT
    assert [t["token"] for t in tokens] == ["The", " answer", " is", " 42."]
    for t in tokens:
        assert t["logprob"] == pytest.approx(math.log(0.2))
        assert t["bytes"] is None
        assert len(t["top_logprobs"]) == 3
    default = (await chat(client, "ok", logprobs=True)).json()["choices"][0]["logprobs"]["content"]
    assert default[0]["logprob"] == pytest.approx(math.log(0.95))
    assert default[0]["top_logprobs"] == []
    forced = (await chat(client, "logprobs")).json()["choices"][0]["logprobs"]
    assert forced["content"]


async def test_tool_call_fits_schema(client: httpx.AsyncClient) -> None:
    body = (await chat(client, "tools", tools=[WEATHER_TOOL])).json()
    validator("CreateChatCompletionResponse").validate(body)
    choice = body["choices"][0]
    assert (choice["finish_reason"], choice["message"]["content"]) == ("tool_calls", None)
    call = choice["message"]["tool_calls"][0]
    assert call["type"] == "function" and call["function"]["name"] == "get_weather"
    args = json.loads(call["function"]["arguments"])
    jsonschema.validate(args, WEATHER_TOOL["function"]["parameters"])
    assert args == {"city": "test", "days": 1, "unit": "c"}


async def test_tool_call_bad_arguments(client: httpx.AsyncClient) -> None:
    bad = (await chat(client, "tools-badargs", tools=[WEATHER_TOOL])).json()
    with pytest.raises(json.JSONDecodeError):
        json.loads(bad["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"])
    mismatch = (await chat(client, "tools-mismatch", tools=[WEATHER_TOOL])).json()
    args = json.loads(mismatch["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(args, WEATHER_TOOL["function"]["parameters"])
    no_required = {
        "type": "function",
        "function": {"name": "f", "parameters": {"properties": {"x": {"type": "integer"}}}},
    }
    odd = (await chat(client, "tools-mismatch", tools=[no_required])).json()
    args = json.loads(odd["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(args, no_required["function"]["parameters"])


@pytest.mark.parametrize("status", [400, 401, 429, 500, 503])
async def test_error_status(client: httpx.AsyncClient, status: int) -> None:
    r = await chat(client, f"error-{status}")
    assert r.status_code == status
    validator("ErrorResponse").validate(r.json())
    assert ("retry-after" in r.headers) == (status == 429)
    if status == 429:
        assert r.headers["retry-after"] == "0"
    stream = await chat(client, f"error-{status}", stream=True)
    assert stream.status_code == status


async def test_flaky_fails_first_n_per_model(client: httpx.AsyncClient, app: FakeUpstream) -> None:
    assert [(await chat(client, "flaky-2")).status_code for _ in range(4)] == [500, 500, 200, 200]
    assert (await chat(client, "flaky-2+refuse")).status_code == 500  # its own counter
    assert app.counts == {"flaky-2": 4, "flaky-2+refuse": 1}
    app.reset()
    assert (await chat(client, "flaky-2")).status_code == 500


async def test_broken_200_replies(client: httpx.AsyncClient) -> None:
    r = await chat(client, "badjson-body")
    assert (r.status_code, r.headers["content-type"]) == (200, "application/json")
    with pytest.raises(json.JSONDecodeError):
        r.json()
    r = await chat(client, "error-in-200")
    assert r.status_code == 200
    validator("ErrorResponse").validate(r.json())
    r = await chat(client, "html")
    assert (r.status_code, r.headers["content-type"], r.text) == (200, "text/html", "<html>oops</html>")
    r = await chat(client, "badjson-body", stream=True)
    assert sse_payloads(r.content) == [b"{broken", b"[DONE]"]
    r = await chat(client, "error-in-200", stream=True)
    assert orjson.loads(sse_payloads(r.content)[0])["error"]["message"] == "overloaded"


async def test_drop_in_process_raises_httpx_error(client: httpx.AsyncClient) -> None:
    with pytest.raises(httpx.RemoteProtocolError):
        await chat(client, "drop")


async def test_slow_waits(client: httpx.AsyncClient) -> None:
    start = time.perf_counter()
    assert (await chat(client, "slow-150")).status_code == 200
    assert time.perf_counter() - start >= 0.15
    start = time.perf_counter()
    assert (await chat(client, "slow-100+error-503")).status_code == 503
    assert time.perf_counter() - start >= 0.1


async def test_routes(client: httpx.AsyncClient) -> None:
    models = (await client.get("/models")).json()
    validator("ListModelsResponse").validate(models)
    assert [m["id"] for m in models["data"]] == ["ok", "echo", "refuse"]
    validator("Model").validate((await client.get("/models/ok")).json())
    for r in (await client.get("/nope"), await client.get("/chat/completions")):
        assert r.status_code == 404
        validator("ErrorResponse").validate(r.json())
    r = await client.post("/chat/completions", content=b"{not json")
    assert r.status_code == 400
    validator("ErrorResponse").validate(r.json())


async def test_requests_are_capped_and_reset(
    client: httpx.AsyncClient, app: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fake_upstream, "MAX_RECORDED", 3)
    for i in range(5):
        await chat(client, f"answer-{i}", headers={"x-n": str(i)})
    assert [r["body"]["model"] for r in app.requests] == ["answer-2", "answer-3", "answer-4"]
    assert app.requests[-1]["headers"]["x-n"] == "4"
    assert app.requests[-1]["path"] == "/v1/chat/completions"
    app.reset()
    assert (app.requests, app.counts, app.finished_streams) == ([], {}, 0)


# --- stream --------------------------------------------------------------------------------------


async def test_stream_ok(client: httpx.AsyncClient, app: FakeUpstream) -> None:
    r = await chat(client, "ok", stream=True)
    assert r.headers["content-type"] == "text/event-stream"
    chunks = chunks_of(r.content)
    for c in chunks:
        validator("CreateChatCompletionStreamResponse").validate(c)
        assert "usage" not in c
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
    assert [c["choices"][0]["delta"].get("content") for c in chunks[1:-1]] == [
        "The",
        " answer",
        " is",
        " 42.",
    ]
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    assert len({c["id"] for c in chunks}) == 1
    assert (app.active_streams, app.finished_streams, app.cancelled_streams) == (0, 1, 0)


async def test_stream_usage_and_no_usage(client: httpx.AsyncClient) -> None:
    opts = {"include_usage": True}
    chunks = chunks_of((await chat(client, "words-3", stream=True, stream_options=opts)).content)
    for c in chunks:
        validator("CreateChatCompletionStreamResponse").validate(c)
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == (await chat(client, "words-3")).json()["usage"]
    assert all(c["usage"] is None for c in chunks[:-1])
    quirky = chunks_of((await chat(client, "no-usage", stream=True, stream_options=opts)).content)
    assert all(c["choices"] and "usage" not in c for c in quirky)


async def test_stream_logprobs_tools_and_n(client: httpx.AsyncClient) -> None:
    chunks = chunks_of((await chat(client, "conf-0.5", stream=True, logprobs=True, top_logprobs=1)).content)
    content_chunks = [c for c in chunks if c["choices"][0]["delta"].get("content")]
    for c in content_chunks:
        validator("CreateChatCompletionStreamResponse").validate(c)
        (entry,) = c["choices"][0]["logprobs"]["content"]
        assert entry["token"] == c["choices"][0]["delta"]["content"]
        assert entry["logprob"] == pytest.approx(math.log(0.5))
        assert len(entry["top_logprobs"]) == 1

    chunks = chunks_of((await chat(client, "tools", stream=True, tools=[WEATHER_TOOL])).content)
    for c in chunks:
        validator("CreateChatCompletionStreamResponse").validate(c)
    first = chunks[0]["choices"][0]["delta"]["tool_calls"][0]
    assert (first["function"], first["type"]) == ({"name": "get_weather", "arguments": ""}, "function")
    args = "".join(c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"] for c in chunks[:-1])
    whole = (await chat(client, "tools", tools=[WEATHER_TOOL])).json()
    assert args == whole["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"

    chunks = chunks_of((await chat(client, "answer-a_b+varied", stream=True, n=2)).content)
    assert [streamed_content(chunks, i) for i in (0, 1)] == ["a b v0", "a b v1"]
    assert sum(1 for c in chunks if c["choices"][0]["finish_reason"] == "stop") == 2


async def test_stream_drop_is_truncated(client: httpx.AsyncClient, app: FakeUpstream) -> None:
    r = await chat(client, "words-10+drop", stream=True)
    payloads = sse_payloads(r.content)
    assert b"[DONE]" not in payloads
    chunks = [orjson.loads(p) for p in payloads]
    assert [c["choices"][0]["delta"].get("content") for c in chunks] == ["", "w0", " w1"]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks)
    assert app.finished_streams == 1


async def test_stream_chunkdelay(client: httpx.AsyncClient) -> None:
    start = time.perf_counter()
    chunks = chunks_of((await chat(client, "words-3+chunkdelay-30", stream=True)).content)
    assert time.perf_counter() - start >= 0.03 * (len(chunks) - 1)


# --- loopback: a real uvicorn on 127.0.0.1 --------------------------------------------------------


@pytest.mark.loopback
async def test_loopback_errors_and_cancellation(app: FakeUpstream) -> None:
    async with serve_in_background(app) as base_url, httpx.AsyncClient(base_url=f"{base_url}/v1") as c:
        ok = await chat(c, "ok")
        validator("CreateChatCompletionResponse").validate(ok.json())

        with pytest.raises(httpx.RemoteProtocolError):
            await chat(c, "drop")
        with pytest.raises(json.JSONDecodeError):
            (await chat(c, "badjson-body")).json()

        # slow stream: headers first, the first chunk later.
        start = time.perf_counter()
        request = {"model": "slow-300", "messages": MESSAGES, "stream": True}
        async with c.stream("POST", "/chat/completions", json=request) as r:
            headers_at = time.perf_counter() - start
            body = b"".join([part async for part in r.aiter_bytes()])
        assert headers_at < 0.25 <= time.perf_counter() - start
        assert chunks_of(body)

        request = {"model": "stall", "messages": MESSAGES, "stream": True}
        async with c.stream("POST", "/chat/completions", json=request) as r:
            seen = b""
            async for part in r.aiter_bytes():
                seen += part
                if seen.count(b"\n\n") >= 3:
                    break
            assert app.active_streams == 1
        with anyio.fail_after(5):
            while app.cancelled_streams == 0:  # noqa: ASYNC110 (polling a plain counter)
                await anyio.sleep(0.01)
        assert (app.active_streams, app.cancelled_streams, app.finished_streams) == (0, 1, 1)

        # A client that gives up on a slow non-stream reply frees the handler (no wait at shutdown).
        with pytest.raises(httpx.ReadTimeout):
            await c.post("/chat/completions", json={"model": "slow-5000", "messages": MESSAGES}, timeout=0.2)
        await anyio.sleep(0.05)
        stopping = time.perf_counter()
    assert time.perf_counter() - stopping < 1.0


@pytest.mark.loopback
def test_cli_serves() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "tests.fake_upstream", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={"model": "refuse"})
                break
            except httpx.ConnectError:
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert r.json()["choices"][0]["message"]["content"] == REFUSAL
    finally:
        proc.terminate()
        proc.communicate(timeout=10)


async def test_gated_replies_wait_for_the_gate() -> None:
    fake = create_fake_upstream()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=fake), base_url="http://f") as c:
        body = {"model": "gated+answer-open", "messages": MESSAGES}
        reply = asyncio.create_task(c.post("/v1/chat/completions", json=body))
        await wait_for(lambda: fake.counts.get("gated+answer-open"), "the request arrived")
        assert not reply.done()
        fake.gate.set()
        r = await reply
    assert r.json()["choices"][0]["message"]["content"] == "open"


async def test_the_latency_tail_is_drawn_per_prompt_not_in_arrival_order() -> None:
    """`tail-<ms>-<pct>` slows the prompts whose seeded draw is under pct %: the same prompts in any order
    (a benchmark comparing two configurations meets the same slow calls in both runs)."""
    prompts = [[{"role": "user", "content": f"question {i}"}] for i in range(40)]
    tailed = []
    for order in (prompts, prompts[::-1]):
        fake = create_fake_upstream(seed=3)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=fake), base_url="http://f") as c:
            for messages in order:
                r = await c.post("/v1/chat/completions", json={"model": "tail-1-30", "messages": messages})
                assert r.status_code == 200
        tailed.append(sorted(json.dumps(m) for m in fake.tailed))
    want = sorted(json.dumps(m) for m in prompts if fake_upstream.prompt_draw(3, {"messages": m}) < 0.30)
    assert tailed[0] == tailed[1] == want
    assert 0 < len(want) < len(prompts)
