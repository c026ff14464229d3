"""Hedged escalation (``stages[i].hedge_after_s``): a stage that has not answered after that long gets the
next stage started beside it; whichever is not needed is cancelled and charged what it generated.

The slow first stage is the fake's ``gated`` model: it answers only when the test opens the gate, so
which side wins each race is decided by the test, never by a clock.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from app.cascade.hedge import _LIVE
from app.config import ConfigError, parse_config
from tests.conftest import chat, loopback_stack, proxy, sse_events, two_stage, wait_for
from tests.fake_upstream import FakeUpstream
from tests.schema import check_chunk, check_completion

pytestmark = pytest.mark.anyio

LARGE = "answer-large_says_hi"


def hedged(first: str, last: str = LARGE, after: Any = 0.05) -> dict[str, Any]:
    return two_stage(first, last, hedge_after_s=after)


def sample(reg: CollectorRegistry, name: str, **labels: str) -> float:
    return reg.get_sample_value(name, labels) or 0.0


async def test_a_slow_first_stage_is_raced_and_the_hedge_answers(fake: FakeUpstream) -> None:
    reg = CollectorRegistry()
    async with proxy(hedged("gated+answer-small"), fake, registry=reg) as (c, _):
        r = await c.post("/v1/chat/completions", json=chat())
        await wait_for(lambda: not _LIVE, "the cancelled stage's call ended")
    assert r.status_code == 200, r.text
    body = r.json()
    check_completion(body)
    assert body["choices"][0]["message"]["content"] == "large says hi"
    ext = body["cascade"]
    assert ext["hedged"] is True and ext["stage"] == 1 and ext["escalations"] == 1
    first, second = ext["attempts"]
    assert (first["stage"], first["outcome"], first["reason"]) == (0, "cancelled", "hedge")
    assert (second["stage"], second["outcome"], second["hedge"]) == (1, "accepted", "won")
    # The cancelled call is charged: it had sent no token, so its (estimated) prompt.
    assert first["cost_usd"] > 0 and first["usage_estimated"] is True
    assert ext["cost_usd"] == pytest.approx(first["cost_usd"] + second["cost_usd"])
    assert r.headers["x-cascade-stage"] == "1"
    assert sample(reg, "cascade_hedges_total", cascade="default", stage="1", result="won") == 1
    assert (
        sample(
            reg, "cascade_attempts_total", cascade="default", stage="0", upstream="small", outcome="cancelled"
        )
        == 1
    )
    assert (
        sample(
            reg,
            "cascade_escalations_total",
            cascade="default",
            from_upstream="small",
            to_upstream="large",
            reason="hedge",
        )
        == 1
    )
    # Hedged stages are called streamed upstream (so a cancel knows what they generated).
    assert all(q["body"].get("stream") is True for q in fake.requests)


async def test_a_fast_first_stage_makes_no_second_call(fake: FakeUpstream) -> None:
    reg = CollectorRegistry()
    async with proxy(hedged("answer-small_is_fine", after=30), fake, registry=reg) as (c, _):
        for _ in range(3):
            r = await c.post("/v1/chat/completions", json=chat())
            assert r.status_code == 200 and r.json()["cascade"]["stage"] == 0
            assert "hedged" not in r.json()["cascade"]
    assert LARGE not in fake.counts
    assert sample(reg, "cascade_hedges_total", cascade="default", stage="1", result="won") == 0


async def test_the_first_stage_accepted_after_the_hedge_started_cancels_the_hedge(fake: FakeUpstream) -> None:
    reg = CollectorRegistry()
    async with proxy(hedged("gated+answer-small_is_fine", "slow-20000+" + LARGE), fake, registry=reg) as (
        c,
        _,
    ):
        task = asyncio.ensure_future(c.post("/v1/chat/completions", json=chat()))
        await wait_for(lambda: fake.counts.get("slow-20000+" + LARGE) == 1, "the hedge started")
        fake.gate.set()
        r = await task
        await wait_for(lambda: not _LIVE, "the hedge's call ended")
    assert r.status_code == 200, r.text
    ext = r.json()["cascade"]
    assert ext["hedged"] is True and ext["stage"] == 0 and ext["escalations"] == 0
    first, second = ext["attempts"]
    assert first["outcome"] == "accepted"
    assert (second["outcome"], second["reason"], second["hedge"]) == ("cancelled", "hedge_lost", "lost")
    assert second["cost_usd"] > 0  # charged what it generated (here: its prompt)
    assert r.headers["x-cascade-stage"] == "0"
    assert sample(reg, "cascade_hedges_total", cascade="default", stage="1", result="lost") == 1


async def test_a_rejected_first_stage_goes_on_to_the_running_hedge(fake: FakeUpstream) -> None:
    reg = CollectorRegistry()
    async with proxy(hedged("gated+refuse", "gated+" + LARGE), fake, registry=reg) as (c, _):
        task = asyncio.ensure_future(c.post("/v1/chat/completions", json=chat()))
        await wait_for(lambda: fake.counts.get("gated+" + LARGE) == 1, "the hedge started")
        fake.gate.set()  # both answer; the refusal is rejected, the hedge's answer is served
        r = await task
    assert r.status_code == 200, r.text
    ext = r.json()["cascade"]
    assert [(a["outcome"], a.get("hedge")) for a in ext["attempts"]] == [
        ("rejected", None),
        ("accepted", "won"),
    ]
    assert fake.counts["gated+" + LARGE] == 1  # not asked twice
    assert sample(reg, "cascade_hedges_total", cascade="default", stage="1", result="won") == 1


async def test_streaming_client_gets_the_hedged_last_stage_streamed_through(fake: FakeUpstream) -> None:
    cfg = hedged("gated+answer-small", "chunkdelay-5+" + LARGE)
    async with proxy(cfg, fake) as (c, _):
        r = await c.post("/v1/chat/completions", json=chat(stream=True))
        await wait_for(lambda: not _LIVE, "the cancelled stage's call ended")
    assert r.status_code == 200
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    for ch in chunks:
        check_chunk(ch)
    text = "".join((ch["choices"][0]["delta"].get("content") or "") for ch in chunks if ch.get("choices"))
    assert text == "large says hi"
    ext = chunks[-1]["cascade"]
    assert ext["hedged"] is True and ext["stage"] == 1
    assert [(a["outcome"], a["reason"]) for a in ext["attempts"]] == [
        ("cancelled", "hedge"),
        ("accepted", "accepted"),
    ]
    assert r.headers["x-cascade-stage"] == "1"


async def test_p95_hedges_after_the_upstreams_observed_latency(fake: FakeUpstream) -> None:
    reg = CollectorRegistry()
    async with proxy(hedged("gated+answer-small", after="p95"), fake, registry=reg) as (c, app):
        # No observations yet: a p95 stage does not hedge; the gate lets the first stage answer.
        fake.gate.set()
        r = await c.post("/v1/chat/completions", json=chat())
        assert "hedged" not in r.json()["cascade"]
        assert LARGE not in fake.counts
        fake.gate.clear()
        stats = app.state.cascade.runtime.upstreams["small"].latency
        for _ in range(30):
            stats.observe(0.01)
        assert stats.p95() == pytest.approx(0.01)
        r = await c.post("/v1/chat/completions", json=chat())
    assert r.json()["cascade"]["hedged"] is True
    assert r.json()["cascade"]["stage"] == 1


async def test_the_deadline_cancels_both_calls_of_a_hedged_stage(fake: FakeUpstream) -> None:
    cfg = hedged("gated", "gated")
    cfg["cascades"]["default"]["deadline_s"] = 0.5
    async with proxy(cfg, fake) as (c, _):
        r = await c.post("/v1/chat/completions", json=chat())
        await wait_for(lambda: not _LIVE, "both calls ended")
    assert r.status_code == 504
    assert "stage 0 (small): timeout" in r.json()["error"]["message"]
    assert "stage 1 (large): timeout" in r.json()["error"]["message"]


async def test_over_real_sockets_the_cancelled_call_is_closed_upstream() -> None:
    cfg = hedged("slow-20000+answer-small")
    async with loopback_stack(cfg) as (url, fake, _), httpx.AsyncClient(base_url=url, timeout=30) as c:
        r = await c.post("/chat/completions", json=chat())
        assert r.status_code == 200 and r.json()["cascade"]["stage"] == 1
        # The fake sees the cancelled stage's client leave while it was still waiting to answer.
        await wait_for(lambda: fake.cancelled_streams == 1, "the cancelled call closed upstream")


def test_hedge_config_is_checked() -> None:
    cfg = two_stage("ok")
    cfg["cascades"]["default"]["stages"][1]["hedge_after_s"] = 1
    with pytest.raises(ConfigError) as err:
        parse_config(cfg, env={})
    assert "cascades.default.stages[1].hedge_after_s: the last stage has no next stage" in str(err.value)
    for bad in (-1, "p50", True):
        with pytest.raises(ConfigError) as err:
            parse_config(two_stage("ok", hedge_after_s=bad), env={})
        assert "cascades.default.stages[0].hedge_after_s" in str(err.value)
    assert (
        parse_config(two_stage("ok", hedge_after_s="p95"), env={}).cascades["default"].stages[0].hedge_after_s
        == "p95"
    )
