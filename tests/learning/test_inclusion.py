"""Realised inclusion probabilities (issue 13): shadow labels weigh 1/p̂, p̂ the realised share of
early-accepted requests that got a label, not 1/shadow_rate.

A simulation: shadow calls are drawn at the nominal rate 0.2, but three in four are skipped (busy,
over budget): the realised rate is 0.05. The estimates of the stage-0 accept share, the quality and
the cost at the thresholds in force come out right with the realised rate, through the tuner's
incremental reader and through ``cascade calibrate``'s full read, and wrong with the nominal one.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from app.learning.calibration import assemble
from app.learning.history import History
from app.learning.store import LabelledData, Store
from app.learning.thresholds import CascadeEval, evaluate_cascade
from tests.learning.learning_helpers import _attempt, sqlite_url

pytestmark = pytest.mark.anyio

N = 20_000
T = 0.5  # stage 0's threshold in force
C0, C1 = 1e-6, 1e-4


def _world(seed: int = 3) -> tuple[list, list, dict[str, float]]:
    from app.learning.records import LabelRow, TraceRow

    rng = random.Random(seed)
    traces, labels = [], []
    acc = good = cost = 0.0
    for i in range(N):
        s = rng.random()
        ok0 = rng.random() < 0.3 + 0.65 * s  # stage 0's answer as good as the last stage's
        early = s >= T
        tid = f"t{i}"
        atts = [_attempt(0, "small", "accepted" if early else "rejected", s, T, C0)]
        if not early:
            atts.append(_attempt(1, "large", "accepted", None, None, C1))
        sampling = "free"
        if early:
            drawn = rng.random() < 0.2
            skipped = drawn and rng.random() < 0.75  # busy, budget: the call is never made
            sampling = "not_drawn" if not drawn else ("busy" if skipped else "labelled")
            if drawn and not skipped:
                labels.append(LabelRow(tid, 0, "shadow", float(ok0), 1 / 0.2, 1.0 + i, C1, "exact"))
        else:
            labels.append(LabelRow(tid, 0, "free", float(ok0), 1.0, 1.0 + i, 0.0, "exact"))
        traces.append(
            TraceRow(
                tid, f"r{i}", "default", "fp", 0, 1.0 + i, True, False, 2, 0 if early else 1,
                sum(a.cost_usd for a in atts), C1, 1.0, "h", 1, None, atts, sampling,
            )
        )  # fmt: skip
        acc += early
        good += ok0 if early else 1.0
        cost += C0 + (0.0 if early else C1)
    return traces, labels, {"accept": acc / N, "quality": good / N, "cost": cost / N}


def _at_t(rows: object) -> CascadeEval:
    return evaluate_cascade(rows.scores, rows.correct, rows.cost, [T], rows.weights)  # type: ignore[attr-defined]


async def test_realised_rates_give_unbiased_estimates_where_nominal_ones_do_not(tmp_path: Path) -> None:
    traces, labels, truth = _world()
    realised = sum(lb.source == "shadow" for lb in labels) / sum(t.accepted_stage == 0 for t in traces)
    assert 0.04 < realised < 0.06  # far below the nominal 0.2
    url = sqlite_url(tmp_path)
    store = Store(url)
    await store.open()
    await store.write(traces, labels)
    # The tuner's path: the incremental reader, no decay.
    history = History("default", "fp", 2, keep=0)
    await history.update(store)
    tuned = history.rows(half_life=0, window=0, pass_score=0.5)
    # cascade calibrate's path: everything labelled, with the counts of requests per accepted stage.
    full = await store.labelled("default", "fp")
    calibrated = assemble(full, 2)
    # The old weighting: the stored nominal 1/shadow_rate.
    nominal = assemble(LabelledData(full.traces, full.attempts, full.labels), 2)
    await store.close()

    assert tuned.rates[0] == pytest.approx(realised) and tuned.rates[1] == 1.0
    for rows in (tuned, calibrated):
        e = _at_t(rows)
        assert e.accept[0] == pytest.approx(truth["accept"], abs=0.005)
        assert e.quality == pytest.approx(truth["quality"], abs=0.015)  # ~2 SE with ~500 shadow labels
        assert e.cost == pytest.approx(truth["cost"], rel=0.01)
    old = _at_t(nominal)
    assert truth["accept"] - old.accept[0] > 0.2  # the accepted share is weighted 4x too little
    assert abs(old.quality - truth["quality"]) > 0.03
    assert old.cost / truth["cost"] - 1 > 0.3  # and escalation looks far more common than it is


def test_the_realised_rate_estimate_is_unbiased_over_many_worlds() -> None:
    """Mean error of the quality estimate over 40 smaller worlds: within 1.5 standard errors of 0."""
    from app.learning.calibration import make_entry, weigh

    errors = []
    for seed in range(40):
        rng = random.Random(seed)
        entries, population, good = [], [], 0.0
        for i in range(2000):
            s = rng.random()
            ok0 = float(rng.random() < 0.3 + 0.65 * s)
            early = s >= T
            population.append((i, 0 if early else 1))
            good += ok0 if early else 1.0
            atts = {0: ("accepted" if early else "rejected", s, C0)}
            if not early:
                atts[1] = ("accepted", None, C1)
                labels = [("free", 0, ok0, 1.0, 0.0)]
            elif rng.random() < 0.05:
                labels = [("shadow", 0, ok0, 5.0, C1)]
            else:
                continue
            e = make_entry(i, 2, 0 if early else 1, C1, atts, labels, 2)
            assert e is not None
            entries.append(e)
        est = _at_t(weigh(entries, 2, population)).quality
        errors.append(est - good / 2000)
    mean = sum(errors) / len(errors)
    sd = (sum((x - mean) ** 2 for x in errors) / (len(errors) - 1)) ** 0.5
    assert abs(mean) < 1.5 * sd / len(errors) ** 0.5 + 1e-3


def test_rates_that_change_with_the_thresholds_are_measured_along_the_stream() -> None:
    """First a strict threshold (0.8) while label calls are easy to afford (rate 0.5), then a loose one
    (0.2) while a spend cap holds them to 0.02: one rate for the whole window over-weights the strict
    era's good early answers and overstates the quality; rates per stretch of the stream do not."""
    from collections import Counter

    from app.learning.calibration import make_entry, weigh

    rng = random.Random(8)
    entries, population, truth = [], [], []
    for i in range(60_000):
        t, rate = (0.8, 0.5) if i < 30_000 else (0.2, 0.02)
        s = rng.random()
        ok0 = float(rng.random() < s * s)
        early = s >= t
        population.append((i, 0 if early else 1))
        truth.append(ok0 if s >= 0.5 else 1.0)  # the quality at a candidate threshold of 0.5
        atts = {0: ("accepted" if early else "rejected", s, C0)}
        if not early:
            atts[1] = ("accepted", None, C1)
            labels = [("free", 0, ok0, 1.0, 0.0)]
        elif rng.random() < rate:
            labels = [("shadow", 0, ok0, 1 / rate, C1)]
        else:
            continue
        e = make_entry(i, 2, 0 if early else 1, C1, atts, labels, 2)
        assert e is not None
        entries.append(e)
    true_q = sum(truth) / len(truth)

    def q(rows: object) -> float:
        return evaluate_cascade(rows.scores, rows.correct, rows.cost, [0.5], rows.weights).quality  # type: ignore[attr-defined]

    counts = Counter(k for _, k in population)
    pooled = q(weigh(entries, 2, dict(counts)))  # one rate per stage over the window
    along = q(weigh(entries, 2, population))  # the tuner's: per stretch of the stream
    assert abs(along - true_q) < 0.01
    assert pooled - true_q > 0.015
