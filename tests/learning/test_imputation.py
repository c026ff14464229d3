"""A middle stage a request never reached (an earlier stage accepted it) is filled in from donors
(``app.learning.calibration``, hot-deck): the requests that reached it whose previous stage scored
closest. A simulation of three stages where the easy requests (high first-stage score) are also the
ones the middle stage answers well: a fit that considers sending more of them to the middle stage must
not judge them by the hard requests that got there before. Donors are an extrapolation too, the better
the nearer the thresholds in force (where the tuner moves, ``max_step`` at a time): in this world the
estimate is 0.002-0.009 off for a first threshold 0.05-0.3 above the one in force and 0.023 off at 0.4,
where the stage's mean label was 0.013-0.14 off.
"""

from __future__ import annotations

import random

import pytest

from app.learning import calibration
from app.learning.calibration import make_entry, weigh
from app.learning.thresholds import evaluate_cascade

N = 20_000
T0, T1 = 0.5, 0.5  # in force while the labels were gathered
C = (1e-6, 1e-5, 1e-4)
RATE = 0.2


def _world(seed: int = 5) -> tuple[list, list, list]:
    """Entries and population as the tuner sees them, and every request's full truth."""
    rng = random.Random(seed)
    entries, population, truth = [], [], []
    for i in range(N):
        s0 = rng.random()
        s1 = 0.6 * s0 + 0.4 * rng.random()
        ok0 = float(rng.random() < 0.3 + 0.65 * s0)
        ok1 = float(rng.random() < 0.4 + 0.55 * s0)  # the middle stage does well where stage 0 does
        truth.append((s0, s1, ok0, ok1))
        accepted = 0 if s0 >= T0 else (1 if s1 >= T1 else 2)
        population.append((i, accepted))
        atts = {0: ("accepted" if accepted == 0 else "rejected", s0, C[0])}
        if accepted >= 1:
            atts[1] = ("accepted" if accepted == 1 else "rejected", s1, C[1])
        if accepted == 2:
            atts[2] = ("accepted", None, C[2])
            labels = [("free", 0, ok0, 1.0, 0.0), ("free", 1, ok1, 1.0, 0.0)]
        elif rng.random() < RATE:
            labels = [
                ("shadow", k, (ok0, ok1)[k], 1 / RATE, C[2] if k == 0 else 0.0) for k in range(accepted + 1)
            ]
        else:
            continue
        e = make_entry(i, 3, accepted, C[2], atts, labels, 3)
        assert e is not None
        entries.append(e)
    return entries, population, truth


def _true_quality(truth: list, t: tuple[float, float]) -> float:
    good = 0.0
    for s0, s1, ok0, ok1 in truth:
        good += ok0 if s0 >= t[0] else (ok1 if s1 >= t[1] else 1.0)
    return good / len(truth)


@pytest.mark.parametrize("t", [(0.6, 0.5), (0.7, 0.6), (0.5, 0.4)])
def test_never_reached_middle_stage_is_estimated_from_its_nearest_donors(
    t: tuple[float, float], monkeypatch: pytest.MonkeyPatch
) -> None:
    entries, population, truth = _world()
    want = _true_quality(truth, t)
    rows = weigh(entries, 3, population)
    got = evaluate_cascade(rows.scores, rows.correct, rows.cost, list(t), rows.weights).quality
    assert got == pytest.approx(want, abs=0.015)
    assert rows.n == len(entries)  # requests, not the rows their donors added
    if t[0] <= T0:
        return  # stage 0 accepts no more than in force: nothing to fill in, either way
    # The stage's plain mean label (what filled it in before) judges the easy requests by the hard ones.
    monkeypatch.setattr(calibration, "DONORS", 0)
    rows = weigh(entries, 3, population)
    old = evaluate_cascade(rows.scores, rows.correct, rows.cost, list(t), rows.weights).quality
    assert want - old > 0.02


def test_donor_copies_are_resampled_together_in_the_honest_fit() -> None:
    entries, population, _ = _world()
    rows = weigh(entries, 3, population)
    assert rows.origin is not None and rows.scores.shape[0] > rows.n
    cal = calibration.fit(rows, 0.9, margin_z=0.0, honest=True, replicates=16)
    assert 0.0 <= cal.optimism < 0.05
    assert cal.chosen.quality >= 0.9 - 1e-9
