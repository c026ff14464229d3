"""Latency accounting: ``cascade.latency_ms`` / ``cascade.baseline_latency_ms`` (the last stage alone, from
its recent latency for answers of the same length) and ``cascade_latency_saved_seconds``."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from app.upstream.latency import MIN_SAMPLES, LatencyStats
from tests.conftest import chat, proxy, two_stage
from tests.fake_upstream import FakeUpstream

pytestmark = pytest.mark.anyio


def test_p95_needs_enough_samples_then_follows_the_window() -> None:
    s = LatencyStats()
    for _ in range(MIN_SAMPLES - 1):
        s.observe(0.1)
    assert s.p95() is None
    s.observe(0.1)
    assert s.p95() == pytest.approx(0.1)
    for _ in range(256):
        s.observe(2.0)
    assert s.p95() == pytest.approx(2.0)
    s.observe(float("nan"))
    s.observe(-1)
    assert s.p95() == pytest.approx(2.0)


def test_estimate_is_by_answer_length() -> None:
    s = LatencyStats()
    assert s.estimate(10) is None
    for _ in range(5):
        s.observe(0.2, 10)  # bucket 8-15 tokens
        s.observe(3.0, 500)  # bucket 256-511
    assert s.estimate(12) == pytest.approx(0.2)
    assert s.estimate(300) == pytest.approx(3.0)
    assert s.estimate(40) == pytest.approx(0.2)  # nearest bucket with data (32-63 -> 8-15 is nearer)
    assert s.estimate(100_000) == pytest.approx(3.0)


async def test_baseline_latency_and_latency_saved(fake: FakeUpstream) -> None:
    reg = CollectorRegistry()
    cfg = two_stage("answer-fine", "slow-50+answer-fine")
    cfg["upstreams"]["refuser"] = {**cfg["upstreams"]["small"], "model": "refuse"}
    cfg["cascades"]["esc"] = {
        "stages": [
            {"upstream": "refuser", "threshold": 0.7, "scorers": [{"type": "heuristic"}]},
            {"upstream": "large"},
        ]
    }
    async with proxy(cfg, fake, registry=reg) as (c, _):
        # Nothing observed of the last stage yet: no estimate, nothing counted.
        first = (await c.post("/v1/chat/completions", json=chat())).json()["cascade"]
        assert first["stage"] == 0 and first["baseline_latency_ms"] is None
        assert first["latency_ms"] >= 0
        assert reg.get_sample_value("cascade_latency_saved_seconds", {"cascade": "default"}) in (
            None,
            0.0,
        )
        # The last stage answers (escalated): its own call is its baseline, and it is observed.
        esc = (await c.post("/v1/chat/completions", json=chat("esc"))).json()["cascade"]
        assert esc["stage"] == 1
        assert esc["baseline_latency_ms"] == esc["attempts"][1]["latency_ms"]
        assert esc["baseline_latency_ms"] >= 50
        # Now a stage-0 answer of the same length gets the last stage's estimate as its baseline.
        r = (await c.post("/v1/chat/completions", json=chat())).json()["cascade"]
    assert r["stage"] == 0 and r["baseline_latency_ms"] >= 50
    saved = reg.get_sample_value("cascade_latency_saved_seconds", {"cascade": "default"})
    assert saved is not None and 0 < saved <= r["baseline_latency_ms"] / 1000
    # The escalated request took longer than its last stage alone: its saving is negative.
    assert reg.get_sample_value("cascade_latency_saved_seconds", {"cascade": "esc"}) < 0
