"""learning.auto_tune: thresholds re-fit online from labels, within the guard rails, applied without a
restart, exported as cascade_threshold, logged, and kept across a restart."""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from app.config import load_config
from app.learning.calibration import assemble, fit
from app.learning.store import Store
from tests.conftest import base_config, chat, proxy, wait_for
from tests.fake_upstream import FakeUpstream
from tests.learning.learning_helpers import learning_of, query, sqlite_url, synthetic, with_learning

pytestmark = pytest.mark.anyio


def _cfg(url: str, **learning: Any) -> dict[str, Any]:
    opts = {
        "auto_tune": True,
        "target_quality": 0.9,
        "tune_every": 10,
        "min_labels": 50,
        "max_step": 0.05,
        "threshold_bounds": [0.05, 0.99],
        "sync_every_s": 0.05,
        **learning,
    }
    return with_learning(base_config(), url, **opts)


async def _populate(url: str, cfg: dict[str, Any], n: int = 400) -> list[str]:
    s = Store(url)
    await s.open()
    traces, labels = synthetic(cfg, n)
    await s.write(traces, labels)
    await s.close()
    return [t.id for t in traces]


async def _until(app: FastAPI, value: float) -> None:
    plan = app.state.cascade.runtime.plans.get("default")
    await wait_for(lambda: plan.thresholds[0] == pytest.approx(value), f"threshold {value}")


def _count_syncs(app: FastAPI, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the tuner's looks at the store for new labels (one per cascade per sync round), so a test
    can wait for rounds to pass instead of sleeping and hoping one did."""
    store = learning_of(app).store
    looks: list[int] = []
    real = store.labels_after

    async def counted(cascade: str, plan: str, after_id: int, limit: int) -> Any:
        out = await real(cascade, plan, after_id, limit)
        looks.append(1)
        return out

    monkeypatch.setattr(store, "labels_after", counted)
    return looks


def _gauge(app: FastAPI) -> float | None:
    return app.state.cascade.metrics.registry.get_sample_value(
        "cascade_threshold", {"cascade": "default", "stage": "0"}
    )  # type: ignore[no-any-return]


async def test_auto_tune_moves_thresholds_within_guard_rails_and_survives_restart(
    fake: FakeUpstream, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = sqlite_url(tmp_path)
    cfg = _cfg(url)
    ids = await _populate(url, cfg)
    caplog.set_level(logging.INFO, logger="cascade.learning")
    async with proxy(cfg, fake) as (c, app):
        # The fit wants ~0.39 for quality 0.9; one update moves at most max_step from the config's 0.7.
        await _until(app, 0.65)
        assert _gauge(app) == pytest.approx(0.65)
        r = await c.post("/v1/chat/completions", json=chat())
        assert r.json()["cascade"]["attempts"][0]["threshold"] == pytest.approx(0.65)
        looks = _count_syncs(app, monkeypatch)
        await wait_for(lambda: len(looks) >= 3, "three more sync rounds")
        assert query(url, "SELECT count(*) FROM fits") == [(1,)]  # no new labels: no new fit
        # tune_every (10) new labels: the next step.
        for tid in ids[:10]:
            assert (await c.post("/v1/feedback", json={"id": tid, "score": 1.0})).status_code == 200
        await _until(app, 0.60)
        assert _gauge(app) == pytest.approx(0.60)
    fits = query(url, "SELECT version, thresholds, feasible, n_rows FROM fits ORDER BY version")
    assert [(v, t) for v, t, *_ in fits] == [(1, "[0.65]"), (2, "[0.6]")]
    changes = [r for r in caplog.records if r.getMessage() == "thresholds changed"]
    assert len(changes) == 2
    first: Any = changes[0]
    assert first.before == [0.7] and first.after == [0.65] and first.cascade == "default"
    assert first.rows >= 50 and first.proposed[0] < 0.5 and first.labels_by_source and first.est_quality > 0
    # A restart starts from the stored fit, before any request and any new label.
    async with proxy(cfg, fake) as (c, app):
        assert app.state.cascade.runtime.plans.get("default").thresholds[0] == pytest.approx(0.60)
        assert _gauge(app) == pytest.approx(0.60)
        r = await c.post("/v1/chat/completions", json=chat())
        assert r.json()["cascade"]["attempts"][0]["threshold"] == pytest.approx(0.60)
        assert learning_of(app)._meta["default"].fit_version == 2


def _tuner_series(text: str) -> dict[tuple[str, ...], float]:
    """The ``cascade_tuner_*`` samples of a /metrics page: (name, cascade[, stage]) -> value."""
    out: dict[tuple[str, ...], float] = {}
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            if smp.name.startswith("cascade_tuner_"):
                out[(smp.name, *(smp.labels[k] for k in sorted(smp.labels)))] = smp.value
    return out


async def test_the_fit_in_force_is_exported_and_a_reload_that_changes_the_cascade_drops_it(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    """What the fit in force rests on is on /metrics (``cascade_tuner_*``): its estimated quality, the
    target it aimed at, the effective labels behind each scored stage's answers, and when it was made;
    the same after a restart, before any label; gone when a reload changes the cascade it was fitted
    for, kept when a reload leaves it as it was."""
    url = sqlite_url(tmp_path)
    cfg = _cfg(url)
    await _populate(url, cfg)
    async with proxy(cfg, fake) as (c, app):
        await _until(app, 0.65)
        seen = _tuner_series((await c.get("/metrics")).text)
    [(quality, evidence, created)] = query(url, "SELECT quality, evidence, created FROM fits")
    labels = json.loads(evidence)["effective_labels"]
    assert set(labels) == {"0"} and labels["0"] > 0
    expected = {
        ("cascade_tuner_estimated_quality", "default"): pytest.approx(quality),
        ("cascade_tuner_target_quality", "default"): 0.9,
        ("cascade_tuner_effective_labels", "default", "0"): pytest.approx(labels["0"]),
        ("cascade_tuner_fit_timestamp_seconds", "default"): pytest.approx(created),
    }
    assert seen == expected
    path = tmp_path / "config.yaml"
    async with proxy(cfg, fake) as (c, app):
        assert _tuner_series((await c.get("/metrics")).text) == expected  # a restart: the stored fit
        app.state.cascade.loader = lambda: load_config(path, env={})
        path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
        await app.state.cascade.reload()  # the same cascade: its fit stays in force
        assert _tuner_series((await c.get("/metrics")).text) == expected
        changed = copy.deepcopy(cfg)
        changed["cascades"]["default"]["stages"][0]["scorers"].append({"type": "logprob"})
        path.write_text(yaml.safe_dump(changed), encoding="utf-8")
        await app.state.cascade.reload()  # another scorer: another cascade, no fit for it yet
        assert _tuner_series((await c.get("/metrics")).text) == {}
        assert app.state.cascade.runtime.plans.get("default").thresholds[0] == 0.7


async def test_no_tuning_below_min_labels(
    fake: FakeUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = sqlite_url(tmp_path)
    cfg = _cfg(url, min_labels=5000)
    await _populate(url, cfg, 100)
    async with proxy(cfg, fake) as (_, app):
        looks = _count_syncs(app, monkeypatch)
        await wait_for(lambda: len(looks) >= 3, "three sync rounds")
        assert app.state.cascade.runtime.plans.get("default").thresholds[0] == 0.7
    assert query(url, "SELECT count(*) FROM fits") == [(0,)]


async def test_the_label_that_completes_min_labels_starts_tuning(
    fake: FakeUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A look that finds too few labelled requests must not wait for ``tune_every`` more labels: the
    next one may complete them (a shadow call labels every early stage, so labels outrun requests).
    Seen on a loose start: 20 labelled requests by request 172, the first fit at request 585."""
    url = sqlite_url(tmp_path)
    probe = _cfg(url)
    traces, labels = synthetic(probe, 120)
    labelled = {lb.trace_id for lb in labels}
    cfg = _cfg(url, min_labels=len(labelled) + 1, tune_every=len(labels) // 2)
    s = Store(url)
    await s.open()
    await s.write(traces, labels)
    await s.close()
    async with proxy(cfg, fake) as (c, app):
        looks = _count_syncs(app, monkeypatch)
        await wait_for(lambda: len(looks) >= 2, "two sync rounds")
        assert query(url, "SELECT count(*) FROM fits") == [(0,)]  # one labelled request short
        spare = next(t.id for t in traces if t.id not in labelled)
        assert (await c.post("/v1/feedback", json={"id": spare, "score": 1.0})).status_code == 200
        await wait_for(lambda: query(url, "SELECT count(*) FROM fits") == [(1,)], "a fit after one label")
        ((stored,),) = query(url, "SELECT thresholds FROM fits")
        plan = app.state.cascade.runtime.plans.get("default")
        await wait_for(lambda: list(plan.thresholds[:-1]) == json.loads(stored), "the fit in force")


async def test_the_fit_is_deterministic(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path)
    cfg = _cfg(url)
    await _populate(url, cfg)
    s = Store(url)
    await s.open()
    from app.config import parse_config
    from app.learning.records import plan_fingerprint

    config = parse_config(cfg, env={})
    fp = plan_fingerprint(config, config.cascades["default"])
    a = fit(assemble(await s.labelled("default", fp), 2), 0.9, bounds=(0.05, 0.99))
    b = fit(assemble(await s.labelled("default", fp), 2), 0.9, bounds=(0.05, 0.99))
    await s.close()
    assert a.thresholds == b.thresholds and a.chosen == b.chosen
    assert a.search.feasible and a.chosen.quality - a.chosen.quality_se >= 0.9 - 0.02


def _capped(url: str) -> dict[str, Any]:
    """Stage 0 scored by the number in the prompt (threshold 0.1), every shadow call drawn and every one
    ruled out by shadow_max_share (no warm-up calls)."""
    from tests.learning.learning_helpers import PromptScore  # noqa: F401 (the scorer the config names)

    cfg = _cfg(url, shadow_rate=1.0, shadow_max_share=0.0001, shadow_warmup=0, tune_every=1000)
    cfg["cascades"]["default"]["stages"][0].update(
        threshold=0.1, scorers=[{"type": "python", "class": "tests.learning.learning_helpers:PromptScore"}]
    )
    return cfg


async def test_a_stage_the_spend_caps_starve_of_labels_keeps_its_threshold(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    """Every answer accepted at stage 0 and not one shadow call affordable (shadow_max_share): the caps
    are the operator's choice, not stale evidence. With no label at all (none may ever come: free-form
    answers and no judge) the tuner does not escalate to buy labels past them: no fit, the threshold
    stays. (With a label, ``starved_stages``: next test.)"""
    url = sqlite_url(tmp_path)
    cfg = _capped(url)
    async with proxy(cfg, fake) as (c, app):
        plan = app.state.cascade.runtime.plans.get("default")
        for i in range(40):
            body = chat(content=f"q{i} score=0.9")
            assert (await c.post("/v1/chat/completions", json=body)).json()["cascade"]["stage"] == 0
        await learning_of(app).settle()
        assert plan.thresholds[0] == pytest.approx(0.1)
    assert query(url, "SELECT count(*) FROM labels") == [(0,)]
    assert query(url, "SELECT DISTINCT sampling FROM traces") == [("budget",)]
    assert query(url, "SELECT count(*) FROM fits") == [(0,)]


async def test_a_stage_the_spend_caps_starve_of_evidence_escalates_for_free_labels(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    """As above, but users said something about two of its answers: labels do come for this cascade,
    and what the first stage accepts rests on two of them while the caps rule out every shadow call.
    The tuner escalates that stage (the fit's evidence says ``starved_stages``): the requests it passes
    on reach the last stage and label its answers for free, and fits bring it down on that evidence."""
    url = sqlite_url(tmp_path)
    cfg = _capped(url)
    async with proxy(cfg, fake) as (c, app):
        plan = app.state.cascade.runtime.plans.get("default")
        ids = []
        for i in range(40):
            r = await c.post("/v1/chat/completions", json=chat(content=f"q{i} score=0.9"))
            assert r.json()["cascade"]["stage"] == 0
            ids.append(r.json()["id"])
        await learning_of(app).settle()
        assert plan.thresholds[0] == pytest.approx(0.1)  # no label yet: nothing to escalate for
        for rid in ids[:2]:
            assert (await c.post("/v1/feedback", json={"id": rid, "score": 1.0})).status_code == 200
        await wait_for(lambda: plan.thresholds[0] == pytest.approx(0.99), "the starved stage escalated")
        r = await c.post("/v1/chat/completions", json=chat(content="q40 score=0.9"))
        assert r.json()["cascade"]["stage"] == 1
    ((raw,),) = query(url, "SELECT evidence FROM fits ORDER BY version DESC LIMIT 1")
    evidence = json.loads(raw)
    assert list(evidence["starved_stages"]) == ["0"] and evidence["starved_stages"]["0"] <= 2
    assert evidence["stale_stages"] == []  # the caps ruled the calls out: not stale


async def test_a_restarted_replica_counts_the_quiet_stretch_from_its_first_look(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    """The labels have stopped when no fit came over the newest 2 x 20 / shadow_rate requests
    (``Tuner._quiet``; then stages serving on too few labels of their own are sent up: "the tuner never
    goes blind"). A replica that restarts on a store already holding that many requests has put no fit
    in force yet; it counts the stretch from its first look at the history, not from the first request
    ever stored, or it would act at once on a stretch it never watched."""
    url = sqlite_url(tmp_path)
    cfg = _capped(url)  # shadow_rate 1: the stretch is 40 requests

    async def serve(c: Any, start: int) -> None:
        for i in range(start, start + 40):
            r = await c.post("/v1/chat/completions", json=chat(content=f"q{i} score=0.9"))
            assert r.json()["cascade"]["stage"] == 0

    async with proxy(cfg, fake) as (c, app):
        tuner = learning_of(app).tuner
        assert tuner is not None
        (meta,) = tuner.plans()
        await tuner.sync()
        await serve(c, 0)
        await learning_of(app).settle()
        await tuner.sync()
        assert tuner._quiet(meta, tuner.history(meta))  # watched all 40, no fit: quiet
    async with proxy(cfg, fake) as (c, app):  # the restart, on the same store
        tuner = learning_of(app).tuner
        assert tuner is not None
        (meta,) = tuner.plans()
        await tuner.sync()
        assert len(tuner.history(meta).population) == 40
        assert not tuner._quiet(meta, tuner.history(meta))
        await serve(c, 40)
        await learning_of(app).settle()
        await tuner.sync()
        assert tuner._quiet(meta, tuner.history(meta))
    assert query(url, "SELECT count(*) FROM fits") == [(0,)]


async def test_the_tuner_pays_the_optimism_of_its_choice(fake: FakeUpstream, tmp_path: Path) -> None:
    """With ``optimism_correction`` (the default) the tuner's fit is the honest one of ``cascade
    calibrate``: it measures, on bootstrap replicates of the labels, how much better the cheapest
    threshold meeting the target looks than it is, and proposes one reaching the target plus that.
    Without it, the plain search proposes a lower threshold on the same labels."""
    evidence = {}
    for correct in (True, False):
        url = sqlite_url(tmp_path / str(correct))
        cfg = _cfg(url, optimism_correction=correct, min_labels=20)
        await _populate(url, cfg, 120)
        async with proxy(cfg, fake) as (_, app):
            await _until(app, 0.65)
        ((raw,),) = query(url, "SELECT evidence FROM fits")
        evidence[correct] = json.loads(raw)
    assert evidence[True]["optimism"] > 0 and evidence[False]["optimism"] == 0
    assert evidence[True]["proposed"][0] > evidence[False]["proposed"][0]
    assert evidence[True]["rows"] == evidence[False]["rows"]


async def test_thresholds_on_target_stay_when_the_tuners_choice_costs_more(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    """The plain search's choice on these labels, put in force in config.yaml: the honest tuner's own
    choice (paying its optimism) is dearer, and nothing misses the target, so the fit keeps the
    thresholds in force and its evidence says so (``kept_for_cost``); the gauge stays where it was."""
    plain_url = sqlite_url(tmp_path / "plain")
    cfg = _cfg(plain_url, optimism_correction=False, min_labels=20)
    await _populate(plain_url, cfg, 120)
    async with proxy(cfg, fake) as (_, app):
        await _until(app, 0.65)
    ((raw,),) = query(plain_url, "SELECT evidence FROM fits")
    on_target = json.loads(raw)["proposed"][0]
    url = sqlite_url(tmp_path / "honest")
    cfg = _cfg(url, min_labels=20)
    cfg["cascades"]["default"]["stages"][0]["threshold"] = on_target
    await _populate(url, cfg, 120)
    async with proxy(cfg, fake) as (_, app):
        await wait_for(lambda: query(url, "SELECT count(*) FROM fits") == [(1,)], "a fit")
        ((raw, thresholds),) = query(url, "SELECT evidence, thresholds FROM fits")
        assert _gauge(app) == pytest.approx(on_target)
    evidence = json.loads(raw)
    assert not evidence["missing_target"] and evidence["kept_for_cost"] is True
    assert evidence["proposed"][0] > on_target  # the honest choice escalates more ...
    assert json.loads(thresholds) == [pytest.approx(on_target)]  # ... and the thresholds in force stay


async def test_a_threshold_comes_down_only_on_enough_effective_labels_through_the_tuner(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    """The accepted answers known from a few shadow labels weighing ~40 each (a 2 % shadow rate): the
    fit wants to accept more, but the labels its choice would serve at stage 0 are worth far fewer than
    ``min_labels`` equal ones, so the threshold stays and the fit's evidence says why. With the labels of
    a 50 % shadow rate it moves."""
    held: dict[float, Any] = {}
    for rate in (0.02, 0.5):
        url = sqlite_url(tmp_path / str(rate))
        cfg = _cfg(url, min_labels=60)
        s = Store(url)
        await s.open()
        traces, labels = synthetic(cfg, 400, shadow_rate=rate)
        await s.write(traces, labels)
        await s.close()
        async with proxy(cfg, fake) as (_, app):
            await wait_for(lambda: query(url, "SELECT count(*) FROM fits") == [(1,)], "a fit")  # noqa: B023
            plan = app.state.cascade.runtime.plans.get("default")
            ((raw, thresholds),) = query(url, "SELECT evidence, thresholds FROM fits")
            evidence = json.loads(raw)
            await wait_for(lambda: list(plan.thresholds[:-1]) == json.loads(thresholds), "the fit in force")  # noqa: B023
        assert not evidence["missing_target"] and evidence["proposed"][0] < 0.65
        assert evidence["kept_for_cost"] is False  # a cheaper choice: held for evidence, not kept
        held[rate] = (json.loads(thresholds)[0], evidence["held_for_evidence"])
    assert held[0.02][0] == 0.7 and 0 < held[0.02][1]["0"] < 60
    assert held[0.5] == (pytest.approx(0.65), {})


async def test_a_target_out_of_reach_is_logged_once(
    fake: FakeUpstream, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No thresholds within the bounds reach the target (here the upper bound lets the first stage accept
    what the labels call wrong; in the wild, a stage whose scorers give every answer 1.0): the tuner put
    the most accurate in force and said nothing. It says so once, not at every fit."""
    url = sqlite_url(tmp_path)
    cfg = _cfg(url, target_quality=0.999, threshold_bounds=[0.05, 0.3])
    ids = await _populate(url, cfg)
    caplog.set_level(logging.INFO, logger="cascade.learning")
    async with proxy(cfg, fake) as (c, _):
        await wait_for(lambda: query(url, "SELECT count(*) FROM fits") == [(1,)], "a first fit")
        for tid in ids[:10]:
            assert (await c.post("/v1/feedback", json={"id": tid, "score": 1.0})).status_code == 200
        await wait_for(lambda: query(url, "SELECT count(*) FROM fits") == [(2,)], "a second fit")
    said = [r for r in caplog.records if r.getMessage().startswith("auto_tune: no thresholds within")]
    assert len(said) == 1 and said[0].levelname == "WARNING"
    assert said[0].cascade == "default" and said[0].target_quality == 0.999  # type: ignore[attr-defined]
    assert query(url, "SELECT thresholds FROM fits ORDER BY version") == [("[0.3]",), ("[0.3]",)]


@pytest.mark.parametrize(("rate", "warned"), [(0.0, True), (0.1, False)])
async def test_auto_tune_without_shadow_labels_says_so_at_start(
    fake: FakeUpstream, tmp_path: Path, caplog: pytest.LogCaptureFixture, rate: float, warned: bool
) -> None:
    """shadow_rate 0 (the default) with auto_tune: what the early stages accept is labelled only by
    feedback, so a cascade accepting most answers early may never be re-fitted (an online run from a
    loose start got no label in 1,500 requests, silently)."""
    caplog.set_level(logging.INFO, logger="cascade.learning")
    async with proxy(_cfg(sqlite_url(tmp_path), shadow_rate=rate), fake):
        pass
    said = [r for r in caplog.records if r.getMessage().startswith("auto_tune with shadow_rate 0")]
    assert len(said) == (1 if warned else 0)


async def test_free_form_answers_without_a_judge_pay_for_no_shadow_call_and_do_not_escalate(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    """Free-form answers, `compare: auto` and no judge: no label can ever come. Every drawn shadow call
    was made and paid for, ended `no_label`, and counted as a call let through with no label, so the
    tuner judged the stage stale and sent it to the upper bound (every request then paid both stages)."""
    from tests.learning.learning_helpers import PromptScore  # noqa: F401 (the scorer the config names)

    url = sqlite_url(tmp_path)
    reg = CollectorRegistry()
    cfg = _cfg(url, shadow_rate=1.0, shadow_max_share=None, compare="auto", tune_every=5)
    cfg["upstreams"]["small"]["model"] = "answer-Paris_is_lovely_in_spring"
    cfg["upstreams"]["large"]["model"] = "answer-Spring_in_Paris_is_lovely"
    cfg["cascades"]["default"]["stages"][0].update(
        threshold=0.1, scorers=[{"type": "python", "class": "tests.learning.learning_helpers:PromptScore"}]
    )
    async with proxy(cfg, fake, registry=reg) as (c, app):
        plan = app.state.cascade.runtime.plans.get("default")
        for i in range(60):
            r = await c.post("/v1/chat/completions", json=chat(content=f"Tell me about Paris {i} score=0.9"))
            assert r.json()["cascade"]["stage"] == 0
        await learning_of(app).settle()
        await learning_of(app).tuner.sync()  # type: ignore[union-attr]
        assert plan.thresholds[0] == pytest.approx(0.1)
    assert fake.counts.get("answer-Spring_in_Paris_is_lovely", 0) == 0  # no shadow call made
    assert query(url, "SELECT DISTINCT sampling FROM traces") == [("no_label",)]
    skipped = {"cascade": "default", "reason": "free_form"}
    assert reg.get_sample_value("cascade_labels_skipped_total", skipped) == 60
    assert query(url, "SELECT count(*) FROM fits") == [(0,)]


async def test_a_four_stage_cascade_is_tuned_and_calibrated_from_its_own_traffic(
    fake: FakeUpstream, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Four stages (three scored, as ``--max-stages 4`` writes them), traffic through the proxy: the
    first stage's answers are all wrong, the second's and third's right. The tuner's fits hold three
    thresholds and send the first stage's answers on; a request it used to accept is now answered by
    the second stage; the gauges follow; ``cascade calibrate`` on the same store chooses three too."""
    from app.cli import main
    from tests.conftest import upstream
    from tests.learning.learning_helpers import PromptScore  # noqa: F401 (the scorer the config names)

    url = sqlite_url(tmp_path)
    cfg = _cfg(url, shadow_rate=1.0, shadow_max_share=None, shadow_warmup=0, min_labels=30)
    scorer = [{"type": "python", "class": "tests.learning.learning_helpers:PromptScore"}]
    cfg["upstreams"] = {
        "s0": upstream("answer-B", price={"input": 0.1, "output": 0.2}),
        "s1": upstream("answer-A", price={"input": 0.5, "output": 1.0}),
        "s2": upstream("answer-A", price={"input": 2.0, "output": 4.0}),
        "large": upstream("answer-A", price={"input": 10.0, "output": 20.0}),
    }
    stages = [{"upstream": f"s{k}", "threshold": 0.5, "scorers": scorer} for k in range(3)]
    cfg["cascades"]["default"]["stages"] = [*stages, {"upstream": "large"}]
    reg = CollectorRegistry()
    async with proxy(cfg, fake, registry=reg) as (c, app):
        plan = app.state.cascade.runtime.plans.get("default")
        first = await c.post("/v1/chat/completions", json=chat(content="q score=0.9"))
        assert (
            first.json()["cascade"]["stage"] == 0 and first.json()["choices"][0]["message"]["content"] == "B"
        )
        for i in range(80):
            r = await c.post("/v1/chat/completions", json=chat(content=f"q{i} score={(i % 20) / 20:.2f}"))
            assert r.status_code == 200
        await learning_of(app).settle()
        fits = query(url, "SELECT version, thresholds FROM fits ORDER BY version")
        assert fits and all(len(json.loads(t)) == 3 for _, t in fits)
        t0 = plan.thresholds[0]
        assert t0 > 0.95  # its answers were all wrong: the fit sends them on (max_step_up)
        for k, t in enumerate(plan.thresholds):
            assert reg.get_sample_value("cascade_threshold", {"cascade": "default", "stage": str(k)}) == t
        again = await c.post("/v1/chat/completions", json=chat(content="q again score=0.9"))
        body = again.json()
        assert body["cascade"]["stage"] == 1 and body["choices"][0]["message"]["content"] == "A"
        assert [a["threshold"] for a in body["cascade"]["attempts"][:2]] == pytest.approx(
            list(plan.thresholds[:2])
        )
    path = tmp_path / "config.yaml"
    cfg["learning"]["auto_tune"] = False  # calibrate reads what the file says, not the tuner's fit
    path.write_text(json.dumps(cfg))
    capsys.readouterr()
    assert await asyncio.to_thread(main, ["calibrate", "--config", str(path), "--target-quality", "0.9"]) == 0
    out = capsys.readouterr().out
    assert "cascade 'default': s0 -> s1 -> s2 -> large" in out
    chosen = re.search(r"chosen\s+\[?([\d.]+),? ([\d.]+),? ([\d.]+)\]?: quality ([\d.]+)", out)
    assert chosen is not None, out
    assert float(chosen.group(1)) > 0.95 and float(chosen.group(2)) < 0.5 and float(chosen.group(4)) >= 0.9
