"""Shadow labelling: a share of early-accepted answers is re-asked of the last stage in the background;
the answers' agreement (or a judge) labels them; the spend is counted and capped per hour and as a
share of the answers' spend; every draw and skip is recorded on the trace."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from tests.conftest import base_config, chat, proxy, wait_for
from tests.fake_upstream import FakeUpstream
from tests.learning.learning_helpers import learning_of, query, settle, sqlite_url, with_learning

pytestmark = pytest.mark.anyio


def _cfg(url: str, last: str = "answer-Paris", **learning: Any) -> dict[str, Any]:
    cfg = base_config()
    cfg["upstreams"]["small"]["model"] = "answer-Paris"
    cfg["upstreams"]["large"]["model"] = last
    cfg["upstreams"]["london"] = {**cfg["upstreams"]["large"], "model": "answer-London"}
    cfg["cascades"]["other"] = {
        "stages": [dict(cfg["cascades"]["default"]["stages"][0]), {"upstream": "london"}]
    }
    # Free text ("Paris", "London") compared exactly, no cap relative to the answers' spend, unless a
    # test says otherwise.
    opts = {"shadow_rate": 1.0, "compare": "exact", "shadow_max_share": None, **learning}
    return with_learning(cfg, url, **opts)


def _labels(url: str) -> list[tuple[Any, ...]]:
    return query(
        url,
        "SELECT t.cascade, l.stage, l.source, l.value, l.weight, l.cost_usd > 0, l.detail FROM labels l "
        "JOIN traces t ON t.id = l.trace_id ORDER BY t.cascade",
    )


async def test_shadow_labels_good_and_bad_answers_after_the_reply(fake: FakeUpstream, tmp_path: Path) -> None:
    url = sqlite_url(tmp_path)
    reg = CollectorRegistry()
    cfg = _cfg(url, last="answer-Paris+gated")  # the shadow call answers when the test opens the gate
    async with proxy(cfg, fake, registry=reg) as (c, app):
        async with asyncio.timeout(10):  # a client that waited for the shadow call would never get here
            r1 = await c.post("/v1/chat/completions", json=chat())
        r2 = await c.post("/v1/chat/completions", json=chat("other"))
        assert r1.json()["cascade"]["stage"] == 0 and r2.json()["cascade"]["stage"] == 0
        await wait_for(lambda: fake.counts.get("answer-Paris+gated"), "the shadow call is sent")
        fake.gate.set()
        # The shadow call is not part of what the request cost.
        assert r1.json()["cascade"]["cost_usd"] == pytest.approx(
            r1.json()["cascade"]["attempts"][0]["cost_usd"]
        )
        await settle(app)
    assert _labels(url) == [
        ("default", 0, "shadow", 1.0, 1.0, True, "exact"),
        ("other", 0, "shadow", 0.0, 1.0, True, "exact"),
    ]
    assert query(url, "SELECT sampling FROM traces") == [("labelled",)] * 2
    assert (
        reg.get_sample_value(
            "cascade_cost_usd_total", {"cascade": "default", "upstream": "large", "purpose": "shadow"}
        )
        > 0
    )
    assert (
        reg.get_sample_value(
            "cascade_cost_usd_total", {"cascade": "other", "upstream": "london", "purpose": "shadow"}
        )
        > 0
    )
    assert reg.get_sample_value("cascade_labels_total", {"cascade": "other", "source": "shadow"}) == 1.0
    # Shadow calls go to the last stage only after the answer; the stage-0 call came first.
    models = [r["body"]["model"] for r in fake.requests]
    assert models[0] == "answer-Paris"


async def test_shadow_weight_is_the_inverse_sampling_rate(fake: FakeUpstream, tmp_path: Path) -> None:
    url = sqlite_url(tmp_path)
    draws = iter([0.1, 0.9, 0.3, 0.7])  # picked, not, picked, not (rate 0.5)
    async with proxy(_cfg(url, shadow_rate=0.5), fake) as (c, app):
        learning_of(app).shadow.rng = lambda: next(draws)
        for _ in range(4):
            await c.post("/v1/chat/completions", json=chat())
        await settle(app)
    assert [r[2:5] for r in _labels(url)] == [("shadow", 1.0, 2.0)] * 2


async def test_shadow_spend_is_capped_per_hour(fake: FakeUpstream, tmp_path: Path) -> None:
    url = sqlite_url(tmp_path)
    reg = CollectorRegistry()
    async with proxy(_cfg(url), fake) as (c, app):  # learn the cost of one shadow call
        baseline = (await c.post("/v1/chat/completions", json=chat())).json()["cascade"]["baseline_cost_usd"]
        await settle(app)
    url2 = sqlite_url(tmp_path / "capped")
    async with proxy(_cfg(url2, shadow_budget_usd_per_hour=baseline * 2.5), fake, registry=reg) as (c, app):
        for _ in range(5):
            assert (await c.post("/v1/chat/completions", json=chat())).status_code == 200
            await settle(app)
    assert len(_labels(url2)) == 2
    spent = reg.get_sample_value(
        "cascade_cost_usd_total", {"cascade": "default", "upstream": "large", "purpose": "shadow"}
    )
    assert spent == pytest.approx(2 * baseline)
    assert (
        reg.get_sample_value("cascade_shadow_skipped_total", {"cascade": "default", "reason": "budget"})
        == 3.0
    )


async def test_the_shadow_budget_is_shared_by_the_servers_workers(fake: FakeUpstream, tmp_path: Path) -> None:
    url = sqlite_url(tmp_path)
    async with proxy(_cfg(url), fake) as (c, app):  # learn the cost of one shadow call
        baseline = (await c.post("/v1/chat/completions", json=chat())).json()["cascade"]["baseline_cost_usd"]
        await settle(app)
    # 2.5 shadow calls an hour for the server; as one of its 2 workers, this process may spend 1.25.
    cfg = _cfg(sqlite_url(tmp_path / "workers"), shadow_budget_usd_per_hour=baseline * 2.5)
    cfg["server"]["workers"] = 2
    reg = CollectorRegistry()
    async with proxy(cfg, fake, registry=reg) as (c, app):
        for _ in range(5):
            assert (await c.post("/v1/chat/completions", json=chat())).status_code == 200
            await settle(app)
    spent = reg.get_sample_value(
        "cascade_cost_usd_total", {"cascade": "default", "upstream": "large", "purpose": "shadow"}
    )
    assert spent == pytest.approx(baseline)
    assert (
        reg.get_sample_value("cascade_shadow_skipped_total", {"cascade": "default", "reason": "budget"})
        == 4.0
    )


async def test_shadow_judge_decides_equivalence(fake: FakeUpstream, tmp_path: Path) -> None:
    url = sqlite_url(tmp_path)
    reg = CollectorRegistry()
    cfg = _cfg(url, shadow_judge="judge", compare="auto")  # the old key still works
    cfg["upstreams"]["judge"] = {**cfg["upstreams"]["small"], "model": "answer-Yes."}
    async with proxy(cfg, fake, registry=reg) as (c, app):
        await c.post("/v1/chat/completions", json=chat("other"))  # Paris vs London, but the judge says yes
        await settle(app)
    assert [r[2:4] + r[6:] for r in _labels(url)] == [("shadow", 1.0, "judge")]
    assert (
        reg.get_sample_value(
            "cascade_cost_usd_total", {"cascade": "other", "upstream": "judge", "purpose": "shadow"}
        )
        > 0
    )


async def test_no_shadow_for_answers_of_the_last_stage(fake: FakeUpstream, tmp_path: Path) -> None:
    url = sqlite_url(tmp_path)
    cfg = _cfg(url)
    cfg["upstreams"]["small"]["model"] = "refuse"  # escalates: labels are free, no shadow call
    async with proxy(cfg, fake) as (c, app):
        await c.post("/v1/chat/completions", json=chat())
        await settle(app)
    assert [r[2] for r in _labels(url)] == ["free"]
    assert len(fake.requests) == 2


async def test_draws_and_skips_are_recorded_on_each_trace(fake: FakeUpstream, tmp_path: Path) -> None:
    url = sqlite_url(tmp_path)
    reg = CollectorRegistry()
    draws = iter([0.1, 0.9, 0.1])  # drawn, not drawn, drawn (rate 0.5)
    async with proxy(_cfg(url, shadow_rate=0.5, shadow_max_in_flight=1), fake, registry=reg) as (c, app):
        shadow = learning_of(app).shadow
        shadow.rng = lambda: next(draws)
        ids = [(await c.post("/v1/chat/completions", json=chat())).json()["id"] for _ in range(2)]
        await settle(app)
        # One label call in flight fills shadow_max_in_flight: the next draw is skipped as busy.
        release = asyncio.Event()
        shadow._start(release.wait())
        ids.append((await c.post("/v1/chat/completions", json=chat())).json()["id"])
        release.set()
        await settle(app)
    got = dict(query(url, "SELECT id, sampling FROM traces"))
    assert [got[i] for i in ids] == ["labelled", "not_drawn", "busy"]
    assert reg.get_sample_value("cascade_labels_skipped_total", {"cascade": "default", "reason": "busy"}) == 1
    assert reg.get_sample_value("cascade_shadow_skipped_total", {"cascade": "default", "reason": "busy"}) == 1


async def test_shadow_spend_is_capped_as_a_share_of_the_answers_spend(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    """shadow_max_share: the last stage costs 100x stage 0 here, so at a share of 0.5 one shadow call
    needs ~200 early answers' spend first; after the first shadow_warmup calls every draw is skipped
    for the budget until then."""
    url = sqlite_url(tmp_path)
    reg = CollectorRegistry()
    async with proxy(_cfg(url, shadow_max_share=0.5, shadow_warmup=2), fake, registry=reg) as (c, app):
        for _ in range(5):
            assert (await c.post("/v1/chat/completions", json=chat())).status_code == 200
            await settle(app)
    assert len(_labels(url)) == 2
    assert [r[0] for r in query(url, "SELECT sampling FROM traces ORDER BY created")] == [
        "labelled",
        "labelled",
        "budget",
        "budget",
        "budget",
    ]
    skipped = {"cascade": "default", "reason": "budget"}
    assert reg.get_sample_value("cascade_shadow_skipped_total", skipped) == 3
