"""Real clients of the Responses API against the proxy on 127.0.0.1: the official ``openai`` python SDK
(``client.responses.create``, plain and streamed, a function tool and its result) and the OpenAI Agents
SDK's default model (a run with a function tool). Every body and event is checked against the schema."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from tests.conftest import loopback_stack as stack
from tests.conftest import two_stage
from tests.schema import check_response, check_response_event

pytestmark = [pytest.mark.anyio, pytest.mark.loopback]

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather for a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}


def _dump(obj: Any) -> Any:
    return obj.model_dump(exclude_unset=True, mode="json")


async def test_openai_responses_create_plain_and_streamed() -> None:
    async with stack(two_stage("refuse")) as (url, _, _):
        client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0)
        raw = await client.responses.with_raw_response.create(
            model="default", input="Say hi.", instructions="Be brief."
        )
        body = raw.http_response.json()
        check_response(body)
        assert raw.headers["x-cascade-stage"] == "1"
        resp = raw.parse()
        assert resp.status == "completed" and resp.output_text == "large says hi"
        assert resp.usage is not None and resp.usage.total_tokens > 0
        assert resp.model_extra and resp.model_extra["cascade"]["escalations"] == 1

        stream = await client.responses.create(model="default", input="Say hi.", stream=True)
        seen: list[str] = []
        text = ""
        final = None
        async for event in stream:
            check_response_event(_dump(event))
            seen.append(event.type)
            if event.type == "response.output_text.delta":
                text += event.delta
            if event.type == "response.completed":
                final = event.response
        assert text == "large says hi"
        assert seen[0] == "response.created" and seen[-1] == "response.completed"
        assert final is not None and final.output_text == "large says hi"
        assert final.model_extra and final.model_extra["cascade"]["upstream"] == "large"

        # The SDK's own stream helper accumulates the events into the final response.
        async with client.responses.stream(model="default", input="Say hi.") as s:
            async for _ in s:
                pass
            done = await s.get_final_response()
        assert done.output_text == "large says hi"
        await client.close()


async def test_openai_responses_function_tool_round_trip() -> None:
    """The `agent` fake upstream calls the tool first, then answers quoting the tool's result."""
    async with stack(two_stage("agent", "agent")) as (url, fake, _):
        client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0)
        first = await client.responses.create(
            model="default",
            input="Weather in Paris?",
            tools=[WEATHER],
            tool_choice="auto",
        )
        check_response(_dump(first))
        [call] = first.output
        assert call.type == "function_call" and call.name == "get_weather"
        assert fake.requests[-1]["body"]["tools"][0]["function"]["name"] == "get_weather"
        follow = [
            {"role": "user", "content": "Weather in Paris?"},
            *[_dump(item) for item in first.output],
            {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21C"},
        ]
        second = await client.responses.create(
            model="default",
            input=follow,
            tools=[WEATHER],
        )
        check_response(_dump(second))
        assert second.output_text == "The tool said: sunny, 21C"
        sent = fake.requests[-1]["body"]["messages"]
        assert [m["role"] for m in sent] == ["user", "assistant", "tool"]
        assert sent[1]["tool_calls"][0]["id"] == call.call_id == sent[2]["tool_call_id"]

        # The same turn streamed: the call arrives as function_call_arguments events.
        stream = await client.responses.create(
            model="default",
            input="Weather in Paris?",
            tools=[WEATHER],
            stream=True,
        )
        args, final = "", None
        async for event in stream:
            check_response_event(_dump(event))
            if event.type == "response.function_call_arguments.delta":
                args += event.delta
            if event.type == "response.completed":
                final = event.response
        assert final is not None and final.output[0].type == "function_call"
        assert final.output[0].arguments == args == '{"city":"test"}'
        await client.close()


async def test_openai_agents_sdk_default_model_runs_a_function_tool() -> None:
    """The Agents SDK's default model is the Responses API (OpenAIResponsesModel)."""
    import agents

    calls: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """Weather for a city."""
        calls.append(city)
        return f"sunny in {city}"

    async with stack(two_stage("agent", "agent")) as (url, fake, _):
        client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0)
        agents.set_tracing_disabled(True)
        provider = agents.OpenAIProvider(openai_client=client)  # its default: the Responses API
        model = provider.get_model("default")
        assert isinstance(model, agents.OpenAIResponsesModel)
        agent = agents.Agent(
            name="weather", instructions="Answer with the tool.", tools=[get_weather], model=model
        )
        result = await agents.Runner.run(agent, "Weather in Paris?")
        assert calls == ["test"]
        assert result.final_output == "The tool said: sunny in test"
        sent = fake.requests[-1]
        assert sent["body"]["messages"][0] == {"role": "system", "content": "Answer with the tool."}
        assert [m["role"] for m in sent["body"]["messages"]] == ["system", "user", "assistant", "tool"]

        streamed = agents.Runner.run_streamed(agent, "Weather in Paris?")
        async for _ in streamed.stream_events():
            pass
        assert streamed.final_output == "The tool said: sunny in test"
        await client.close()
