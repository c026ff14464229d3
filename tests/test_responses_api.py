"""``POST /v1/responses`` through the proxy's HTTP path (in-process ASGI): the translation onto the chat
engine, the ``response`` object and the stream events, each checked against the official schema."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry

from tests.conftest import base_config, proxy, two_stage
from tests.fake_upstream import FakeUpstream
from tests.schema import check_error, check_response, check_response_event, check_response_request

pytestmark = pytest.mark.anyio

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    "strict": True,
}


def req(model: str = "default", input: Any = "What is 6*7?", **extra: Any) -> dict[str, Any]:
    body = {"model": model, "input": input, **extra}
    check_response_request(body)  # every request these tests send is a valid Responses request
    return body


def events_of(text: str) -> list[dict[str, Any]]:
    """Parse a Responses SSE body: each frame's ``event:`` must match its payload's ``type``."""
    out: list[dict[str, Any]] = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        payload = orjson.loads(lines["data"])
        assert lines["event"] == payload["type"]
        check_response_event(payload)
        out.append(payload)
    assert [e["sequence_number"] for e in out] == list(range(len(out)))
    return out


def types(events: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in events]


async def test_string_input_gets_a_response_object_from_the_cascade(fake: FakeUpstream) -> None:
    async with proxy(base_config(), fake) as (c, _):
        r = await c.post("/v1/responses", json=req(), headers={"x-request-id": "resp-test.1"})
    assert r.status_code == 200, r.text
    body = r.json()
    check_response(body)
    assert body["object"] == "response" and body["id"].startswith("resp_")
    assert body["status"] == "completed" and body["error"] is None and body["incomplete_details"] is None
    assert body["model"] == "ok"
    [item] = body["output"]
    assert item["type"] == "message" and item["role"] == "assistant" and item["status"] == "completed"
    assert item["content"] == [
        {"type": "output_text", "text": "The answer is 42.", "annotations": [], "logprobs": []}
    ]
    assert body["output_text"] == "The answer is 42."
    u = body["usage"]
    assert u["input_tokens"] > 0 and u["output_tokens"] > 0
    assert u["total_tokens"] == u["input_tokens"] + u["output_tokens"]
    ext = body["cascade"]
    assert (ext["stage"], ext["upstream"], ext["escalations"]) == (0, "small", 0)
    assert r.headers["x-cascade-stage"] == "0" and r.headers["x-cascade-upstream"] == "small"
    assert float(r.headers["x-cascade-cost-usd"]) == pytest.approx(ext["cost_usd"])
    assert r.headers["x-request-id"] == "resp-test.1"
    # The upstream got a chat request: the input as one user message.
    assert fake.requests[0]["body"]["messages"] == [{"role": "user", "content": "What is 6*7?"}]


async def test_escalation_scoring_and_metrics_are_the_chat_engines(fake: FakeUpstream) -> None:
    registry = CollectorRegistry()
    async with proxy(two_stage("refuse"), fake, registry=registry) as (c, _):
        r = await c.post("/v1/responses", json=req())
    body = r.json()
    check_response(body)
    assert body["output_text"] == "large says hi"
    ext = body["cascade"]
    assert ext["escalations"] == 1
    assert [(a["stage"], a["outcome"]) for a in ext["attempts"]] == [(0, "rejected"), (1, "accepted")]
    labels = {"cascade": "default", "outcome": "success"}
    assert registry.get_sample_value("cascade_requests_total", labels) == 1.0
    esc = {"cascade": "default", "from_upstream": "small", "to_upstream": "large", "reason": "low_score"}
    assert registry.get_sample_value("cascade_escalations_total", esc) == 1.0


async def test_items_instructions_tools_and_format_are_translated_for_the_upstream(
    fake: FakeUpstream,
) -> None:
    cfg = base_config()
    cfg["upstreams"]["large"]["model"] = "echo"
    body = req(
        "large",
        [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]},
            {
                "type": "function_call",
                "call_id": "call_1",
                "name": "get_weather",
                "arguments": '{"city":"Paris"}',
            },
            {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
            {
                "type": "message",
                "role": "assistant",
                "id": "msg_1",
                "status": "completed",
                "content": [
                    {"type": "output_text", "text": "It is sunny.", "annotations": [], "logprobs": []},
                    {"type": "refusal", "refusal": "I cannot say more."},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "And Rome?"},
                    {"type": "input_text", "text": "Thanks."},
                ],
            },
        ],
        instructions="You are a weather bot.",
        tools=[WEATHER],
        tool_choice={"type": "function", "name": "get_weather"},
        parallel_tool_calls=False,
        text={
            "format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}, "strict": True},
            "verbosity": "low",
        },
        service_tier="flex",
        safety_identifier="hashed-user-1",
        prompt_cache_key="weather-bot",
        max_output_tokens=64,
        temperature=0.2,
        top_p=0.9,
        metadata={"k": "v"},
        user="u-1",
    )
    async with proxy(cfg, fake) as (c, _):
        r = await c.post("/v1/responses", json=body)
    resp = r.json()
    check_response(resp)
    sent = orjson.loads(resp["output_text"])
    assert sent["messages"] == [
        {"role": "system", "content": "You are a weather bot.\n\nBe brief."},  # one system message
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        # Separate parts stay apart (they ran together: "It is sunny.I cannot say more.").
        {"role": "assistant", "content": "It is sunny.\nI cannot say more."},
        {"role": "user", "content": "And Rome?\nThanks."},
    ]
    assert sent["tools"] == [
        {
            "type": "function",
            "function": {k: WEATHER[k] for k in ("name", "description", "parameters", "strict")},
        }
    ]
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert sent["parallel_tool_calls"] is False
    assert sent["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "w", "schema": {"type": "object"}, "strict": True},
    }
    assert (sent["max_tokens"], sent["temperature"], sent["top_p"], sent["user"]) == (64, 0.2, 0.9, "u-1")
    assert "metadata" not in sent and "input" not in sent and "instructions" not in sent
    # Fields the chat API has under the same name (text.verbosity as verbosity) reach the upstream.
    assert (sent["verbosity"], sent["service_tier"]) == ("low", "flex")
    assert (sent["safety_identifier"], sent["prompt_cache_key"]) == ("hashed-user-1", "weather-bot")
    # What the client set is echoed on the response, as OpenAI does.
    assert resp["instructions"] == "You are a weather bot."
    assert resp["metadata"] == {"k": "v"} and resp["max_output_tokens"] == 64
    assert resp["tools"] == [WEATHER] and resp["parallel_tool_calls"] is False
    assert resp["text"]["format"]["type"] == "json_schema" and resp["text"]["verbosity"] == "low"
    assert (resp["service_tier"], resp["prompt_cache_key"]) == ("flex", "weather-bot")


async def test_images_files_parallel_calls_and_allowed_tools_are_translated(fake: FakeUpstream) -> None:
    """The other input shapes the chat API has a form for, as the upstream receives them."""
    cfg = base_config()
    cfg["upstreams"]["large"]["model"] = "echo"
    image = {"type": "input_image", "image_url": "https://example.com/cat.png", "detail": "low"}
    file = {"type": "input_file", "file_data": "data:application/pdf;base64,JVBERi0=", "filename": "a.pdf"}
    body = req(
        "large",
        [
            {"role": "user", "content": [{"type": "input_text", "text": "What is this?"}, image, file]},
            {"type": "reasoning", "id": "rs_1", "summary": []},  # a model's reasoning passed back: dropped
            {  # an earlier answer with no text: dropped
                "type": "message",
                "role": "assistant",
                "id": "msg_1",
                "status": "completed",
                "content": [{"type": "output_text", "text": "", "annotations": [], "logprobs": []}],
            },
            {
                "type": "function_call",
                "call_id": "c1",
                "name": "get_weather",
                "arguments": '{"city":"Paris"}',
            },
            {"type": "function_call", "call_id": "c2", "name": "get_weather", "arguments": '{"city":"Rome"}'},
            {
                "type": "function_call_output",
                "call_id": "c1",
                "output": [{"type": "input_text", "text": "sun"}, {"type": "input_text", "text": "ny"}],
            },
            {"type": "function_call_output", "call_id": "c2", "output": "rain"},
        ],
        tools=[WEATHER],
        tool_choice={
            "type": "allowed_tools",
            "mode": "required",
            "tools": [{"type": "function", "name": "get_weather"}],
        },
        text={"format": {"type": "json_object"}},
        reasoning={"effort": "low"},
    )
    async with proxy(cfg, fake) as (c, _):
        r = await c.post("/v1/responses", json=body)
        plain = await c.post("/v1/responses", json=req("large", "hi", text={"format": {"type": "text"}}))
    assert r.status_code == 200, r.text
    sent = orjson.loads(r.json()["output_text"])
    assert sent["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.png", "detail": "low"}},
                {
                    "type": "file",
                    "file": {"file_data": "data:application/pdf;base64,JVBERi0=", "filename": "a.pdf"},
                },
            ],
        },
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [  # calls of one turn are one assistant message in chat
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                },
                {
                    "id": "c2",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "c2", "content": "rain"},
    ]
    assert sent["tool_choice"] == {
        "type": "allowed_tools",
        "allowed_tools": {
            "mode": "required",
            "tools": [{"type": "function", "function": {"name": "get_weather"}}],
        },
    }
    assert sent["response_format"] == {"type": "json_object"} and sent["reasoning_effort"] == "low"
    assert plain.status_code == 200 and "response_format" not in orjson.loads(plain.json()["output_text"])


async def test_a_function_call_answer_is_a_function_call_item(fake: FakeUpstream) -> None:
    async with proxy(two_stage("tools", "tools"), fake) as (c, _):
        r = await c.post("/v1/responses", json=req(tools=[WEATHER]))
    body = r.json()
    check_response(body)
    [call] = body["output"]
    assert call["type"] == "function_call" and call["name"] == "get_weather"
    assert (
        call["call_id"]
        and call["id"].startswith("fc_")
        and orjson.loads(call["arguments"]) == {"city": "test"}
    )
    assert body["output_text"] == "" and body["cascade"]["stage"] == 0


async def test_cut_at_max_output_tokens_is_incomplete(fake: FakeUpstream) -> None:
    cfg = base_config()
    cfg["upstreams"]["large"]["model"] = "truncated"
    async with proxy(cfg, fake) as (c, _):
        r = await c.post("/v1/responses", json=req("large", max_output_tokens=16))
        s = await c.post("/v1/responses", json=req("large", max_output_tokens=16, stream=True))
    body = r.json()
    check_response(body)
    assert body["status"] == "incomplete"
    assert body["incomplete_details"] == {"reason": "max_output_tokens"}
    assert body["output"][0]["status"] == "incomplete"
    events = events_of(s.text)
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}


MESSAGE_EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
]
MESSAGE_END = ["response.output_text.done", "response.content_part.done", "response.output_item.done"]


@pytest.mark.parametrize(("first", "stage"), [("ok", 0), ("refuse", 1)])
async def test_stream_events_in_openais_order(fake: FakeUpstream, first: str, stage: int) -> None:
    """Stage 0 accepted (a replayed answer) and the last stage (relayed as it streams) alike."""
    async with proxy(two_stage(first), fake) as (c, _):
        r = await c.post("/v1/responses", json=req(stream=True))
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["x-cascade-stage"] == str(stage)
    events = events_of(r.text)
    names = types(events)
    deltas = [e["delta"] for e in events if e["type"] == "response.output_text.delta"]
    assert names[:4] == MESSAGE_EVENTS
    assert names[4 : 4 + len(deltas)] == ["response.output_text.delta"] * len(deltas)
    assert names[4 + len(deltas) :] == [*MESSAGE_END, "response.completed"]
    text = "The answer is 42." if stage == 0 else "large says hi"
    assert "".join(deltas) == text
    created = events[0]["response"]
    assert created["status"] == "in_progress" and created["output"] == [] and "usage" not in created
    done = events[-1]["response"]
    assert done["id"] == created["id"] and done["status"] == "completed"
    assert done["output"][0]["content"][0]["text"] == text
    assert done["usage"]["total_tokens"] > 0
    assert done["cascade"]["stage"] == stage
    item_ids = {e["item_id"] for e in events if "item_id" in e}
    assert item_ids == {done["output"][0]["id"]}


async def test_stream_function_call_events(fake: FakeUpstream) -> None:
    async with proxy(two_stage("refuse", "tools"), fake) as (c, _):
        r = await c.post("/v1/responses", json=req(stream=True, tools=[WEATHER]))
    events = events_of(r.text)
    names = types(events)
    assert names[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert "response.function_call_arguments.delta" in names
    assert names[-3:] == [
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    added = events[2]["item"]
    assert added["type"] == "function_call" and added["name"] == "get_weather"
    args = "".join(e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta")
    assert events[-3]["arguments"] == args and orjson.loads(args) == {"city": "test"}
    [call] = events[-1]["response"]["output"]
    assert call["arguments"] == args and call["call_id"] == added["call_id"]


async def test_stream_failure_mid_stream_is_an_error_event_then_response_failed(fake: FakeUpstream) -> None:
    async with proxy(two_stage("refuse", "drop"), fake) as (c, _):
        r = await c.post("/v1/responses", json=req(stream=True))
    events = events_of(r.text)
    assert "response.output_text.delta" in types(events)
    assert types(events)[-2:] == ["error", "response.failed"]
    assert events[-2]["code"] == "upstream_stream_failed"
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and failed["error"]["code"] == "server_error"


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"input": "hi"}, 400, "model"),
        ({"model": "default"}, 400, "input"),
        ({"model": "default", "input": 42}, 400, "input"),
        ({"model": "default", "input": "hi", "previous_response_id": "resp_1"}, 400, "previous_response_id"),
        ({"model": "default", "input": "hi", "store": True}, 400, "store"),
        ({"model": "default", "input": [{"type": "item_reference", "id": "msg_1"}]}, 400, "input[0].type"),
        ({"model": "default", "input": [{"role": "wizard", "content": "x"}]}, 400, "input[0].role"),
        ({"model": "default", "input": "hi", "tools": [{"type": "web_search"}]}, 400, "tools[0].type"),
        ({"model": "default", "input": "hi", "temperature": 9}, 400, "temperature"),
        ({"model": "default", "input": "hi", "max_output_tokens": 0}, 400, "max_output_tokens"),
        (
            {"model": "default", "input": "hi", "text": {"format": {"type": "json_schema"}}},
            400,
            "text.format.name",
        ),
        ({"model": "default", "input": "hi", "text": {"verbosity": "terse"}}, 400, "text.verbosity"),
        ({"model": "default", "input": "hi", "service_tier": 1}, 400, "service_tier"),
        ({"model": "nope", "input": "hi"}, 404, "model"),
        # every other check of app/responses/request.py, each naming the field it refused
        ({"model": "", "input": "hi"}, 400, "model"),
        ({"model": "default", "input": "hi", "conversation": "conv_1"}, 400, "conversation"),
        ({"model": "default", "input": "hi", "background": True}, 400, "background"),
        ({"model": "default", "input": "hi", "prompt": {"id": "pmpt_1"}}, 400, "prompt"),
        ({"model": "default", "input": "hi", "stream": "yes"}, 400, "stream"),
        ({"model": "default", "input": "hi", "top_p": "high"}, 400, "top_p"),
        ({"model": "default", "input": "hi", "max_output_tokens": 1.5}, 400, "max_output_tokens"),
        ({"model": "default", "input": "hi", "metadata": ["a"]}, 400, "metadata"),
        ({"model": "default", "input": "hi", "instructions": 7}, 400, "instructions"),
        ({"model": "default", "input": ["hi"]}, 400, "input[0]"),
        ({"model": "default", "input": [{"type": "web_search_call"}]}, 400, "input[0].type"),
        ({"model": "default", "input": [{"role": "user", "content": 5}]}, 400, "input[0].content"),
        ({"model": "default", "input": [{"role": "user", "content": ["x"]}]}, 400, "input[0].content[0]"),
        (
            {"model": "default", "input": [{"role": "user", "content": [{"type": "input_text"}]}]},
            400,
            "input[0].content[0].text",
        ),
        (
            {"model": "default", "input": [{"role": "user", "content": [{"type": "input_image"}]}]},
            400,
            "input[0].content[0].image_url",
        ),
        (
            {
                "model": "default",
                "input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}],
            },
            400,
            "input[0].content[0].file_data",
        ),
        (
            {"model": "default", "input": [{"role": "user", "content": [{"type": "input_audio"}]}]},
            400,
            "input[0].content[0].type",
        ),
        (
            {
                "model": "default",
                "input": [
                    {"role": "system", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}
                ],
            },
            400,
            "input[0].content",
        ),
        (
            {"model": "default", "input": [{"type": "function_call", "name": "f", "arguments": "{}"}]},
            400,
            "input[0].call_id",
        ),
        (
            {"model": "default", "input": [{"type": "function_call", "call_id": "c", "arguments": "{}"}]},
            400,
            "input[0].name",
        ),
        (
            {
                "model": "default",
                "input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": {}}],
            },
            400,
            "input[0].arguments",
        ),
        (
            {"model": "default", "input": [{"type": "function_call_output", "output": "x"}]},
            400,
            "input[0].call_id",
        ),
        (
            {"model": "default", "input": [{"type": "function_call_output", "call_id": "c", "output": 3}]},
            400,
            "input[0].output",
        ),
        (
            {
                "model": "default",
                "input": [
                    {
                        "type": "function_call_output",
                        "call_id": "c",
                        "output": [{"type": "input_image", "image_url": "https://x/y.png"}],
                    }
                ],
            },
            400,
            "input[0].output[0].type",
        ),
        ({"model": "default", "input": "hi", "tools": {"type": "function"}}, 400, "tools"),
        ({"model": "default", "input": "hi", "tools": ["f"]}, 400, "tools[0]"),
        ({"model": "default", "input": "hi", "tools": [{"type": "function"}]}, 400, "tools[0].name"),
        (
            {
                "model": "default",
                "input": "hi",
                "tools": [{"type": "function", "name": "f", "parameters": "x"}],
            },
            400,
            "tools[0].parameters",
        ),
        ({"model": "default", "input": "hi", "tool_choice": {"type": "function"}}, 400, "tool_choice.name"),
        (
            {"model": "default", "input": "hi", "tool_choice": {"type": "allowed_tools", "mode": "any"}},
            400,
            "tool_choice",
        ),
        (
            {
                "model": "default",
                "input": "hi",
                "tool_choice": {"type": "allowed_tools", "mode": "auto", "tools": [{"type": "web_search"}]},
            },
            400,
            "tool_choice.tools",
        ),
        ({"model": "default", "input": "hi", "tool_choice": "always"}, 400, "tool_choice"),
        ({"model": "default", "input": "hi", "text": "json"}, 400, "text"),
        ({"model": "default", "input": "hi", "text": {"format": "json"}}, 400, "text.format"),
        (
            {"model": "default", "input": "hi", "text": {"format": {"type": "json_schema", "name": "a"}}},
            400,
            "text.format.schema",
        ),
        ({"model": "default", "input": "hi", "text": {"format": {"type": "yaml"}}}, 400, "text.format.type"),
        ({"model": "default", "input": "hi", "reasoning": "high"}, 400, "reasoning"),
        ({"model": "default", "input": "hi", "reasoning": {"effort": 3}}, 400, "reasoning.effort"),
    ],
)
async def test_bad_requests_name_the_field(
    fake: FakeUpstream, body: dict[str, Any], status: int, param: str
) -> None:
    async with proxy(base_config(), fake) as (c, _):
        r = await c.post("/v1/responses", json=body)
    assert r.status_code == status, r.text
    err = r.json()
    check_error(err)
    assert err["error"]["param"] == param, err
    assert not fake.requests


async def test_stateless_refusals_say_why(fake: FakeUpstream) -> None:
    async with proxy(base_config(), fake) as (c, _):
        r = await c.post(
            "/v1/responses", json={"model": "default", "input": "x", "previous_response_id": "r"}
        )
        ok = await c.post("/v1/responses", json=req(store=False))
    err = r.json()["error"]
    assert err["code"] == "unsupported_parameter" and "stateless" in err["message"]
    assert ok.status_code == 200 and ok.json()["store"] is False


async def test_all_stages_failing_is_the_chat_error(fake: FakeUpstream) -> None:
    async with proxy(two_stage("error-500", "error-500"), fake) as (c, _):
        r = await c.post("/v1/responses", json=req())
    assert r.status_code == 502
    check_error(r.json())
