"""Shadow labelling: a share of early-accepted answers is re-asked of the last stage in the background;
the answers' agreement (or a judge) labels them; the spend is counted and capped per hour and as a
share of the answers' spend; every draw and skip is recorded on the trace."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from app.upstream.breaker import OPEN
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


async def test_a_shadow_call_also_asks_the_middle_stages_and_records_their_scores(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    """Three stages, the first accepts: the shadow call asks the last stage for the reference and the
    middle one for what it would have answered; the middle answer is scored by its stage's scorers,
    stored as a ``shadow`` attempt with its score and labelled, so the fit sees a real score there
    instead of a filled-in guess. Its cost is shadow spend, not the request's."""
    from app.config import parse_config
    from app.learning.calibration import ALWAYS, assemble
    from app.learning.records import plan_fingerprint

    url = sqlite_url(tmp_path)
    reg = CollectorRegistry()
    cfg = _cfg(url)
    cfg["upstreams"]["mid"] = {
        **cfg["upstreams"]["large"],
        "model": "answer-London",
        "price": {"input": 1.0, "output": 2.0},
    }
    cfg["cascades"]["default"]["stages"] = [
        dict(cfg["cascades"]["default"]["stages"][0]),
        {"upstream": "mid", "threshold": 0.7, "scorers": [{"type": "heuristic"}]},
        {"upstream": "large"},
    ]
    async with proxy(cfg, fake, registry=reg) as (c, app):
        r = await c.post("/v1/chat/completions", json=chat())
        assert r.json()["cascade"]["stage"] == 0
        assert [a["stage"] for a in r.json()["cascade"]["attempts"]] == [0]  # the client's request: one call
        await settle(app)
        fp = plan_fingerprint(parse_config(cfg, env={}), parse_config(cfg, env={}).cascades["default"])
        data = await learning_of(app).store.labelled("default", fp)
    rows = query(
        url, "SELECT stage, upstream, outcome, score IS NOT NULL, cost_usd > 0 FROM attempts ORDER BY stage"
    )
    assert rows == [(0, "small", "accepted", 1, 1), (1, "mid", "shadow", 1, 1)]
    assert [(s, src, v) for _, s, src, v, *_ in _labels(url)] == [(0, "shadow", 1.0), (1, "shadow", 0.0)]
    assert (
        reg.get_sample_value(
            "cascade_cost_usd_total", {"cascade": "default", "upstream": "mid", "purpose": "shadow"}
        )
        > 0
    )
    fitted = assemble(data, 3)
    assert fitted.n == 1
    assert fitted.scores[0, 1] < ALWAYS and fitted.correct[0, 1] == 0.0  # real, not filled in
    mid_cost = query(url, "SELECT cost_usd FROM attempts WHERE stage = 1")[0][0]
    assert fitted.cost[0, 1] == pytest.approx(mid_cost)
    # The last stage's cost on the row is the reference call's alone, not the middle call's too.
    label_cost = query(url, "SELECT sum(cost_usd) FROM labels")[0][0]
    assert fitted.cost[0, 2] == pytest.approx(label_cost)


async def test_shadow_middle_off_asks_the_last_stage_only(fake: FakeUpstream, tmp_path: Path) -> None:
    url = sqlite_url(tmp_path)
    cfg = _cfg(url, shadow_middle=False)
    cfg["upstreams"]["mid"] = {**cfg["upstreams"]["large"], "model": "answer-London"}
    cfg["cascades"]["default"]["stages"] = [
        dict(cfg["cascades"]["default"]["stages"][0]),
        {"upstream": "mid", "threshold": 0.7, "scorers": [{"type": "heuristic"}]},
        {"upstream": "large"},
    ]
    async with proxy(cfg, fake) as (c, app):
        r = await c.post("/v1/chat/completions", json=chat())
        assert r.json()["cascade"]["stage"] == 0
        await settle(app)
    assert query(url, "SELECT stage, outcome FROM attempts") == [(0, "accepted")]
    assert fake.counts.get("answer-London") is None


async def test_a_judge_that_fails_after_the_shadow_call_is_no_shadow_skip(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    """The shadow call was made and paid for; only the judge after it failed. It was counted in
    ``cascade_shadow_skipped_total{reason="upstream_error"}`` ("picked but not made") all the same."""
    url = sqlite_url(tmp_path)
    reg = CollectorRegistry()
    cfg = _cfg(url, judge="judge", compare="auto")
    cfg["upstreams"]["judge"] = {**cfg["upstreams"]["small"], "model": "error-500", "max_retries": 0}
    async with proxy(cfg, fake, registry=reg) as (c, app):
        await c.post("/v1/chat/completions", json=chat("other"))  # Paris vs London: the judge is asked
        await settle(app)
    labels = {"cascade": "other", "reason": "upstream_error"}
    assert reg.get_sample_value("cascade_labels_skipped_total", labels) == 1  # no label came
    assert reg.get_sample_value("cascade_shadow_skipped_total", labels) is None  # but the call was made
    spent = {"cascade": "other", "upstream": "london", "purpose": "shadow"}
    assert reg.get_sample_value("cascade_cost_usd_total", spent) > 0


async def test_a_shadow_call_that_fails_is_a_recorded_skip_and_no_label(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    """The last stage refuses the shadow call (HTTP 500, no retries): no label, the trace says why, and
    both counters name the reason ("picked but not made"; no label came)."""
    url = sqlite_url(tmp_path)
    reg = CollectorRegistry()
    cfg = _cfg(url, last="error-500")
    cfg["upstreams"]["large"].update(max_retries=0, circuit=False)
    async with proxy(cfg, fake, registry=reg) as (c, app):
        r = await c.post("/v1/chat/completions", json=chat())
        assert r.status_code == 200 and r.json()["cascade"]["stage"] == 0
        await settle(app)
    assert fake.counts.get("error-500") == 1 and _labels(url) == []
    assert query(url, "SELECT sampling FROM traces") == [("upstream_error",)]
    why = {"cascade": "default", "reason": "upstream_error"}
    assert reg.get_sample_value("cascade_shadow_skipped_total", why) == 1
    assert reg.get_sample_value("cascade_labels_skipped_total", why) == 1


async def test_a_shadow_call_is_not_made_while_the_last_stage_circuit_is_open(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    url = sqlite_url(tmp_path)
    reg = CollectorRegistry()
    async with proxy(_cfg(url), fake, registry=reg) as (c, app):
        app.state.cascade.runtime.upstreams["large"].breaker._set(OPEN)  # the last stage is failing
        r = await c.post("/v1/chat/completions", json=chat())
        assert r.status_code == 200 and r.json()["cascade"]["stage"] == 0
        await settle(app)
    assert fake.counts.get("answer-Paris") == 1  # the answer; no shadow call
    assert query(url, "SELECT sampling FROM traces") == [("circuit_open",)]
    why = {"cascade": "default", "reason": "circuit_open"}
    assert reg.get_sample_value("cascade_shadow_skipped_total", why) == 1
