"""Real servers on 127.0.0.1: the official OpenAI SDK against the proxy, first-byte timing, disconnects.

These catch what in-process ASGI hides: buffering, keep-alive, and a client going away mid-request.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import httpx
import openai
import pytest

from tests.conftest import base_config, chat, sse_events, two_stage, wait_for
from tests.conftest import loopback_stack as stack
from tests.schema import check_chunk, check_completion, check_error

pytestmark = [pytest.mark.anyio, pytest.mark.loopback]

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]


def _sdk_dump(obj: Any) -> Any:
    return obj.model_dump(exclude_unset=True)


async def test_official_async_client_create_stream_and_tools() -> None:
    async with stack(two_stage("refuse")) as (url, _, _):
        client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0)
        raw = await client.chat.completions.with_raw_response.create(
            model="default", messages=[{"role": "user", "content": "hi"}]
        )
        body = raw.http_response.json()
        check_completion(body)
        assert raw.headers["x-cascade-stage"] == "1"
        resp = raw.parse()
        assert resp.choices[0].message.content == "large says hi"
        assert resp.model_extra and resp.model_extra["cascade"]["escalations"] == 1

        stream = await client.chat.completions.create(
            model="default",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        text, last = "", None
        async for chunk in stream:
            check_chunk(_sdk_dump(chunk))
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            last = chunk
        assert text == "large says hi"
        assert last is not None and last.usage is not None and last.usage.total_tokens > 0
        assert last.model_extra and last.model_extra["cascade"]["upstream"] == "large"
        await client.close()

    async with stack(two_stage("tools", "tools")) as (url, _, _):
        client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0)
        resp = await client.chat.completions.create(
            model="default", messages=[{"role": "user", "content": "weather in Paris?"}], tools=TOOLS
        )
        call = resp.choices[0].message.tool_calls[0]  # type: ignore[index]
        assert call.function.name == "get_weather"  # type: ignore[union-attr]
        assert resp.model_extra and resp.model_extra["cascade"]["stage"] == 0
        await client.close()


async def test_official_sync_client_create_and_stream() -> None:
    async with stack(base_config()) as (url, _, _):

        def run() -> tuple[str, str, list[Any]]:
            with openai.OpenAI(base_url=url, api_key="unused", max_retries=0) as client:
                resp = client.chat.completions.create(
                    model="default", messages=[{"role": "user", "content": "hi"}]
                )
                chunks = list(
                    client.chat.completions.create(
                        model="default", messages=[{"role": "user", "content": "hi"}], stream=True
                    )
                )
                try:
                    client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
                except openai.NotFoundError as exc:
                    err = str(exc.code)
                return resp.choices[0].message.content or "", err, chunks

        content, err, chunks = await anyio.to_thread.run_sync(run)
        assert content == "The answer is 42."
        assert err == "model_not_found"
        for ch in chunks:
            check_chunk(_sdk_dump(ch))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "The answer is 42."


async def test_last_stage_first_byte_is_not_delayed_by_buffering() -> None:
    """The final stage streams through: its first words reach the client while the upstream is still in
    the middle of its answer (``stall``: it sends two words, then nothing for 30 s). A proxy that
    buffered would show the client nothing until the stall ends, well past the wait's bound."""
    cfg = two_stage("refuse", "stall")
    async with stack(cfg) as (url, fake, _), httpx.AsyncClient(timeout=30) as client:
        words: list[str] = []
        async with client.stream("POST", url + "/chat/completions", json=chat(stream=True)) as r:
            async with asyncio.timeout(10):
                async for line in r.aiter_lines():
                    event = sse_events(line + "\n\n")
                    if event and event[0]["choices"] and event[0]["choices"][0]["delta"].get("content"):
                        words.append(event[0]["choices"][0]["delta"]["content"])
                        break
            assert words == ["The"]
            assert fake.active_streams == 1 and fake.finished_streams == 0  # the upstream is still at it


async def test_client_disconnect_mid_stream_stops_the_upstream() -> None:
    cfg = two_stage("refuse", "stall")
    async with stack(cfg) as (url, fake, registry), httpx.AsyncClient(timeout=30) as client:
        async with client.stream(
            "POST",
            url + "/chat/completions",
            json={"model": "default", "messages": [{"role": "user", "content": "x"}], "stream": True},
        ) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    break  # got the first chunk; leave while the upstream is stalled (for 30 s)
        await wait_for(lambda: fake.cancelled_streams == 1, "the upstream stream is closed")
        assert fake.active_streams == 0
        _cancelled_not_failed(registry, await _requests(registry, "cancelled"), "large")
        assert registry.get_sample_value("cascade_in_flight_requests") == 0


def _cancelled_not_failed(registry: Any, requests: float, upstream: str) -> None:
    """A client that leaves ("stop generating") is no error of the proxy or the upstream: the request is
    ``cancelled``, and so is the call that was on; the error-ratio alerts must not see it."""
    assert requests == 1
    assert (
        registry.get_sample_value("cascade_requests_total", {"cascade": "default", "outcome": "error"})
        is None
    )
    labels = {"cascade": "default", "upstream": upstream}
    assert (
        registry.get_sample_value("cascade_attempts_total", {**labels, "stage": "1", "outcome": "cancelled"})
        == 1
    )
    assert (
        registry.get_sample_value("cascade_attempts_total", {**labels, "stage": "1", "outcome": "error"})
        is None
    )


async def test_client_disconnect_while_waiting_cancels_the_upstream_call() -> None:
    cfg = two_stage("slow-60000")  # a call that is not cancelled sits there for a minute
    async with stack(cfg) as (url, fake, registry):
        async with httpx.AsyncClient(timeout=0.3) as client:
            with pytest.raises(httpx.ReadTimeout):
                await client.post(
                    url + "/chat/completions",
                    json={"model": "default", "messages": [{"role": "user", "content": "x"}]},
                )
        await wait_for(lambda: fake.cancelled_waits == 1, "the upstream call is cancelled")
        assert await _requests(registry, "cancelled") == 1
        labels = {"cascade": "default", "upstream": "small", "stage": "0"}
        assert registry.get_sample_value("cascade_attempts_total", {**labels, "outcome": "cancelled"}) == 1
        assert registry.get_sample_value("cascade_attempts_total", {**labels, "outcome": "error"}) is None
        assert registry.get_sample_value("cascade_in_flight_requests") == 0


async def test_keep_alive_connection_is_reused() -> None:
    async with stack(base_config()) as (url, _, _), httpx.AsyncClient(timeout=10) as client:
        ports = set()
        for _ in range(5):
            r = await client.post(
                url + "/chat/completions",
                json={"model": "default", "messages": [{"role": "user", "content": "x"}]},
            )
            assert r.status_code == 200
            stream = r.extensions["network_stream"]
            ports.add(stream.get_extra_info("client_addr"))
        assert len(ports) == 1


@pytest.mark.parametrize(
    ("model", "reason", "kind"),
    [
        ("error-500", "upstream_error", "status_5xx"),
        ("error-429", "upstream_error", "status_4xx"),
        ("slow-30000", "timeout", "timeout"),
        ("drop", "upstream_error", "protocol"),
        ("badjson-body", "upstream_error", "protocol"),
        ("html", "upstream_error", "protocol"),
        ("error-in-200", "upstream_error", "protocol"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
async def test_fault_matrix_on_the_production_transport(
    model: str, reason: str, kind: str, stream: bool
) -> None:
    """The aiohttp transport maps every upstream fault to an escalation, stream or not, and counts it
    under its own error kind."""
    cfg = two_stage(model)
    cfg["upstreams"]["small"]["timeout_s"] = 0.5
    async with stack(cfg) as (url, _, registry), httpx.AsyncClient(timeout=30) as client:
        r = await client.post(
            url + "/chat/completions",
            json={"model": "default", "messages": [{"role": "user", "content": "x"}], "stream": stream},
        )
        assert r.status_code == 200
        if stream:
            events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            import orjson

            ext = orjson.loads(events[-2])["cascade"]
        else:
            ext = r.json()["cascade"]
        assert ext["upstream"] == "large"
        assert ext["attempts"][0]["outcome"] == "error" and ext["attempts"][0]["reason"] == reason
        kinds = {
            s.labels["kind"]
            for m in registry.collect()
            if m.name == "cascade_upstream_errors"
            for s in m.samples
            if s.labels.get("upstream") == "small" and s.value > 0 and s.name.endswith("_total")
        }
        assert kinds == {kind}


async def test_stalled_final_stream_becomes_an_error_event() -> None:
    cfg = two_stage("refuse", "stall")
    cfg["upstreams"]["large"]["timeout_s"] = 0.5
    async with stack(cfg) as (url, _, registry), httpx.AsyncClient(timeout=30) as client:
        r = await client.post(
            url + "/chat/completions",
            json={"model": "default", "messages": [{"role": "user", "content": "x"}], "stream": True},
        )
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and '"upstream_stream_failed"' in events[-2]
        assert (
            registry.get_sample_value(
                "cascade_upstream_errors_total", {"upstream": "large", "kind": "timeout"}
            )
            == 1
        )


@pytest.mark.loopback
async def test_the_deadline_passing_mid_stream_ends_it_with_an_error_event() -> None:
    # The deadline falls mid-stream with seconds to spare either way: the first word comes at once, the
    # whole answer would take 40 s.
    cfg = two_stage("refuse", "chunkdelay-100+words-400")
    cfg["cascades"]["default"]["deadline_s"] = 3
    async with stack(cfg) as (url, _, registry), httpx.AsyncClient(timeout=10) as client:
        r = await client.post(url + "/chat/completions", json=chat(stream=True))
        assert r.status_code == 200  # the stream had started
        events = sse_events(r.text)
        assert events[-1] == "[DONE]"
        *chunks, error = events[:-1]
        assert error["error"]["code"] == "deadline_exceeded"
        check_error(error)
        text = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks if ch.get("choices"))
        assert 0 < len(text.split()) < 400  # part of the answer, not all of it
        assert await _requests(registry, "error") == 1  # accounted when its stream closes
        # What was generated before the cut is charged.
        completion = registry.get_sample_value(
            "cascade_tokens_total", {"upstream": "large", "kind": "completion"}
        )
        assert completion is not None and completion > 0


async def _requests(registry: Any, outcome: str) -> float:
    """``cascade_requests_total{outcome=...}`` once it is set (a request is accounted when its stream
    closes, a moment after the client saw the end)."""
    labels = {"cascade": "default", "outcome": outcome}
    await wait_for(
        lambda: registry.get_sample_value("cascade_requests_total", labels), f"a request {outcome}"
    )
    return float(registry.get_sample_value("cascade_requests_total", labels) or 0.0)


async def test_a_stream_whose_response_cannot_be_built_is_still_released(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Between the upstream stream opening and the SSE response starting, whatever fails (here building
    the response) must not leave the stream without an owner: the upstream connection is closed, the
    request recorded, the in-flight gauge back to 0."""

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("cannot build the response")

    monkeypatch.setattr("app.api.chat.SSEResponse", broken)
    cfg = two_stage("refuse", "stall")
    async with stack(cfg) as (url, fake, registry), httpx.AsyncClient(timeout=30) as client:
        r = await client.post(url + "/chat/completions", json=chat(stream=True))
        assert r.status_code == 500
        check_error(r.json())
        await wait_for(lambda: fake.cancelled_streams == 1, "the upstream stream is closed")
        assert fake.active_streams == 0
        assert await _requests(registry, "error") == 1
        assert registry.get_sample_value("cascade_in_flight_requests") == 0


async def test_every_reply_has_a_request_id_and_a_trailing_slash_is_the_same_route() -> None:
    """OpenAI sends ``x-request-id`` on every reply; a client that logs it for support needs it on errors
    above all. It was only on chat completions and Responses: a 404 from a mistyped path, a 405, the
    models list and feedback errors had none. ``POST /v1/chat/completions/`` was a 307 with an empty body
    (an SDK that does not follow redirects on POST saw an empty reply)."""
    async with stack(two_stage("ok")) as (url, _, _), httpx.AsyncClient(base_url=url, timeout=30) as c:
        sent = {"x-request-id": "support-ticket-9"}
        for method, path in [("GET", "/nope"), ("DELETE", "/chat/completions"), ("GET", "/models")]:
            echoed = await c.request(method, path, headers=sent)
            fresh = await c.request(method, path)
            assert echoed.headers.get_list("x-request-id") == ["support-ticket-9"], (method, path)
            assert fresh.headers["x-request-id"].startswith("req-"), (method, path)
            assert echoed.status_code == fresh.status_code
        not_found = await c.get("/nope")
        check_error(not_found.json())
        assert not_found.status_code == 404
        # A presented id that is not a sane token is replaced, not echoed into the reply's headers.
        odd = await c.get("/models", headers={"x-request-id": "a b"})
        assert odd.headers["x-request-id"].startswith("req-")
        # Responses: one id, the same in the header as where the route uses it.
        r = await c.post("/responses", json={"model": "default", "input": "hi"})
        assert len(r.headers.get_list("x-request-id")) == 1
        for path in ("/chat/completions/", "/chat/completions/?x=1"):
            slash = await c.post(path, json=chat(), headers=sent)
            assert slash.status_code == 200, slash.text
            check_completion(slash.json())
            assert slash.headers["x-request-id"] == "support-ticket-9"
        assert (await c.get("/models/")).json()["object"] == "list"


async def test_an_upstream_reply_over_the_size_limit_is_refused_not_held(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A broken upstream sending hundreds of megabytes (an answer or an error page) took the proxy's
    memory with it: the whole reply was read into memory, without a limit. Over ``MAX_REPLY_BYTES`` the
    call fails as a protocol error (the cascade escalates), with or without a declared length."""
    from app.upstream import transport

    monkeypatch.setattr(transport, "MAX_REPLY_BYTES", 2000)
    async with stack(two_stage("words-2000", "ok")) as (url, _, _), httpx.AsyncClient(timeout=30) as client:
        r = await client.post(url + "/chat/completions", json=chat())
        body = r.json()
        assert r.status_code == 200 and body["cascade"]["stage"] == 1, body
        first = body["cascade"]["attempts"][0]
        assert first["outcome"] == "error" and "over the 2000-byte limit" in first["detail"], first


@contextlib.asynccontextmanager
async def _proxy_to(body: Callable[[Any], AsyncIterator[bytes]], media_type: str) -> AsyncIterator[str]:
    """A proxy (base URL) whose upstream ``chunky`` answers every chat request with ``body(request)``,
    sent as it is produced (chunked: no declared length)."""
    from starlette.applications import Starlette
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    from app.config import parse_config
    from app.main import create_app
    from tests.fake_upstream import serve_in_background

    async def completions(request: Any) -> StreamingResponse:
        return StreamingResponse(body(await request.json()), media_type=media_type)

    chunky = Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"])])
    async with serve_in_background(chunky) as up_url:
        cfg = base_config()
        cfg["upstreams"]["chunky"] = {"base_url": up_url + "/v1", "model": "m"}
        async with serve_in_background(create_app(parse_config(cfg, env={}))) as url:
            yield url + "/v1"


async def test_a_chunked_upstream_reply_over_the_size_limit_is_refused_as_it_arrives(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same without a declared length (chunked transfer encoding): counted as it arrives."""
    from app.upstream import transport

    async def body(request: Any) -> AsyncIterator[bytes]:
        yield b'{"id": "c1", "object": "chat.completion", "created": 1, "model": "m", '
        yield b'"choices": [{"index": 0, '
        for _ in range(50):
            yield b'"finish_reason": "stop", ' * 10
        yield b'"message": {"role": "assistant", "content": "hi"}}]}'

    monkeypatch.setattr(transport, "MAX_REPLY_BYTES", 3000)
    async with _proxy_to(body, "application/json") as url, httpx.AsyncClient(timeout=30) as client:
        r = await client.post(url + "/chat/completions", json=chat("chunky"))
    assert r.status_code == 502, r.text
    assert "over the 3000-byte limit" in r.json()["error"]["message"]


async def test_a_streamed_upstream_event_over_the_size_limit_is_refused_as_it_arrives(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An upstream stream whose line never ends (a broken server, a hostile one) grew the decoder's
    buffer without bound, and re-copied it on every read. Over ``MAX_EVENT_BYTES`` the call fails as
    a protocol error, like a whole reply over its limit; a stream within it is relayed as sent."""
    from app.upstream import sse

    async def body(request: Any) -> AsyncIterator[bytes]:
        yield b'data: {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m", '
        yield b'"choices": [{"index": 0, "finish_reason": null, "delta": {"content": "'
        for _ in range(int(request["messages"][0]["content"])):
            yield b"word " * 20
        yield b'"}}]}\n\n'
        yield b"data: [DONE]\n\n"

    monkeypatch.setattr(sse, "MAX_EVENT_BYTES", 3000)
    async with _proxy_to(body, "text/event-stream") as url, httpx.AsyncClient(timeout=30) as client:
        small = {**chat("chunky", "20"), "stream": True}
        ok = await client.post(url + "/chat/completions", json=small)
        assert ok.status_code == 200, ok.text
        text = "".join(
            c["choices"][0]["delta"].get("content") or ""
            for c in sse_events(ok.text)
            if isinstance(c, dict) and c["choices"]
        )
        assert text == "word " * 400
        # 1 MB: more than the proxy's HTTP client reads at once, however loaded the machine.
        r = await client.post(url + "/chat/completions", json={**small, **chat("chunky", "10000")})
    assert r.status_code == 502, r.text
    assert "over the 3000-byte limit" in r.json()["error"]["message"]
