import math

import numpy as np
import pytest

from app.learning.thresholds import (
    best_single_model,
    candidate_thresholds,
    choose_thresholds,
    evaluate_cascade,
    search_cascades,
    single_model_stats,
)


def _two_stage_case() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # 10 rows; the cheap model is right exactly when its score >= 0.5 (rows 0..5), the big one always.
    s0 = np.array([0.9, 0.8, 0.7, 0.65, 0.6, 0.55, 0.4, 0.3, 0.2, 0.1])
    c0 = np.array([1, 1, 1, 1, 1, 1, 0, 0, 0, 0], dtype=float)
    scores = np.stack([s0, np.zeros(10)], axis=1)
    correct = np.stack([c0, np.ones(10)], axis=1)
    cost = np.tile([1.0, 10.0], (10, 1))
    return scores, correct, cost


def test_evaluate_cascade() -> None:
    s, c, k = _two_stage_case()
    e = evaluate_cascade(s, c, k, [0.55])
    assert e.quality == pytest.approx(1.0)
    assert e.cost == pytest.approx(1.0 + 0.4 * 10.0)
    assert e.reach == pytest.approx((1.0, 0.4))
    e_all = evaluate_cascade(s, c, k, [math.inf])
    assert e_all.quality == pytest.approx(1.0) and e_all.cost == pytest.approx(11.0)
    e_none = evaluate_cascade(s, c, k, [-math.inf])
    assert e_none.quality == pytest.approx(0.6) and e_none.cost == pytest.approx(1.0)


def test_choose_thresholds_known_answer() -> None:
    s, c, k = _two_stage_case()
    r = choose_thresholds(s, c, k, target_quality=1.0)
    assert r.feasible
    assert r.best.thresholds == (0.55,)
    assert r.best.cost == pytest.approx(5.0)
    r90 = choose_thresholds(s, c, k, target_quality=0.9)
    assert r90.best.thresholds == (0.4,)  # accept 7 rows, 1 of them wrong
    assert r90.best.quality == pytest.approx(0.9)
    assert r90.best.cost == pytest.approx(1.0 + 0.3 * 10.0)
    # the table is a Pareto frontier, increasing in cost and quality
    costs = [e.cost for e in r.table]
    quals = [e.quality for e in r.table]
    assert costs == sorted(costs) and quals == sorted(quals)


def test_choose_thresholds_infeasible_returns_most_accurate() -> None:
    s, c, k = _two_stage_case()
    c2 = c.copy()
    c2[:, 1] = 0.5
    r = choose_thresholds(s, c2, k, target_quality=0.99)
    assert not r.feasible
    assert r.best.quality == pytest.approx(0.6 * 1 + 0.4 * 0.5)


def test_weights_change_the_choice() -> None:
    s, c, k = _two_stage_case()
    w = np.ones(10)
    w[6] = 100.0  # row 6 (cheap model wrong, score 0.4) dominates
    r = choose_thresholds(s, c, k, target_quality=0.95, weights=w)
    assert r.best.thresholds[0] > 0.4


def test_margin_z_is_more_conservative() -> None:
    rng = np.random.default_rng(3)
    n = 400
    s = rng.random((n, 2))
    c = np.stack([(rng.random(n) < s[:, 0]).astype(float), (rng.random(n) < 0.9).astype(float)], axis=1)
    k = np.tile([1.0, 10.0], (n, 1))
    loose = choose_thresholds(s, c, k, 0.8)
    tight = choose_thresholds(s, c, k, 0.8, margin_z=2.0)
    assert tight.best.cost >= loose.best.cost
    assert tight.best.quality - 2.0 * tight.best.quality_se >= 0.8 - 1e-9
    direct = evaluate_cascade(s, c, k, tight.best.thresholds)
    assert direct.quality == pytest.approx(tight.best.quality)
    assert direct.quality_se == pytest.approx(tight.best.quality_se)


def test_three_stage_exhaustive_matches_brute_force() -> None:
    rng = np.random.default_rng(7)
    n = 60
    s = rng.random((n, 3))
    c = (rng.random((n, 3)) < [0.5, 0.7, 0.95]).astype(float)
    k = np.tile([1.0, 3.0, 20.0], (n, 1))
    r = choose_thresholds(s, c, k, 0.8, n_candidates=8)
    c0 = candidate_thresholds(s[:, 0], 8)
    c1 = candidate_thresholds(s[:, 1], 8)
    best = None
    for t0 in c0:
        for t1 in c1:
            e = evaluate_cascade(s, c, k, [t0, t1])
            if e.quality >= 0.8 - 1e-12 and (best is None or e.cost < best.cost - 1e-12):
                best = e
    assert best is not None
    assert r.best.cost == pytest.approx(best.cost)
    assert r.best.quality >= 0.8 - 1e-12


def test_search_cascades_finds_cheap_agreement_chain() -> None:
    rng = np.random.default_rng(0)
    n = 300
    truth_ok = rng.random(n)
    correct = {
        "tiny": (truth_ok < 0.6).astype(float),
        "small": (truth_ok < 0.7).astype(float),
        "big": np.ones(n),
    }
    cost = {"tiny": np.full(n, 1.0), "small": np.full(n, 2.0), "big": np.full(n, 50.0)}

    def score_fn(chain: tuple[str, ...]) -> np.ndarray:
        # an oracle-ish score: the stage model's own correctness, slightly noisy
        return correct[chain[-1]] * 0.8 + rng.random(n) * 0.1

    stats = single_model_stats(correct, cost)
    assert best_single_model(stats) == "big"
    res = search_cascades(["tiny", "small", "big"], correct, cost, score_fn, target_quality=1.0)
    assert res.best.feasible
    assert res.best.models[-1] == "big"
    assert res.best.cost < 50.0
    assert res.best.models[0] == "tiny"
    assert len(res.candidates) == 7  # 3 singles + 3 pairs + 1 triple, cost-ordered
