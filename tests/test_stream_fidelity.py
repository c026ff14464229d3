"""Streams that lose nothing and cost little: the upstream's usage details, cost and system_fingerprint
reach streaming clients; replayed answers come a few words a chunk, one choice a chunk; ``n`` is refused
where an upstream cannot honour it; pass-through chunks go out as the upstream sent them (the proxy's id
written into their bytes), a read's worth of events in one write."""

from __future__ import annotations

from typing import Any

import openai
import orjson
import pytest

from app.cascade.assemble import Assembler
from app.cascade.relay import StreamRelay
from app.config import UpstreamConfig
from app.errors import UpstreamProtocolError
from app.protocol import completion_to_chunks
from app.upstream.client import Upstream, UpstreamEvents
from app.upstream.sse import SSEDecoder
from tests.conftest import base_config, chat, loopback_stack, proxy, sse_events, two_stage, upstream
from tests.fake_upstream import COST_USD, FINGERPRINT, FakeUpstream
from tests.schema import check_chunk, check_error

pytestmark = pytest.mark.anyio

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
                "required": ["city", "unit"],
            },
        },
    }
]
USAGE = {"include_usage": True}


def _chunks(text: str) -> list[dict[str, Any]]:
    events = sse_events(text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    for ch in chunks:
        check_chunk(ch)
    return chunks


def _text(chunks: list[dict[str, Any]], index: int = 0) -> str:
    return "".join(
        c["choices"][0]["delta"].get("content") or ""
        for c in chunks
        if c["choices"] and c["choices"][0]["index"] == index
    )


def _assert_details(usage: dict[str, Any]) -> None:
    assert usage["prompt_tokens_details"]["cached_tokens"] == usage["prompt_tokens"] // 2
    assert usage["completion_tokens_details"] == {"reasoning_tokens": 1, "audio_tokens": 0}
    assert usage["cost"] == COST_USD
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


# --- usage details and system_fingerprint -----------------------------------------------------------


@pytest.mark.parametrize("model", ["large", "default"])  # pass-through, and the last stage of a cascade
async def test_streamed_usage_keeps_details_cost_and_fingerprint(fake: FakeUpstream, model: str) -> None:
    cfg = two_stage("refuse", "details+answer-large_says_hi")
    async with proxy(cfg, fake) as (c, _):
        r = await c.post("/v1/chat/completions", json=chat(model, stream=True, stream_options=USAGE))
    chunks = _chunks(r.text)
    assert _text(chunks) == "large says hi"
    assert all(ch["system_fingerprint"] == FINGERPRINT for ch in chunks)
    assert len({ch["id"] for ch in chunks}) == 1 and not chunks[0]["id"].startswith("chatcmpl-fake")
    last = chunks[-1]
    assert last["choices"] == [] and last["cascade"]["upstream"] == "large"
    _assert_details(last["usage"])


async def test_non_stream_and_replayed_stream_keep_the_same_usage(fake: FakeUpstream) -> None:
    cfg = two_stage("details+words-12")
    async with proxy(cfg, fake) as (c, _):
        whole = (await c.post("/v1/chat/completions", json=chat())).json()
        r = await c.post("/v1/chat/completions", json=chat(stream=True, stream_options=USAGE))
    chunks = _chunks(r.text)
    assert chunks[-1]["cascade"]["stage"] == 0
    assert chunks[-1]["usage"] == whole["usage"]
    _assert_details(whole["usage"])
    assert all(ch["system_fingerprint"] == FINGERPRINT for ch in chunks)


async def test_reported_cost_is_what_the_stream_is_charged(fake: FakeUpstream) -> None:
    cfg = base_config()
    cfg["upstreams"]["large"] = upstream("details", price={"reported": True})
    async with proxy(cfg, fake) as (c, _):
        r = await c.post("/v1/chat/completions", json=chat("large", stream=True))
    chunks = _chunks(r.text)
    assert all("usage" not in ch for ch in chunks)  # not asked for
    assert chunks[-1]["cascade"]["cost_usd"] == pytest.approx(COST_USD)


@pytest.mark.loopback
async def test_the_official_sdk_sees_details_fingerprint_and_every_choice() -> None:
    cfg = two_stage("varied", "details+words-40")
    async with loopback_stack(cfg) as (url, _, _):
        client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0)
        stream = await client.chat.completions.create(
            model="large",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
        assert {c.system_fingerprint for c in chunks} == {FINGERPRINT}
        usage = chunks[-1].usage
        assert usage is not None and usage.prompt_tokens_details is not None
        assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens // 2
        assert usage.completion_tokens_details is not None
        assert usage.completion_tokens_details.reasoning_tokens == 1
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == " ".join(f"w{i}" for i in range(40))

        stream = await client.chat.completions.create(
            model="default", messages=[{"role": "user", "content": "hi"}], stream=True, n=2
        )
        texts: dict[int, str] = {0: "", 1: ""}
        async for c in stream:
            assert len(c.choices) <= 1
            for ch in c.choices:
                texts[ch.index] += ch.delta.content or ""
        assert texts == {0: "The answer is 42. v0", 1: "The answer is 42. v1"}
        await client.close()


# --- pass-through: as sent, but ours ----------------------------------------------------------------


async def test_passthrough_chunks_are_the_upstreams_with_the_proxy_id(fake: FakeUpstream) -> None:
    cfg = base_config()
    cfg["upstreams"]["large"]["model"] = "words-30"
    async with proxy(cfg, fake) as (c, _):
        r = await c.post("/v1/chat/completions", json=chat("large", stream=True))
    chunks = _chunks(r.text)
    assert len(chunks) == 32  # role, 30 words, finish (with the extension): none merged or split
    ids = {ch["id"] for ch in chunks}
    assert len(ids) == 1 and ids != {"chatcmpl-fake-1"}
    assert all("usage" not in ch for ch in chunks)  # the proxy asked for usage; the client did not
    assert _text(chunks) == " ".join(f"w{i}" for i in range(30))
    assert all(ch["model"] == "words-30" for ch in chunks)


async def test_passthrough_strips_logprobs_nobody_asked_for(fake: FakeUpstream) -> None:
    cfg = base_config()
    cfg["upstreams"]["large"]["model"] = "logprobs"
    async with proxy(cfg, fake) as (c, _):
        plain = await c.post("/v1/chat/completions", json=chat("large", stream=True))
        asked = await c.post("/v1/chat/completions", json=chat("large", stream=True, logprobs=True))
    assert all(ch["choices"][0]["logprobs"] is None for ch in _chunks(plain.text) if ch["choices"])
    kept = [ch["choices"][0]["logprobs"] for ch in _chunks(asked.text) if ch["choices"]]
    assert any(lp and lp["content"] for lp in kept)


async def test_passthrough_n_2_streams_one_choice_a_chunk(fake: FakeUpstream) -> None:
    cfg = base_config()
    cfg["upstreams"]["large"]["model"] = "varied"
    async with proxy(cfg, fake) as (c, _):
        r = await c.post("/v1/chat/completions", json=chat("large", stream=True, n=2, stream_options=USAGE))
    chunks = _chunks(r.text)
    assert all(len(ch["choices"]) == 1 for ch in chunks if ch["choices"])
    assert (_text(chunks, 0), _text(chunks, 1)) == ("The answer is 42. v0", "The answer is 42. v1")
    finishes = {
        ch["choices"][0]["index"]: ch["choices"][0]["finish_reason"] for ch in chunks if ch["choices"]
    }
    assert finishes == {0: "stop", 1: "stop"}
    assert chunks[-1]["usage"]["completion_tokens"] > 0


# --- replayed answers --------------------------------------------------------------------------------


async def test_replayed_answer_comes_a_few_words_a_chunk(fake: FakeUpstream) -> None:
    words = " ".join(f"w{i}" for i in range(60))
    async with proxy(two_stage("words-60"), fake) as (c, _):
        r = await c.post("/v1/chat/completions", json=chat(stream=True, stream_options=USAGE))
    chunks = _chunks(r.text)
    assert chunks[-1]["cascade"]["stage"] == 0
    first = chunks[0]["choices"][0]["delta"]
    assert first == {"role": "assistant", "content": "", "refusal": None}
    pieces = [ch["choices"][0]["delta"].get("content") for ch in chunks[1:] if ch["choices"]][:-1]
    assert "".join(pieces) == words
    assert len(pieces) >= 10 and all(len(p) <= 24 for p in pieces)
    assert all(not p[-1].isspace() for p in pieces)  # cut after a word, never inside one
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0


def test_replay_keeps_finish_reason_usage_and_fingerprint() -> None:
    usage = {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14, "cost": 0.5}
    whole = {
        "id": "chatcmpl-ours",
        "created": 3,
        "model": "m",
        "system_fingerprint": "fp_1",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "cut short here"},
                "finish_reason": "length",
            }
        ],
        "usage": usage,
    }
    chunks = completion_to_chunks(whole, with_usage=True, keep_logprobs=False)
    for ch in chunks:
        check_chunk(ch)
        assert ch["system_fingerprint"] == "fp_1"
    assert [ch["choices"][0]["finish_reason"] for ch in chunks[:-1]][-1] == "length"
    assert all(ch["usage"] is None for ch in chunks[:-1]) and chunks[-1]["usage"] == usage


CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
}
CALL2 = {
    "id": "call_2",
    "type": "function",
    "function": {"name": "get_time", "arguments": '{"tz": "Europe/Paris"}'},
}
TOKENS = [
    {"token": t, "logprob": -0.1, "bytes": None, "top_logprobs": []} for t in ("It", " is", " sunny", ".")
]


@pytest.mark.parametrize(
    ("message", "logprobs"),
    [
        ({"content": "Let me look that up for you, then answer.", "tool_calls": [CALL, CALL2]}, None),
        ({"content": None, "tool_calls": [CALL, CALL2]}, None),
        ({"content": "", "refusal": "I can't help with that request, sorry."}, None),
        ({"content": "It is sunny."}, {"content": TOKENS, "refusal": None}),
        ({"content": "It is sunny today."}, {"content": TOKENS, "refusal": None}),  # tokens spell less
        ({"content": None}, {"content": [], "refusal": None}),
    ],
)
def test_any_answer_replayed_as_chunks_reassembles_to_itself(message: dict[str, Any], logprobs: Any) -> None:
    """An earlier stage's buffered answer goes to a streaming client as chunks: text with tool calls (as
    some models send), tool calls alone, a refusal, logprobs that do or do not spell the text. Every chunk
    fits OpenAI's schema, and what a client assembles from them is the answer the stage gave."""
    finish = "tool_calls" if message.get("tool_calls") else "stop"
    whole = {
        "id": "chatcmpl-ours",
        "created": 3,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", **message},
                "finish_reason": finish,
                "logprobs": logprobs,
            }
        ],
    }
    chunks = completion_to_chunks(whole, with_usage=False, keep_logprobs=True)
    asm = Assembler()
    for ch in chunks:
        check_chunk(ch)
        asm.add(ch)
    got = asm.completion()["choices"][0]
    assert got["finish_reason"] == finish
    assert got["message"].get("tool_calls") == message.get("tool_calls")
    assert (got["message"]["content"] or None) == (message.get("content") or None)
    assert got["message"]["refusal"] == message.get("refusal")
    assert got["logprobs"] == logprobs


def test_an_answer_without_choices_replays_as_one_empty_choice() -> None:
    whole = {"id": "chatcmpl-ours", "created": 3, "model": "m", "choices": []}
    chunks = completion_to_chunks(whole, with_usage=False, keep_logprobs=False)
    for ch in chunks:
        check_chunk(ch)
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, "stop"]


async def test_replayed_tool_call_arguments_come_in_pieces(fake: FakeUpstream) -> None:
    async with proxy(two_stage("tools"), fake) as (c, _):
        whole = (await c.post("/v1/chat/completions", json=chat(tools=TOOLS))).json()
        r = await c.post("/v1/chat/completions", json=chat(stream=True, tools=TOOLS))
    chunks = _chunks(r.text)
    head = chunks[0]["choices"][0]["delta"]
    assert head["role"] == "assistant" and head["content"] is None
    call = head["tool_calls"][0]
    assert (call["index"], call["function"]) == (0, {"name": "get_weather", "arguments": ""})
    parts = [ch["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"] for ch in chunks[1:-1]]
    assert len(parts) >= 2
    assert "".join(parts) == whole["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


async def test_replayed_n_2_sends_one_choice_a_chunk(fake: FakeUpstream) -> None:
    async with proxy(two_stage("varied"), fake) as (c, _):
        r = await c.post("/v1/chat/completions", json=chat(stream=True, n=2))
    chunks = _chunks(r.text)
    assert chunks[-1]["cascade"]["stage"] == 0
    assert all(len(ch["choices"]) == 1 for ch in chunks)
    assert (_text(chunks, 0), _text(chunks, 1)) == ("The answer is 42. v0", "The answer is 42. v1")
    finishes = [ch["choices"][0] for ch in chunks if ch["choices"][0]["finish_reason"]]
    assert [(f["index"], f["finish_reason"]) for f in finishes] == [(0, "stop"), (1, "stop")]


async def test_replayed_logprobs_ride_with_their_tokens(fake: FakeUpstream) -> None:
    async with proxy(two_stage("words-9"), fake) as (c, _):
        r = await c.post("/v1/chat/completions", json=chat(stream=True, logprobs=True))
    chunks = _chunks(r.text)
    content = [ch["choices"][0] for ch in chunks if ch["choices"][0]["delta"].get("content")]
    assert len(content) >= 2
    for ch in content:
        assert "".join(t["token"] for t in ch["logprobs"]["content"]) == ch["delta"]["content"]


# --- n where an upstream ignores it --------------------------------------------------------------------


@pytest.mark.parametrize("model", ["default", "small"])
async def test_n_above_1_is_refused_where_an_upstream_lacks_n(fake: FakeUpstream, model: str) -> None:
    cfg = base_config()
    cfg["upstreams"]["small"]["supports_n"] = False
    async with proxy(cfg, fake) as (c, _):
        for stream in (False, True):
            r = await c.post("/v1/chat/completions", json=chat(model, n=2, stream=stream))
            assert r.status_code == 400
            check_error(r.json())
            err = r.json()["error"]
            assert err["param"] == "n" and "'small'" in err["message"] and "supports_n" in err["message"]
        ok = await c.post("/v1/chat/completions", json=chat(model, n=1))
        assert ok.status_code == 200
        other = await c.post("/v1/chat/completions", json=chat("large", n=2))
        assert other.status_code == 200 and len(other.json()["choices"]) == 2
    assert not any(req["body"].get("n") == 2 and req["body"]["model"] == "ok" for req in fake.requests)


async def test_n_above_1_is_served_when_the_upstream_lacking_n_is_outside_the_window(
    fake: FakeUpstream,
) -> None:
    """A stage the request cannot reach (after its ``max_stage``, before its ``min_stage``) cannot
    answer it short: the request was refused for it all the same."""
    cfg = base_config()
    cfg["upstreams"]["large"]["supports_n"] = False
    async with proxy(cfg, fake) as (c, _):
        body = chat("default", n=2, cascade={"max_stage": 0})
        r = await c.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        assert len(r.json()["choices"]) == 2 and r.json()["cascade"]["stage"] == 0
        r = await c.post(
            "/v1/chat/completions", json=chat("default", n=2), headers={"x-cascade-max-stage": "0"}
        )
        assert r.status_code == 200 and len(r.json()["choices"]) == 2
        r = await c.post("/v1/chat/completions", json=chat("default", n=2))  # may reach it: refused
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"


# --- the relay's byte path, and one write per upstream read --------------------------------------------


def _relay(with_usage: bool = False, keep_logprobs: bool = False) -> StreamRelay:
    return StreamRelay(
        "chatcmpl-ours", keep_logprobs=keep_logprobs, with_usage=with_usage, fallback_model="m"
    )


def _sent(out: bytes | None) -> dict[str, Any]:
    assert out is not None and out.startswith(b"data: ") and out.endswith(b"\n\n")
    parsed: dict[str, Any] = orjson.loads(out[6:-2])
    return parsed


CHUNK = {
    "id": "up-1",
    "object": "chat.completion.chunk",
    "created": 7,
    "model": "x",
    "usage": None,
    "choices": [{"index": 0, "delta": {"content": "hi"}, "logprobs": None, "finish_reason": None}],
}


ESCAPED = b'"choices":[{"index":0,"delta":{"content":"caf\\u00e9"},"logprobs":null,"finish_reason":null}]}'


@pytest.mark.parametrize(
    ("raw", "as_sent"),
    [
        (
            b'{"id":"up-1","object":"chat.completion.chunk","created":7,"model":"x","usage":null,' + ESCAPED,
            True,
        ),
        # spaces after the separators (Python's json): rebuilt from the parsed chunk, same meaning
        (
            b'{"id": "up-1", "object":"chat.completion.chunk","created":7,"model":"x","usage":null,'
            + ESCAPED,
            False,
        ),
    ],
)
def test_relay_rewrites_the_id_in_the_bytes_or_rebuilds(raw: bytes, as_sent: bool) -> None:
    relay = _relay()
    out = relay.process(raw, orjson.loads(raw))
    got = _sent(out)
    assert got["id"] == "chatcmpl-ours" and "usage" not in got
    assert got["choices"][0]["delta"]["content"] == "caf\u00e9" and got["model"] == "x"
    assert (b"\\u00e9" in (out or b"")) is as_sent  # the upstream's own bytes, escape and all


def test_a_multi_line_event_is_sent_as_one_data_line() -> None:
    raw = orjson.dumps(CHUNK, option=orjson.OPT_INDENT_2)  # an upstream that splits its JSON over lines
    decoder = SSEDecoder()
    [(data, _)] = decoder.feed(b"".join(b"data: " + line + b"\n" for line in raw.split(b"\n")) + b"\n")
    out = _relay().process(data, orjson.loads(data))
    assert out is not None and out.count(b"\n") == 2 and _sent(out)["id"] == "chatcmpl-ours"


def test_relay_rebuilds_what_the_bytes_cannot_say() -> None:
    relay = _relay(with_usage=True)
    relay.process(orjson.dumps(CHUNK), dict(CHUNK))
    later = {**CHUNK, "created": 9, "model": "", "object": "chunk"}  # drifting fields: normalised
    got = _sent(relay.process(orjson.dumps(later), orjson.loads(orjson.dumps(later))))
    assert (got["created"], got["model"], got["object"]) == (7, "x", "chat.completion.chunk")
    assert got["usage"] is None  # asked for: kept
    call = {"index": 0, "id": "up-1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    twin = {**CHUNK, "choices": [{"index": 0, "delta": {"tool_calls": [call]}, "finish_reason": None}]}
    got = _sent(relay.process(orjson.dumps(twin), orjson.loads(orjson.dumps(twin))))
    assert got["id"] == "chatcmpl-ours" and got["choices"][0]["delta"]["tool_calls"][0]["id"] == "up-1"


class _Reads:
    """A transport's byte reads, as given."""

    def __init__(self, reads: list[bytes]) -> None:
        self._reads = iter(reads)

    def __aiter__(self) -> _Reads:
        return self

    async def __anext__(self) -> bytes:
        try:
            return next(self._reads)
        except StopIteration:
            raise StopAsyncIteration from None


def _event(i: int, finish: str | None = None) -> bytes:
    delta = {} if finish else {"content": f" w{i}"}
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return b"data: " + orjson.dumps({**CHUNK, "choices": [choice]}) + b"\n\n"


async def test_events_already_waiting_go_out_in_one_write() -> None:
    up = Upstream("u", UpstreamConfig(base_url="http://127.0.0.1:9/v1", model="m"), None)  # type: ignore[arg-type]
    reads = [
        _event(0),
        _event(1) + _event(2) + _event(3)[:20],
        _event(3)[20:] + _event(4, "stop") + b"data: [DONE]\n\n",
    ]
    events = UpstreamEvents(up, _Reads(reads))
    relay = _relay()
    writes = []
    while batch := await events.batch():
        writes.append(relay.process_batch(batch))
    assert [w.count(b"data: ") for w in writes] == [1, 2, 1]  # the finish chunk is held for the end
    texts = [
        orjson.loads(line[6:])["choices"][0]["delta"]["content"]
        for w in writes
        for line in w.split(b"\n\n")
        if line
    ]
    assert texts == [" w0", " w1", " w2", " w3"]
    assert relay.finish_reasons == {0: "stop"} and relay.text_chars == 12


async def test_a_bad_event_after_good_ones_in_one_read_fails_after_them() -> None:
    up = Upstream("u", UpstreamConfig(base_url="http://127.0.0.1:9/v1", model="m"), None)  # type: ignore[arg-type]
    events = UpstreamEvents(up, _Reads([_event(0) + b"data: {broken\n\n"]))
    first = await events.batch()
    assert len(first) == 1
    with pytest.raises(UpstreamProtocolError, match="invalid JSON"):
        await events.batch()


def test_lf_only_decoder_matches_line_by_line() -> None:
    stream = b'data: {"a":1}\n\n: ping\n\nevent: error\ndata: {"b":2}\n\ndata: x\ndata: y\n\n\n\ndata: z\n\n'
    whole = SSEDecoder().feed(stream)
    assert whole == [(b'{"a":1}', "message"), (b'{"b":2}', "error"), (b"x\ny", "message"), (b"z", "message")]
    for step in range(1, 9):
        d = SSEDecoder()
        got = [e for i in range(0, len(stream), step) for e in d.feed(stream[i : i + step])]
        assert got + d.flush() == whole


@pytest.mark.parametrize("model", ["default", "large"])  # a cascade's streamed last stage; a pass-through
async def test_an_upstream_that_cannot_stream_tool_calls_is_asked_unstreamed(
    fake: FakeUpstream, model: str
) -> None:
    """``stream_tools: false`` (llama-cpp-python's function-calling format refuses streamed tool requests
    with tool_choice auto): a streamed request with tools is asked unstreamed and its answer streamed to
    the client in chunks; without tools the upstream still streams straight through. With the default,
    the same request fails with the upstream's error."""
    control = {"cascade": {"min_stage": 1}} if model == "default" else {}
    for stream_tools in (False, True):
        cfg = base_config()
        cfg["upstreams"]["large"] = upstream("tools+nostreamtools", stream_tools=stream_tools)
        async with proxy(cfg, fake) as (c, _):
            r = await c.post("/v1/chat/completions", json=chat(model, stream=True, tools=TOOLS, **control))
            asked = fake.requests[-1]["body"]
            if stream_tools:  # the upstream refused before a byte was sent: a 502 naming its error
                assert r.status_code == 502 and asked["stream"] is True
                assert "streaming tool choice is not supported" in r.json()["error"]["message"]
                continue
            events = sse_events(r.text)
            assert r.status_code == 200 and events[-1] == "[DONE]"
            chunks = [e for e in events[:-1] if isinstance(e, dict)]
            assert not any("error" in e for e in chunks) and asked.get("stream") is not True
            for ch in chunks:
                check_chunk(ch)
            head = chunks[0]["choices"][0]["delta"]
            assert head["tool_calls"][0]["function"]["name"] == "get_weather"
            assert [ch["choices"][0]["finish_reason"] for ch in chunks if ch["choices"]][-1] == "tool_calls"
            assert chunks[-1]["cascade"]["upstream"] == "large"
            # No tools: streamed straight through as ever.
            r = await c.post("/v1/chat/completions", json=chat(model, stream=True, **control))
            assert sse_events(r.text)[-1] == "[DONE]" and fake.requests[-1]["body"]["stream"] is True
