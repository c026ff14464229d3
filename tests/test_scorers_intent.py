"""The heuristic's request-intent checks (app.scoring.intent): JSON asked for in the prompt only, and a
text answer where an offered tool should have been called; and what they must leave alone."""

from __future__ import annotations

from typing import Any

import pytest

from app.config import HeuristicScorer as HeuristicConfig
from app.scoring.base import Answer
from app.scoring.heuristic import Heuristic
from tests.conftest import base_config, proxy, two_stage
from tests.fake_upstream import FakeUpstream

pytestmark = pytest.mark.anyio

H = Heuristic(HeuristicConfig(type="heuristic"))
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
# instructor's MD_JSON mode: the schema in a system message, the ask at the end of the user message.
MD_JSON_SYSTEM = (
    "As a genius expert, your task is to understand the content and provide the parsed objects in json "
    'that match the following json_schema:\n\n{"properties": {"name": {"type": "string"}}}\n\n'
    "Make sure to return an instance of the JSON, not the schema itself"
)
MD_JSON_USER = (
    "Jason is 25.\n\nReturn the correct JSON response within a ```json codeblock. not the JSON_SCHEMA"
)


def _req(*messages: tuple[str, str], **extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": r, "content": c} for r, c in messages], **extra}


def _score(request: dict[str, Any], content: str) -> tuple[float, str]:
    message = {"role": "assistant", "content": content}
    answer = Answer(
        message, "stop", {"choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}, "s", 0
    )
    s = H.check(request, answer)
    return s.value, s.reason


NO_JSON = (0.0, "no JSON while the prompt asked for JSON")


@pytest.mark.parametrize(
    ("request_", "content", "expected"),
    [
        # JSON asked for in the prompt only.
        (
            _req(("system", MD_JSON_SYSTEM), ("user", MD_JSON_USER)),
            '```json\n{"name": "Jason"}\n```',
            (1.0, "ok"),
        ),
        (
            _req(("system", MD_JSON_SYSTEM), ("user", MD_JSON_USER)),
            'Sure! ```json\n{"name": "Jason"}\n``` Done.',
            (1.0, "ok"),
        ),
        (
            _req(("system", MD_JSON_SYSTEM), ("user", MD_JSON_USER)),
            'Here it is: {"name": "Jason"}',
            (1.0, "ok"),
        ),
        (_req(("system", MD_JSON_SYSTEM), ("user", MD_JSON_USER)), "Jason is a person aged 25.", NO_JSON),
        (
            _req(("system", MD_JSON_SYSTEM), ("user", MD_JSON_USER)),
            '```json\n{"name": "Jason",\n```',
            NO_JSON,
        ),
        (_req(("user", "List three colours. Respond in JSON.")), "red, green, blue", NO_JSON),
        (_req(("user", "List three colours. Respond in JSON.")), '["red", "green", "blue"]', (1.0, "ok")),
        (_req(("user", "Output valid JSON with keys a and b.")), "a is 1 and b is 2", NO_JSON),
        # A question about JSON, or JSON mentioned in passing, asks for nothing.
        (_req(("user", "What is JSON?")), "A text format for data.", (1.0, "ok")),
        (
            _req(("user", "Explain the difference between JSON and YAML.")),
            "YAML allows comments.",
            (1.0, "ok"),
        ),
        (_req(("user", "My config file is JSON. Why does it not load?")), "Check the commas.", (1.0, "ok")),
        # An earlier user turn asking for JSON does not bind the latest answer.
        (
            _req(("user", "Respond in JSON."), ("assistant", "{}"), ("user", "Now say hi in words.")),
            "Hi!",
            (1.0, "ok"),
        ),
    ],
)
def test_json_asked_in_the_prompt(
    request_: dict[str, Any], content: str, expected: tuple[float, str]
) -> None:
    assert _score(request_, content) == expected


WRITTEN = (0.0, "a tool call written as text")
WITHOUT = (0.3, "answered without the offered tool")


@pytest.mark.parametrize(
    ("request_", "content", "expected"),
    [
        # Good plain text with tools merely on offer is left alone.
        (_req(("user", "hi"), tools=[WEATHER]), "Hello! How can I help you today?", (1.0, "ok")),
        (_req(("user", "What is 2+2?"), tools=[WEATHER]), "2 + 2 = 4.", (1.0, "ok")),
        (
            _req(("user", "Weather in Paris?"), tools=[WEATHER]),
            "Which city in France do you mean, Paris?",
            (1.0, "ok"),
        ),
        # The model cannot emit a tool call and writes one as text.
        (_req(("user", "Weather in Paris?"), tools=[WEATHER]), 'get_weather(city="Paris")', WRITTEN),
        (
            _req(("user", "Weather in Paris?"), tools=[WEATHER]),
            '{"name": "get_weather", "arguments": {"city": "Paris"}}',
            WRITTEN,
        ),
        (
            _req(("user", "Weather in Paris?"), tools=[WEATHER]),
            '<tool_call>{"city": "Paris"}</tool_call>',
            WRITTEN,
        ),
        # It says it cannot look it up, while a tool on the same subject was offered.
        (
            _req(("user", "What's the weather in Paris now?"), tools=[WEATHER]),
            "I don't have access to real-time weather data, but Paris is usually mild.",
            WITHOUT,
        ),
        (
            _req(("user", "What's the weather in Paris now?"), tools=[WEATHER]),
            "I’m unable to check live conditions.",
            WITHOUT,
        ),
        # ... but not when the offered tool has nothing to do with the request.
        (
            _req(("user", "What is the stock price of ACME?"), tools=[WEATHER]),
            "I don't have access to real-time market data.",
            (1.0, "ok"),
        ),
        # After a tool result, text is the expected answer; tool_choice none asks for text.
        (
            {
                "model": "m",
                "tools": [WEATHER],
                "messages": [
                    {"role": "user", "content": "Weather in Paris?"},
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {
                                "id": "c",
                                "type": "function",
                                "function": {"name": "get_weather", "arguments": "{}"},
                            }
                        ],
                    },
                    {"role": "tool", "tool_call_id": "c", "content": "sunny"},
                ],
            },
            "I don't have access to more than this: get_weather() said sunny.",
            (1.0, "ok"),
        ),
        (
            _req(("user", "Weather in Paris?"), tools=[WEATHER], tool_choice="none"),
            'get_weather(city="Paris")',
            (1.0, "ok"),
        ),
    ],
)
def test_a_tool_that_should_have_been_called(
    request_: dict[str, Any], content: str, expected: tuple[float, str]
) -> None:
    assert _score(request_, content) == expected


async def test_prompt_json_and_missed_tools_escalate_through_the_cascade(fake: FakeUpstream) -> None:
    md_json = {
        "model": "default",
        "messages": [
            {"role": "system", "content": MD_JSON_SYSTEM},
            {"role": "user", "content": MD_JSON_USER},
        ],
    }
    for first, stage in (("json", 0), ("ok", 1)):
        async with proxy(two_stage(first), fake) as (c, _):
            body = (await c.post("/v1/chat/completions", json=md_json)).json()
        assert body["cascade"]["stage"] == stage, body["cascade"]
    # (the fake's `answer-` turns underscores into spaces: a tool name without one)
    forecast = {"type": "function", "function": {**WEATHER["function"], "name": "forecast"}}
    ask = {
        "model": "default",
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": [forecast],
    }
    async with proxy(two_stage('answer-forecast(city="Paris")', "tools"), fake) as (c, _):
        body = (await c.post("/v1/chat/completions", json=ask)).json()
    assert body["cascade"]["attempts"][0]["detail"] == "a tool call written as text"
    assert body["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "forecast"
    async with proxy(base_config(), fake) as (c, _):
        body = (
            await c.post(
                "/v1/chat/completions", json={**ask, "messages": [{"role": "user", "content": "hi"}]}
            )
        ).json()
    assert body["cascade"]["stage"] == 0
