"""Drift (issue 13): fits weigh labels down with age (half_life_labels) within a window (window_labels),
and the tuner reads the store incrementally: new traces and labels only, never the whole history."""

from __future__ import annotations

import asyncio
import bisect
import json
import random
from operator import itemgetter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.learning.calibration import Entry, fit, make_entry, weigh
from app.learning.store import Store
from tests.conftest import base_config, proxy
from tests.fake_upstream import FakeUpstream
from tests.learning.learning_helpers import learning_of, query, sampled, sqlite_url, synthetic, with_learning

pytestmark = pytest.mark.anyio


def _regime(rng: random.Random, start: int, n: int, cut: float) -> tuple[list[Entry], list[tuple[int, int]]]:
    """Requests at a threshold of 0.5 whose stage-0 answer is good exactly when its score > cut; every
    request is labelled (shadow for the accepted ones, at rate 1)."""
    entries, population = [], []
    for i in range(start, start + n):
        s = rng.random()
        early = s >= 0.5
        atts: dict[int, Any] = {0: ("accepted" if early else "rejected", s, 1e-6)}
        if not early:
            atts[1] = ("accepted", None, 1e-4)
        label = ("shadow" if early else "free", 0, float(s > cut), 1.0, 1e-4 if early else 0.0)
        e = make_entry(i, 2, 0 if early else 1, 1e-4, atts, [label], 2)
        assert e is not None
        entries.append(e)
        population.append((i, 0 if early else 1))
    return entries, population


def test_decayed_fits_follow_the_newest_traffic() -> None:
    rng = random.Random(5)
    old, pop_old = _regime(rng, 0, 6000, cut=0.2)  # stage 0 is good from 0.2 up
    new, pop_new = _regime(rng, 6000, 600, cut=0.7)  # after the drift: only from 0.7 up
    entries, pop = old + new, pop_old + pop_new

    def threshold(**kw: int) -> float:
        cal = fit(weigh(entries, 2, pop, **kw), 0.97, margin_z=0.0)
        return cal.thresholds[0]

    assert threshold() < 0.5  # every label weighs the same: the old traffic outvotes the new
    assert 0.65 <= threshold(half_life=200) <= 0.75  # halving every 200 labels: the new regime
    assert 0.65 <= threshold(window=600) <= 0.75  # or only the newest 600
    rows = weigh(entries, 2, pop, half_life=200)
    assert rows.weights[-1] == pytest.approx(1.0) and rows.weights[-201] == pytest.approx(0.5, rel=0.01)


def _cfg(url: str) -> dict[str, Any]:
    opts = {
        "auto_tune": True,
        "target_quality": 0.9,
        "tune_every": 10,
        "min_labels": 50,
        "half_life_labels": 0,  # every label counts: the second fit must hold all 2000+ of them
        "sync_every_s": 3600,  # only labels wake the tuner: each sync here is one we asked for
    }
    return with_learning(base_config(), url, **opts)


async def test_the_tuner_reads_only_what_is_new(fake: FakeUpstream, tmp_path: Path) -> None:
    url = sqlite_url(tmp_path)
    cfg = _cfg(url)
    store = Store(url)
    await store.open()
    traces, labels = synthetic(cfg, 2000)
    await store.write(traces, labels)
    await store.close()
    async with proxy(cfg, fake) as (c, app):
        learning = learning_of(app)
        assert learning.tuner is not None
        await learning.settle()  # the first sync reads the history once
        first = query(url, "SELECT version, n_rows FROM fits")
        assert len(first) == 1 and first[0][1] > 1000
        read = learning.store.rows_read
        assert read > 3000  # traces, labels and attempts of the labelled requests
        for t in traces[:20]:  # 20 new labels, on old traces
            assert (await c.post("/v1/feedback", json={"id": t.id, "score": 1.0})).status_code == 200
        await learning.settle()
        delta = learning.store.rows_read - read
        fits = query(url, "SELECT version, n_rows FROM fits ORDER BY version")
    # The labels woke the tuner once or twice (tune_every 10); each new fit used the whole history.
    assert len(fits) in (2, 3) and all(n >= first[0][1] for _, n in fits)
    # 20 labels, at most 20 traces and 40 attempts first seen, one stored fit per sync: nothing like
    # the 3000+ a re-read would cost.
    assert delta <= 20 + 20 + 40 + 25, delta


async def test_memory_is_bounded_by_the_window(tmp_path: Path) -> None:
    from app.learning.history import History

    url = sqlite_url(tmp_path)
    store = Store(url)
    await store.open()
    traces, labels = synthetic(_cfg(url), 1500, shadow_rate=1.0)
    await store.write(traces, labels)
    plan = traces[0].plan
    h = History("default", plan, 2, keep=300)
    await h.update(store)
    labelled, requests = h.size
    assert labelled == 300 and requests <= 300  # every request is labelled here
    rows = h.rows(half_life=0, window=300, pass_score=0.5)
    assert rows.n == 300
    more, more_labels = synthetic(_cfg(url), 100, shadow_rate=1.0, seed=9)
    await store.write(more, more_labels)
    await h.update(store)
    assert h.size[0] == 300 and h.last_label_id == len(labels) + len(more_labels)
    await store.close()
    await asyncio.sleep(0)


def test_an_abrupt_change_is_detected_and_the_fit_starts_over() -> None:
    from app.config import LearningConfig
    from app.learning.tuning import changed

    cfg = LearningConfig(drift_labels=200, half_life_labels=2000)
    rng = random.Random(2)
    old, pop_old = _regime(rng, 0, 2000, cut=0.6)  # at 0.5, 90 % of the answers are good
    same, pop_same = _regime(rng, 2000, 200, cut=0.6)
    assert changed(old + same, pop_old + pop_same, 2, [0.5], cfg) is None  # the same traffic: no change
    new, pop_new = _regime(rng, 2000, 200, cut=0.8)  # now 70 %
    got = changed(old + new, pop_old + pop_new, 2, [0.5], cfg)
    assert got is not None and got.since_seq == 2000  # the newest 200 labelled requests from here on
    assert got.evidence["quality_newest"] < got.evidence["quality_before"] and got.evidence["z"] < -3
    better, pop_better = _regime(rng, 2000, 200, cut=0.0)  # it works both ways
    up = changed(new + better, pop_new + pop_better, 2, [0.5], cfg)
    assert up is not None and up.evidence["z"] > 3
    assert changed(old + new, pop_old + pop_new, 2, [0.5], LearningConfig(drift_labels=0)) is None


def test_a_stage_whose_accepted_answers_go_unlabelled_is_stale() -> None:
    """A stage whose answers go unlabelled for STALE_LABELS / shadow_rate requests, although its shadow
    calls were let through (the last stage failing, its circuit open, busy), escalates (tuning.py);
    shadow calls the spend caps ruled out are not expected to bring labels, and the calls expected are
    the ones drawn, not ``shadow_rate`` of the requests."""
    from app.config import LearningConfig
    from app.learning.tuning import stale_stages

    # 100 or more accepted requests of the newest 200, fewer than 0.1 of their drawn calls labelled
    cfg = LearningConfig(shadow_rate=0.2)
    rng = random.Random(3)
    entries, _ = _regime(rng, 0, 50, cut=0.5)
    early = [(e.seq, e.accepted) for e in entries if e.accepted == 0]
    population = [(i, 0) for i in range(300)]
    drawn = list(range(100, 300, 5))  # 40 shadow calls drawn over the newest 200
    assert stale_stages(early, population, 1, cfg, (), drawn) == [0]
    now = [(seq, 0) for seq in (150, 200, 250, 299)]  # shadow-labelled, lately
    assert stale_stages([*early, *now[:3]], population, 1, cfg, (), drawn) == [0]  # 3 of 40: fewer than 4
    assert stale_stages([*early, *now], population, 1, cfg, (), drawn) == []
    # Escalated, it accepts little: not stale any more, so the fits may bring it down again.
    escalating = [(i, 0) for i in range(100)] + [(i, 1 if i % 4 else 0) for i in range(100, 300)]
    assert stale_stages(early, escalating, 1, cfg, (), drawn) == []
    assert stale_stages(early, population, 1, LearningConfig(shadow_rate=0.0), (), drawn) == []
    # The caps ruled out every call drawn: nothing to expect.
    assert stale_stages(early, population, 1, cfg, drawn, drawn) == []
    # They ruled out 30: 10 let through, one label is enough, none is stale.
    assert stale_stages([*early, *now[:1]], population, 1, cfg, drawn[:30], drawn) == []
    assert stale_stages(early, population, 1, cfg, drawn[:30], drawn) == [0]
    # Chance drew fewer calls than shadow_rate asks for (4 instead of 40), all of them ruled out: a quiet
    # stretch, not stale evidence (reading 40 - 4 = 36 as expected labels raised MBPP's first stage to
    # the upper bound 6 times in 2,500 requests).
    few = drawn[:4]
    assert stale_stages(early, population, 1, cfg, few, few) == []
    # ... and fewer than STALE_MIN_CALLS let through say nothing either.
    assert stale_stages(early, population, 1, cfg, (), drawn[-4:]) == []
    assert stale_stages(early, population, 1, cfg, (), drawn[-5:]) == [0]


def test_ten_lucky_shadow_labels_are_not_a_change() -> None:
    """The newest 200 labelled requests of a steady stream at a 10 % shadow rate hold ~10 shadow
    labels; all of them right (0.68 ** 10: a few per cent of the checks) is no evidence of a change.
    Judged on each sample's own residuals it was (z > 5), and the tuner threw its history away."""
    from app.config import LearningConfig
    from app.learning.tuning import changed

    cfg = LearningConfig(drift_labels=200, half_life_labels=2000)
    rng = random.Random(4)
    old, pop_old = sampled(rng, 0, 3000, good=0.68)
    accepted_next = [i for i in range(3000, 3400) if rng.random() >= 0.5]
    rng2 = random.Random(4)
    new, pop_new = sampled(rng2, 3000, 400, good=1.0, shadowed=set(accepted_next[::16]))
    labelled_new = [e for e in new if e.kind == "shadow"]
    assert 5 <= len(labelled_new) <= 20 and all(e.correct[0] == 1.0 for e in labelled_new)
    entries = old + new
    assert changed(entries[: len(old) + len(new)], pop_old + pop_new, 2, [0.5], cfg) is None
    # A real fall in what the accepted answers are worth is still caught at the same shadow rate.
    worse, pop_worse = sampled(random.Random(9), 3000, 800, good=0.1, rate=0.1)
    got = changed(old + worse, pop_old + pop_worse, 2, [0.5], cfg)
    assert got is not None and got.evidence["z"] < -3


def test_a_fall_the_newest_200_cannot_see_is_found_over_more_labels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Of the accepted answers 68 % were right, now 40 %: a fall of 14 points in quality, seen through
    ~18 shadow labels per 200 labelled requests: too few to tell at 4 standard errors. Over the newest
    800 it shows, and the fit starts over from about where the change began."""
    from app.config import LearningConfig
    from app.learning import tuning

    cfg = LearningConfig(drift_labels=200, half_life_labels=2000)
    old, pop_old = sampled(random.Random(4), 0, 6000, good=0.68)
    new, pop_new = sampled(random.Random(54), 6000, 1600, good=0.4)
    got = tuning.changed(old + new, pop_old + pop_new, 2, [0.5], cfg)
    assert got is not None and got.evidence["labelled_newest"] == 800 and got.evidence["z"] <= -4
    assert 6000 <= got.since_seq <= 6200  # (800 labelled requests back: where the new traffic began)
    monkeypatch.setattr(tuning, "DRIFT_SCALES", 1)
    assert tuning.changed(old + new, pop_old + pop_new, 2, [0.5], cfg) is None


def test_a_steady_stream_tested_at_every_fit_raises_no_alarm(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test runs at every fit, so its false alarms add up over a long run. A steady stream (10 %
    shadow rate) tested every 20 labelled requests: the newest 200 alone at 3 standard errors, as the
    tuner did, fired twice here (the second time the other way: the alarm's lucky window had become the
    history); at 4 over the four scales, never (measured over 20 such streams of 11,000: once)."""
    from app.config import LearningConfig
    from app.learning import tuning

    cfg = LearningConfig(drift_labels=200, half_life_labels=2000)
    rng = random.Random(6)
    shadowed = {i for i in range(8000) if rng.random() < 0.1}
    entries, population = sampled(random.Random(1006), 0, 8000, good=0.68, shadowed=shadowed)

    def alarms() -> list[int]:
        seen, since = [], 0
        for m in range(2700, 4100, 20):
            upto = bisect.bisect_right(population, entries[m - 1].seq, key=itemgetter(0))
            got = tuning.changed(entries[since:m], population[:upto], 2, [0.5], cfg)
            if got is not None:
                seen.append(m)
                since = next(i for i, e in enumerate(entries) if e.seq == got.since_seq)
        return seen

    assert alarms() == []
    monkeypatch.setattr(tuning, "DRIFT_SCALES", 1)
    monkeypatch.setattr(tuning, "DRIFT_Z", 3.0)
    assert len(alarms()) == 2


async def test_a_live_tuner_starts_over_where_a_smaller_fall_began(
    fake: FakeUpstream, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through a running proxy: 2,000 requests whose accepted answers (score >= 0.7) are right 90 % of
    the time, then 1,000 where 55 % are (10 points of quality): the newest 200 labelled requests cannot
    tell it at 4 standard errors, the newest 800 can; the tuner says so, remembers where the change
    began and fits from there."""
    from app.learning import tuning

    async def first_fit(scales: int, where: Path) -> dict[str, Any]:
        url = sqlite_url(where)
        opts = {"target_quality": 0.9, "tune_every": 10, "min_labels": 50, "sync_every_s": 3600}
        cfg = with_learning(
            base_config(), url, auto_tune=True, half_life_labels=2000, drift_labels=200, **opts
        )
        store = Store(url)
        await store.open()
        traces, labels = synthetic(cfg, 3000, cut=lambda i: 0.4 if i < 2000 else 0.83)
        await store.write(traces, labels)
        await store.close()
        monkeypatch.setattr(tuning, "DRIFT_SCALES", scales)
        async with proxy(cfg, fake) as (_, app):
            await learning_of(app).settle()
        (evidence,) = query(url, "SELECT evidence FROM fits WHERE version = 1")
        return json.loads(evidence[0])  # type: ignore[no-any-return]

    with caplog.at_level("WARNING", logger="cascade.learning"):
        got = await first_fit(tuning.DRIFT_SCALES, tmp_path / "a")
    change = got["change"]
    assert change is not None and change["labelled_newest"] == 800 and change["z"] <= -4, change
    assert change["quality_newest"] < change["quality_before"] - 0.05
    assert any(r.getMessage().startswith("label quality changed") for r in caplog.records)
    # The fit starts over from about where the new traffic began (request 2,000: the store numbers
    # the requests it holds in order of arrival) and escalates more.
    assert 1900 <= got["since_seq"] <= 2100, got["since_seq"]
    assert got["rows"] <= 900 and got["proposed"][0] > 0.7
    assert (await first_fit(1, tmp_path / "b"))["change"] is None  # the newest 200 alone: no change seen


def test_a_stage_seen_in_one_sample_only_is_not_a_certainty() -> None:
    """Which stage serves a request is chance too. The newest 200: 3 answers of the first stage, all
    wrong, the rest escalated and right; the 1,000 before: all escalated. Per stage both samples agree
    perfectly (0 and 1), so the labels alone give a standard error of 0 and any difference is a
    "change" (an online run threw its history away on z = -50,834,157); the mix of stages gives it
    its spread."""
    from app.learning.calibration import Rows
    from app.learning.tuning import pooled_se

    def rows(early_wrong: int, n: int) -> Rows:
        scores = np.array([[0.9, 0.0]] * early_wrong + [[0.1, 0.0]] * (n - early_wrong))
        correct = np.array([[0.0, 1.0]] * early_wrong + [[0.0, 1.0]] * (n - early_wrong))
        return Rows(scores, correct, np.ones((n, 2)), np.ones(n), [])

    q_new, q_old, se = pooled_se(rows(3, 200), rows(0, 1000), [0.5], (200, 1000))
    assert (q_new, q_old) == pytest.approx((0.985, 1.0))
    assert 0.005 < se < 0.01 and (q_new - q_old) / se > -3  # 3 of 200: not 4 standard errors
    # Fewer requests behind the same rows, more spread; a real change still stands out.
    assert pooled_se(rows(3, 200), rows(0, 1000), [0.5], (100, 500))[2] > se
    q_new, q_old, se = pooled_se(rows(40, 200), rows(0, 1000), [0.5], (200, 1000))
    assert (q_new - q_old) / se < -4


def _served(
    rng: random.Random, start: int, n: int, threshold: float, low: float = 0.0
) -> tuple[list[Entry], list[tuple[int, int]]]:
    """Requests at ``threshold`` whose stage-0 scores are uniform from ``low`` to 1: the escalated ones
    labelled for free, half of the accepted ones by a shadow call (weight 2)."""
    entries, population = [], []
    for i in range(start, start + n):
        s = low + (1.0 - low) * rng.random()
        early = s >= threshold
        population.append((i, 0 if early else 1))
        if early and rng.random() < 0.5:
            continue
        atts: dict[int, Any] = {0: ("accepted" if early else "rejected", s, 1e-6)}
        if not early:
            atts[1] = ("accepted", None, 1e-4)
        label = ("shadow" if early else "free", 0, 1.0, 2.0 if early else 1.0, 1e-4 if early else 0.0)
        e = make_entry(i, 2, 0 if early else 1, 1e-4, atts, [label], 2)
        assert e is not None
        entries.append(e)
    return entries, population


def test_a_stage_taking_far_more_of_the_traffic_is_shifted() -> None:
    """The share of the newest 50 requests answered by a stage against the share the thresholds in force
    answer of the labelled requests before (weighted, at their scores): a jump from ~30 % to all is a
    shift; noise, a fall, or a stage already at the upper bound are not, nor a share that grew because
    the thresholds came down (the requests before were served at stricter ones)."""
    from app.config import LearningConfig
    from app.learning.tuning import shifted_stages

    cfg = LearningConfig()
    rng = random.Random(3)

    def shifted(parts: list[tuple[list[Entry], list[tuple[int, int]]]], at: float) -> dict[str, list[float]]:
        entries = [e for es, _ in parts for e in es]
        population = [p for _, ps in parts for p in ps]
        return shifted_stages(population, [at], cfg, lambda: entries, 2)

    before = _served(rng, 1, 400, 0.7)
    after = _served(rng, 401, 50, 0.7, low=0.7)
    got = shifted([before, after], 0.7)
    assert list(got) == ["0"] and 0.2 < got["0"][0] < 0.4 and got["0"][1] == 1.0, got
    # ... unless the thresholds in force came after some of the newest (request 420): they may not
    # have served them (a fit that has just raised a stage saw its old thresholds' requests as a shift).
    everything = before[1] + after[1]
    assert shifted_stages(everything, [0.7], cfg, lambda: before[0] + after[0], 2, since=420) == {}
    assert shifted([before, _served(rng, 401, 50, 0.7)], 0.7) == {}  # the same traffic
    assert shifted([before, _served(rng, 401, 50, 0.99)], 0.7) == {}  # fewer: money, not quality
    assert shifted([before, _served(rng, 401, 50, 0.99, low=0.99)], 0.99) == {}  # escalating all it can
    # Served at 0.8 before (20 % accepted), 0.5 now (50 %): the fits' doing, not the traffic's.
    assert shifted([_served(rng, 1, 400, 0.8), _served(rng, 401, 50, 0.5)], 0.5) == {}
    # A steady stream, looked at after every 10 requests as the tuner's syncs would: never (at any scale).
    steady = _served(rng, 1, 20000, 0.5)
    pop = steady[1]
    assert not any(shifted_stages(pop[:m], [0.5], cfg, lambda: steady[0], 2) for m in range(150, 20001, 10))


def test_a_smaller_rise_in_a_stage_s_share_is_seen_on_more_requests() -> None:
    """~77 % accepted before, every one of the newest after: 50 of 50 is not unlikely enough at the
    share before (taken one standard error higher), 100 of 100 is. The shift is dated to the newest 100
    (the fits start over from there)."""
    from app.config import LearningConfig
    from app.learning.tuning import shifted_stages

    cfg = LearningConfig()
    rng = random.Random(1)
    before = _served(rng, 1, 400, 0.24)
    after = _served(rng, 401, 100, 0.24, low=0.24)
    entries, population = before[0] + after[0], before[1] + after[1]
    assert shifted_stages(population[:450], [0.24], cfg, lambda: entries, 2) == {}
    got = shifted_stages(population, [0.24], cfg, lambda: entries, 2)
    assert list(got) == ["0"] and 0.7 < got["0"][0] < 0.8 and got["0"][1:] == [1.0, 100], got
    # Thresholds put in force after the newest 100 began (request 420) served too few of them: nothing.
    assert shifted_stages(population, [0.24], cfg, lambda: entries, 2, since=420) == {}


async def test_a_shift_escalates_the_stage_before_any_label(
    fake: FakeUpstream, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Through a running proxy: 400 requests at threshold 0.7, stage 0 accepting ~30 %, then 50 whose
    scores all lie above it (the traffic changed) and whose answers nobody has labelled yet. Too few
    labels for a fit, but the tuner escalates stage 0 at once, says why, and starts the fits over from
    the shift, and /metrics shows the new threshold; without the 50, nothing."""
    from prometheus_client.parser import text_string_to_metric_families

    async def fits(shift: bool, where: Path) -> tuple[list[tuple[Any, ...]], float]:
        url = sqlite_url(where)
        opts = {"target_quality": 0.9, "tune_every": 10, "min_labels": 500, "sync_every_s": 3600}
        cfg = with_learning(base_config(), url, auto_tune=True, **opts)
        store = Store(url)
        await store.open()
        await store.write(*synthetic(cfg, 400))
        if shift:
            await store.write(*synthetic(cfg, 50, seed=2, low=0.7, shadow_rate=0.0))
        await store.close()
        async with proxy(cfg, fake) as (c, app):
            await learning_of(app).settle()
            text = (await c.get("/metrics")).text
        (gauge,) = [
            s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name == "cascade_threshold" and s.labels == {"cascade": "default", "stage": "0"}
        ]
        return query(url, "SELECT thresholds, evidence FROM fits ORDER BY version"), gauge

    with caplog.at_level("WARNING", logger="cascade.learning"):
        got, gauge = await fits(True, tmp_path / "a")
    assert len(got) == 1, got
    thresholds, evidence = json.loads(got[0][0]), json.loads(got[0][1])
    assert thresholds == [0.99] and gauge == 0.99  # in force: the proxy's gauge says so
    before, now, newest = evidence["shifted_stages"]["0"]
    assert before < 0.4 and now == 1.0 and newest == 50
    assert evidence["change"] == {"shifted_stages": evidence["shifted_stages"]}
    assert evidence["since_seq"] == 401 and evidence["rows"] == 0  # the 50 (unlabelled) from the shift on
    assert any("a far larger share" in r.getMessage() for r in caplog.records)
    steady, gauge = await fits(False, tmp_path / "b")
    assert steady == [] and gauge == 0.7  # steady traffic: too few labels, no fit


async def _fits_after(
    fake: FakeUpstream,
    where: Path,
    threshold: float,
    labelled: tuple[int, float],
    then: tuple[int, float],
    *,
    min_labels: int,
) -> list[tuple[Any, ...]]:
    """The fits a running proxy (stage 0 at ``threshold``) makes from a store holding ``labelled`` =
    (requests, lowest score) as ``synthetic`` labels them, then ``then`` = (requests, lowest score)
    nobody has labelled: (thresholds, evidence) per fit."""
    url = sqlite_url(where)
    opts = {"target_quality": 0.9, "tune_every": 10, "min_labels": min_labels, "sync_every_s": 3600}
    cfg = with_learning(base_config(), url, auto_tune=True, **opts)
    cfg["cascades"]["default"]["stages"][0]["threshold"] = threshold
    store = Store(url)
    await store.open()
    await store.write(*synthetic(cfg, labelled[0], threshold=threshold, low=labelled[1]))
    await store.write(*synthetic(cfg, then[0], seed=2, threshold=threshold, low=then[1], shadow_rate=0.0))
    await store.close()
    async with proxy(cfg, fake) as (_c, app):
        await learning_of(app).settle()
    return query(url, "SELECT thresholds, evidence FROM fits ORDER BY version")


async def test_a_smaller_shift_is_escalated_on_the_newest_100(fake: FakeUpstream, tmp_path: Path) -> None:
    """Through a running proxy, stage 0 at threshold 0.24 (~76 % of the requests accepted): 400 labelled
    requests, then 100 whose scores all lie above it and that nobody has labelled. The newest 50 alone
    are not unlikely enough at the share before; the newest 100 are: stage 0 escalates, and the fits
    start over from the first of the 100."""

    async def fits(extra: int, where: Path) -> list[tuple[Any, ...]]:
        return await _fits_after(fake, where, 0.24, (400, 0.0), (extra, 0.24), min_labels=500)

    assert await fits(50, tmp_path / "fifty") == []  # 50 of 50: not enough to call it a shift
    (got,) = await fits(100, tmp_path / "hundred")
    thresholds, evidence = json.loads(got[0]), json.loads(got[1])
    before, now, newest = evidence["shifted_stages"]["0"]
    assert thresholds == [0.99] and 0.7 < before < 0.8 and now == 1.0 and newest == 100, evidence
    assert evidence["since_seq"] == 401 and evidence["rows"] == 0


def test_the_first_stage_s_scores_moving_is_seen_without_labels() -> None:
    """The first stage's scores of the newest 50 (100, 200) answered requests against the up to 1,000
    before them: scores from 0.1-1 becoming 0.8-1 is a change at once, dated to the newest 50; the same
    traffic looked at every 10 requests for 20,000 requests never is; too few before, nothing."""
    from app.learning.tuning import first_scores_moved, ks_2samp

    rng = random.Random(5)
    steady = [(i, round(rng.uniform(0.1, 1.0), 4)) for i in range(1, 20001)]
    assert not any(first_scores_moved(steady[max(0, m - 1200) : m]) for m in range(550, 20001, 10))
    moved = steady[:1000] + [(i, round(rng.uniform(0.8, 1.0), 4)) for i in range(1001, 1051)]
    got = first_scores_moved(moved)
    assert got is not None and got["requests"] == 50 and got["since_seq"] == 1001, got
    assert got["mean_now"] > 0.85 > 0.6 > got["mean_before"] and got["p"] < 1e-6 and got["d"] > 0.5
    assert first_scores_moved(moved[-520:]) is None  # 470 before them: too few to compare with
    assert ks_2samp([0.5] * 30, [0.5] * 60) == (0.0, 1.0)


async def test_a_first_stage_scoring_differently_escalates_every_stage(
    fake: FakeUpstream, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Through a running proxy, stage 0 at threshold 0.05 answers ~95 % of 600 labelled requests, then
    all of 100 unlabelled ones whose scores lie at 0.8-1 instead of 0-1 (new traffic): no accept-share
    shift to see (95 -> 100 %), too few labels for a fit, but the first stage's scores moved. Every
    stage escalates, the fits start over from the newest 50, and the log says why; the same traffic
    without the move, nothing."""

    async def fits(move: bool, where: Path) -> list[tuple[Any, ...]]:
        return await _fits_after(fake, where, 0.05, (600, 0.0), (100, 0.8 if move else 0.0), min_labels=5000)

    with caplog.at_level("WARNING", logger="cascade.learning"):
        (got,) = await fits(True, tmp_path / "moved")
    thresholds, evidence = json.loads(got[0]), json.loads(got[1])
    moved = evidence["first_scores"]
    assert thresholds == [0.99] and moved["requests"] == 50 and moved["mean_now"] > 0.8, evidence
    assert evidence["change"] == {"first_scores": moved} and "shifted_stages" not in evidence
    assert evidence["since_seq"] == 651 and evidence["rows"] == 0
    assert any("first stage's scores changed" in r.getMessage() for r in caplog.records)
    assert await fits(False, tmp_path / "steady") == []


async def test_a_fit_heading_down_is_tested_where_it_heads(fake: FakeUpstream, tmp_path: Path) -> None:
    """Through a running proxy, stage 0 escalating everything (threshold 0.99): 2,000 older labelled
    requests say its answers are right from a score of ~0.4 up, the newest 600 (all escalated, so all
    labelled for free) from ~0.9 up. At 0.99 both say "quality 1" (the last stage serves all), so the
    change test at the thresholds in force sees nothing, and the fit, mostly older labels, heads down
    into answers that are now wrong. Tested where it heads, the change is seen, the fit starts over
    from the newest labels and stays up."""
    url = sqlite_url(tmp_path)
    cfg = base_config()
    cfg["cascades"]["default"]["stages"][0]["threshold"] = 0.99
    opts = {"target_quality": 0.9, "tune_every": 10, "min_labels": 50, "sync_every_s": 3600}
    cfg = with_learning(cfg, url, auto_tune=True, half_life_labels=2000, drift_labels=200, **opts)
    store = Store(url)
    await store.open()
    await store.write(*synthetic(cfg, 2000, cut=lambda i: 0.4))
    await store.write(*synthetic(cfg, 600, seed=2, threshold=0.99, cut=lambda i: 0.9))
    await store.close()
    async with proxy(cfg, fake) as (_, app):
        await learning_of(app).settle()
    ((evidence,),) = query(url, "SELECT evidence FROM fits WHERE version = 1")
    got = json.loads(evidence)
    assert got["change"] is not None and got["change"]["z"] <= -4, got["change"]
    # about where the newest began (the span that saw it, 800 labelled requests, reaches a little before)
    assert 1700 <= got["since_seq"] <= 2200, got["since_seq"]
    # (without the test where the fit heads: no change, 2,284 rows, 0.68 proposed)
    assert got["rows"] <= 900 and got["proposed"][0] >= 0.8, got["proposed"]
