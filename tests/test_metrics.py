"""Prometheus metrics: names, labels, and sums that match the per-request figures exactly."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from app.config import parse_config
from app.main import create_app
from tests.conftest import Router, base_config, chat, proxy, sse_events, upstream
from tests.fake_upstream import FakeUpstream

pytestmark = pytest.mark.anyio

CONTRACT = {
    "cascade_requests": ("counter", {"cascade", "outcome"}),
    "cascade_attempts": ("counter", {"cascade", "stage", "upstream", "outcome"}),
    "cascade_escalations": ("counter", {"cascade", "from_upstream", "to_upstream", "reason"}),
    "cascade_cost_usd": ("counter", {"cascade", "upstream", "purpose"}),
    "cascade_baseline_cost_usd": ("counter", {"cascade"}),
    "cascade_tokens": ("counter", {"upstream", "kind"}),
    "cascade_score": ("histogram", {"cascade", "stage", "scorer"}),
    "cascade_request_duration_seconds": ("histogram", {"cascade", "stream"}),
    "cascade_time_to_first_token_seconds": ("histogram", {"cascade"}),
    "cascade_upstream_duration_seconds": ("histogram", {"upstream"}),
    "cascade_upstream_errors": ("counter", {"upstream", "kind"}),
    "cascade_threshold": ("gauge", {"cascade", "stage"}),
    "cascade_in_flight_requests": ("gauge", set()),
}


def _mix_config() -> dict[str, Any]:
    cfg = base_config()
    cfg["upstreams"]["refuser"] = upstream("refuse", price={"input": 0.5, "output": 1.5})
    cfg["upstreams"]["broken"] = upstream("error-500", price={"input": 0.5, "output": 1.5}, max_retries=0)
    cfg["cascades"]["refusing"] = {
        "stages": [
            {"upstream": "refuser", "threshold": 0.7, "scorers": [{"type": "heuristic"}]},
            {"upstream": "large"},
        ]
    }
    cfg["cascades"]["failing"] = {
        "stages": [
            {"upstream": "broken", "threshold": 0.7, "scorers": [{"type": "heuristic"}]},
            {"upstream": "large"},
        ]
    }
    return cfg


async def test_metric_names_types_and_labels_follow_the_contract(fake: FakeUpstream) -> None:
    async with proxy(_mix_config(), fake) as (c, _):
        for model in ("default", "refusing", "failing"):
            await c.post("/v1/chat/completions", json=chat(model))
            await c.post("/v1/chat/completions", json=chat(model, stream=True))
        text = (await c.get("/metrics")).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name, (kind, labels) in CONTRACT.items():
        assert name in families, name
        fam = families[name]
        assert fam.type == kind, name
        for s in fam.samples:
            got = set(s.labels) - {"le"}
            assert got == labels, (name, got)


async def test_counters_add_up_to_the_cent(fake: FakeUpstream) -> None:
    registry = CollectorRegistry()
    bodies: list[dict[str, Any]] = []
    async with proxy(_mix_config(), fake, registry=registry) as (c, _):
        for model in ("default", "default", "refusing", "failing", "large"):
            r = await c.post("/v1/chat/completions", json=chat(model))
            bodies.append(r.json())
        for model in ("default", "refusing"):
            r = await c.post("/v1/chat/completions", json=chat(model, stream=True))
            bodies.append(sse_events(r.text)[-2])
    get = registry.get_sample_value

    # cost per (cascade, upstream): the sum of the attempts' cost_usd shown in the bodies
    expected: dict[tuple[str, str], float] = {}
    baseline: dict[str, float] = {}
    for b in bodies:
        ext = b["cascade"]
        baseline[ext["cascade"]] = baseline.get(ext["cascade"], 0) + ext["baseline_cost_usd"]
        for a in ext["attempts"]:
            key = (ext["cascade"], a["upstream"])
            expected[key] = expected.get(key, 0) + a["cost_usd"]
    for (cascade, up), usd in expected.items():
        got = get("cascade_cost_usd_total", {"cascade": cascade, "upstream": up, "purpose": "answer"}) or 0.0
        assert got == pytest.approx(usd, abs=1e-12), (cascade, up)
    for cascade, usd in baseline.items():
        assert get("cascade_baseline_cost_usd_total", {"cascade": cascade}) == pytest.approx(usd, abs=1e-12)

    assert get("cascade_requests_total", {"cascade": "default", "outcome": "success"}) == 3
    assert get("cascade_requests_total", {"cascade": "refusing", "outcome": "success"}) == 2
    assert get("cascade_requests_total", {"cascade": "failing", "outcome": "success"}) == 1
    assert get("cascade_requests_total", {"cascade": "large", "outcome": "success"}) == 1
    assert (
        get(
            "cascade_attempts_total",
            {"cascade": "refusing", "stage": "0", "upstream": "refuser", "outcome": "rejected"},
        )
        == 2
    )
    assert (
        get(
            "cascade_attempts_total",
            {"cascade": "refusing", "stage": "1", "upstream": "large", "outcome": "accepted"},
        )
        == 2
    )
    assert (
        get(
            "cascade_attempts_total",
            {"cascade": "failing", "stage": "0", "upstream": "broken", "outcome": "error"},
        )
        == 1
    )
    esc = {"cascade": "refusing", "from_upstream": "refuser", "to_upstream": "large", "reason": "low_score"}
    assert get("cascade_escalations_total", esc) == 2
    esc = {
        "cascade": "failing",
        "from_upstream": "broken",
        "to_upstream": "large",
        "reason": "upstream_error",
    }
    assert get("cascade_escalations_total", esc) == 1
    assert get("cascade_upstream_errors_total", {"upstream": "broken", "kind": "status_5xx"}) == 1
    assert get("cascade_score_count", {"cascade": "refusing", "stage": "0", "scorer": "heuristic"}) == 2
    assert get("cascade_score_sum", {"cascade": "refusing", "stage": "0", "scorer": "heuristic"}) == 0
    assert get("cascade_threshold", {"cascade": "default", "stage": "0"}) == 0.7
    assert get("cascade_in_flight_requests") == 0
    assert get("cascade_request_duration_seconds_count", {"cascade": "default", "stream": "true"}) == 1
    assert get("cascade_time_to_first_token_seconds_count", {"cascade": "refusing"}) == 1
    # tokens: every attempt's usage, by upstream
    prompt = sum(7 for b in bodies for a in b["cascade"]["attempts"] if a["upstream"] == "large")
    assert get("cascade_tokens_total", {"upstream": "large", "kind": "prompt"}) == prompt


async def test_multiprocess_metrics_are_collected_off_the_event_loop(
    fake: FakeUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``--workers N`` a scrape reads every worker's metric files: in a thread, not on the loop."""
    from prometheus_client import multiprocess

    read_on: list[int] = []
    collect = multiprocess.MultiProcessCollector.collect

    def noting(self: Any) -> Any:
        read_on.append(threading.get_ident())
        return collect(self)

    monkeypatch.setattr(multiprocess.MultiProcessCollector, "collect", noting)
    config = parse_config(base_config(), env={})
    app = create_app(config, transport=Router({"fake.local": fake}), multiprocess_dir=str(tmp_path))
    async with (
        LifespanManager(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://proxy") as c,
    ):
        r = await c.get("/metrics")
    assert r.status_code == 200
    assert read_on and threading.get_ident() not in read_on
