"""``fallback: best_rejected``: when the last stage fails, the best answer an earlier stage gave is served
(marked as a fallback) instead of a 502/504; without it, or without such an answer, the error stays."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from tests.conftest import chat, proxy, sse_events, two_stage
from tests.fake_upstream import FakeUpstream
from tests.schema import check_chunk, check_completion

pytestmark = pytest.mark.anyio

SCORE = {"type": "python", "class": "tests.learning.learning_helpers:PromptScore"}  # score= in the prompt


def cascade(last: str, *, fallback: str | None = "best_rejected", **extra: Any) -> dict[str, Any]:
    cfg = two_stage("answer-Paris", last, scorers=[SCORE])
    cfg["upstreams"]["mid"] = {**cfg["upstreams"]["small"], "model": "answer-Lyon"}
    cfg["cascades"]["default"]["stages"] = [
        {"upstream": "small", "threshold": 0.7, "scorers": [SCORE]},
        {"upstream": "mid", "threshold": 0.7, "scorers": [SCORE]},
        {"upstream": "large"},
    ]
    if fallback:
        cfg["cascades"]["default"]["fallback"] = fallback
    cfg["cascades"]["default"].update(extra)
    return cfg


def sample(reg: CollectorRegistry, name: str, **labels: str) -> float:
    return reg.get_sample_value(name, labels) or 0.0


async def test_a_failed_last_stage_serves_the_best_rejected_answer(fake: FakeUpstream) -> None:
    reg = CollectorRegistry()
    async with proxy(cascade("error-500"), fake, registry=reg) as (c, _):
        r = await c.post("/v1/chat/completions", json=chat(content="Capital of France? score=0.4"))
    assert r.status_code == 200
    body = r.json()
    check_completion(body)
    # Both earlier answers scored 0.4: the later (stronger) stage's answer wins the tie.
    assert body["choices"][0]["message"]["content"] == "Lyon"
    ext = body["cascade"]
    assert ext["fallback"] == "best_rejected" and ext["stage"] == 1 and ext["upstream"] == "mid"
    assert [(a["stage"], a["outcome"]) for a in ext["attempts"]] == [
        (0, "rejected"),
        (1, "accepted"),
        (2, "error"),
    ]
    assert ext["attempts"][1]["detail"].startswith("fallback: the last stage failed")
    assert r.headers["x-cascade-fallback"] == "best_rejected" and r.headers["x-cascade-stage"] == "1"
    assert sample(reg, "cascade_requests_total", cascade="default", outcome="success") == 1
    accepted = {"cascade": "default", "stage": "1", "upstream": "mid", "outcome": "accepted"}
    assert sample(reg, "cascade_attempts_total", **accepted) == 1
    assert (
        sample(reg, "cascade_attempts_total", cascade="default", stage="2", upstream="large", outcome="error")
        == 1
    )
    assert sample(reg, "cascade_fallbacks_total", cascade="default", upstream="mid") == 1


async def test_a_streamed_request_gets_the_fallback_as_a_stream(fake: FakeUpstream) -> None:
    async with proxy(cascade("error-503"), fake) as (c, _):
        r = await c.post("/v1/chat/completions", json=chat(content="score=0.5", stream=True))
    assert r.status_code == 200 and r.headers["x-cascade-fallback"] == "best_rejected"
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    for ch in chunks:
        check_chunk(ch)
    assert "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks if ch["choices"]) == "Lyon"
    assert chunks[-1]["cascade"]["fallback"] == "best_rejected"


async def test_the_deadline_passing_in_the_last_stage_serves_the_fallback(fake: FakeUpstream) -> None:
    async with proxy(cascade("slow-3000", deadline_s=0.5), fake) as (c, _):
        r = await c.post("/v1/chat/completions", json=chat(content="score=0.2"))
    assert r.status_code == 200
    ext = r.json()["cascade"]
    assert ext["fallback"] == "best_rejected" and ext["attempts"][-1]["reason"] == "timeout"


@pytest.mark.parametrize("stream", [False, True])
async def test_a_last_stage_that_cannot_fit_the_deadline_serves_the_fallback(
    fake: FakeUpstream, stream: bool
) -> None:
    """Skipped for lack of time before it started, or cut by the deadline mid-way: the same fallback."""
    cfg = cascade("answer-never_asked", deadline_s=30)
    cfg["upstreams"]["large"]["min_budget_s"] = 60  # never fits
    async with proxy(cfg, fake) as (c, _):
        r = await c.post("/v1/chat/completions", json=chat(content="score=0.3", stream=stream))
    assert r.status_code == 200 and r.headers["x-cascade-fallback"] == "best_rejected"
    ext = sse_events(r.text)[-2]["cascade"] if stream else r.json()["cascade"]
    assert ext["fallback"] == "best_rejected" and ext["upstream"] == "mid"
    last = ext["attempts"][-1]
    assert (last["outcome"], last["reason"]) == ("error", "timeout")
    assert last["detail"].startswith("not started")
    assert "answer-never_asked" not in fake.counts


async def test_without_the_option_or_an_earlier_answer_the_error_stays(fake: FakeUpstream) -> None:
    reg = CollectorRegistry()
    async with proxy(cascade("error-500", fallback=None), fake, registry=reg) as (c, _):
        plain = await c.post("/v1/chat/completions", json=chat(content="score=0.4"))
    assert sample(reg, "cascade_fallbacks_total", cascade="default", upstream="mid") == 0
    cfg = cascade("error-500")
    cfg["upstreams"]["small"]["model"] = "error-500"
    cfg["upstreams"]["mid"]["model"] = "error-502"
    async with proxy(cfg, fake) as (c, _):
        nothing = await c.post("/v1/chat/completions", json=chat(content="score=0.4"))
    async with proxy(cascade("slow-3000", fallback=None, deadline_s=0.5), fake) as (c, _):
        late = await c.post("/v1/chat/completions", json=chat(content="score=0.4"))
    assert plain.status_code == 502 and "x-cascade-fallback" not in plain.headers
    assert nothing.status_code == 502
    assert late.status_code == 504
