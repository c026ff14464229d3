"""Honest fitting: the bootstrap search measures its own optimism; cross-fitted scores are calibrated."""

from __future__ import annotations

import math

import numpy as np
import pytest

from app.learning.crossfit import crossfit, fold_ids
from app.learning.search import Search, policy_grid, reference_quality, replicate_weights
from app.learning.thresholds import candidate_thresholds, evaluate_cascade


def test_policy_grid_matches_evaluate_cascade_for_every_combination() -> None:
    rng = np.random.default_rng(3)
    n = 120
    s = rng.random((n, 2))
    s[5, 0] = np.nan  # a failed attempt: never accepted
    c = (rng.random((n, 3)) < [0.5, 0.7, 0.9]).astype(float)
    k = rng.random((n, 3)) * [1.0, 3.0, 10.0]
    w = rng.random(n) + 0.5
    cands = [candidate_thresholds(s[:, 0], 6), candidate_thresholds(s[:, 1], 5)]
    W = np.stack([np.ones(n), w], axis=1)
    grid = policy_grid(s, c, k, cands, W)
    assert grid.size == len(cands[0]) * len(cands[1])
    full = np.concatenate([s, np.zeros((n, 1))], axis=1)
    for g in range(grid.size):
        t = list(grid.thresholds[g])
        for col, weights in ((0, None), (1, w)):
            ev = evaluate_cascade(full, c, k, t, weights)
            assert grid.quality[g, col] == pytest.approx(ev.quality, abs=1e-6)
            assert grid.cost[g, col] == pytest.approx(ev.cost, rel=1e-5)


def test_replicate_weights_are_bootstraps_and_out_of_bag_rows() -> None:
    W = replicate_weights(50, replicates=8, seed=1, weights=np.full(50, 2.0))
    assert W.shape == (50, 17)
    assert np.all(W[:, 0] == 2.0)
    boot, oob = W[:, 1:9], W[:, 9:]
    assert np.allclose(boot.sum(axis=0), 100.0)  # n draws of weight 2
    assert np.all((boot > 0) == (oob == 0))  # out of bag: exactly the rows not drawn
    assert np.array_equal(W, replicate_weights(50, replicates=8, seed=1, weights=np.full(50, 2.0)))


def _noise_search(margin_z: float, seed: int) -> tuple[Search, int]:
    """30 cheap models, each right 70 % of the time, with scores that carry no information, and one
    model that is always right. Every chain's true quality at stage-0 accept share a is 1 - 0.3 a."""
    rng = np.random.default_rng(seed)
    n = 300
    big = np.ones(n)
    W = replicate_weights(n, replicates=48, seed=seed)
    search = Search(reference_quality(big, W), target=0.9, margin_z=margin_z)
    for i in range(30):
        s = rng.random(n)
        ok = (rng.random(n) < 0.7).astype(float)
        grid = policy_grid(
            s[:, None],
            np.stack([ok, big], axis=1),
            np.stack([np.full(n, 1.0), np.full(n, 10.0)], axis=1),
            [candidate_thresholds(s, 40)],
            W,
        )
        search.add((f"cheap{i}", "big"), grid)
    return search, n


def _true_quality(threshold: float) -> float:
    accept = 1.0 - min(1.0, max(0.0, threshold))  # scores are uniform on [0, 1]
    return 1.0 - 0.3 * accept


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_search_measures_its_optimism_and_pays_for_it(seed: int) -> None:
    search, _ = _noise_search(margin_z=0.0, seed=seed)
    naive = search.result(correct_optimism=False)
    honest = search.result()
    assert naive.feasible and honest.feasible
    # Picking the cheapest of 30 equally useless scorers picks luck: on new rows the naive pick falls
    # short of the target; the optimism it measured is positive and the honest pick pays it.
    assert _true_quality(naive.thresholds[0]) < 0.9
    assert search.optimism > 0.005
    assert honest.aim == pytest.approx(0.9 + search.optimism)
    assert _true_quality(honest.thresholds[0]) > _true_quality(naive.thresholds[0])
    assert _true_quality(honest.thresholds[0]) >= 0.9 - 0.015
    assert honest.quality_corrected == pytest.approx(honest.quality - search.optimism)


def test_margin_keeps_standard_errors_above_the_aim() -> None:
    search, _ = _noise_search(margin_z=1.0, seed=4)
    pick = search.result()
    assert pick.quality >= pick.aim + pick.se - 1e-9
    assert pick.se > 0


def test_nothing_reaches_the_target_gives_the_most_accurate() -> None:
    n = 50
    W = replicate_weights(n, replicates=4, seed=0)
    ref = np.ones(n)
    search = Search(reference_quality(ref, W), target=1.0)
    for name, acc in (("a", 0.5), ("b", 0.8)):
        ok = (np.arange(n) < acc * n).astype(float)
        search.add((name,), policy_grid(np.zeros((n, 0)), ok, np.ones(n), [], W))
    pick = search.result()
    assert not pick.feasible and pick.chain == ("b",)


def test_a_chain_whose_first_stage_serves_every_row_loses_to_that_model_alone() -> None:
    """Equal policies (a three-model chain whose first stage accepts every row is its first model alone)
    whose float32 costs differ in the 8th digit: the fewer stages win, whichever order they came in."""
    rng = np.random.default_rng(0)
    n = 1000
    W = replicate_weights(n, replicates=8, seed=0)
    right = (rng.random((n, 3)) < [0.9, 0.7, 0.8]).astype(float)
    cost = rng.random((n, 3)) * [1e-4, 1e-4, 1e-3]
    scores = rng.random((n, 2))
    ref = reference_quality(right, W)
    alone = policy_grid(np.zeros((n, 0)), right[:, :1], cost[:, :1], [], W)
    chain = policy_grid(scores, right, cost, [[-math.inf, 0.5], [0.5, math.inf]], W)
    # the chain's accept-everything policies cost exactly the first model's, up to float32 rounding
    np.testing.assert_allclose(chain.cost[:2, 0], alone.cost[0, 0], rtol=1e-6)
    for order in ((("a", "b", "c"), chain), (("a",), alone)), ((("a",), alone), (("a", "b", "c"), chain)):
        search = Search(ref, target=0.95, margin_z=0.0)
        for name, grid in order:
            # the longer chain a hair cheaper than the model alone: rounding must not decide
            if len(name) == 3:
                grid.cost[:2] = np.minimum(grid.cost[:2], alone.cost[0] * (1 - 1e-7))
            search.add(name, grid)
        pick = search.result(correct_optimism=False)
        assert pick.feasible and pick.chain == ("a",), order
        assert search.frontier()[0]["models"] == ["a"]


def test_where_no_model_is_ever_right_the_cheapest_policy_is_chosen() -> None:
    """Every answer wrong: every policy is as good as the best model (1.0, as the replay report says),
    so the target is met by the cheapest, with the fewest stages among equal costs; the search said
    "nothing reaches the target" and, every policy tied at 0, kept a three-model chain."""
    n = 60
    W = replicate_weights(n, replicates=4, seed=0)
    wrong = np.zeros((n, 3))
    cost = np.tile([1e-5, 1e-4, 1e-3], (n, 1))
    search = Search(reference_quality(wrong, W), target=0.95)
    chain = policy_grid(np.zeros((n, 2)), wrong, cost, [[-math.inf, math.inf]] * 2, W)
    chain.cost[:] = np.minimum(chain.cost, 1e-5 * (1 - 1e-7))  # a hair under the first model's alone
    search.add(("a", "b", "c"), chain)
    search.add(("a",), policy_grid(np.zeros((n, 0)), wrong[:, :1], cost[:, :1], [], W))
    search.add(("c",), policy_grid(np.zeros((n, 0)), wrong[:, 2:], cost[:, 2:], [], W))
    pick = search.result()
    assert pick.feasible and pick.chain == ("a",) and pick.quality == 1.0


def test_when_nothing_reaches_the_aim_equal_policies_go_to_the_fewer_stages() -> None:
    n = 50
    W = replicate_weights(n, replicates=4, seed=0)
    right = np.zeros((n, 2))
    right[: n // 2] = 1.0  # both models right on the same half: every policy at 1.0, under the target
    cost = np.tile([1e-5, 1e-3], (n, 1))
    alone = policy_grid(np.zeros((n, 0)), right[:, :1], cost[:, :1], [], W)
    chain = policy_grid(np.zeros((n, 1)), right, cost, [[-math.inf]], W)  # stage 0 accepts every row
    chain.cost[:] = np.minimum(chain.cost, alone.cost[0] * (1 - 1e-7))
    search = Search(reference_quality(right, W), target=1.5)
    search.add(("a", "b"), chain)
    search.add(("a",), alone)
    pick = search.result()
    assert not pick.feasible and pick.chain == ("a",)


def test_the_shortlist_counts_chains_that_serve_their_first_models_alone_once() -> None:
    """The quick pass keeps the chains worth a bootstrap search. Chains whose first stage takes every
    request at the lower aim are that model alone: five of them filled a list of two and crowded out the
    chain that differs (b -> c), and the cheapest chain at the higher aim (d, the aim the final choice
    pays its optimism over) was not in it either. Merged (what a search with four-stage chains does),
    both are in."""
    from app.learning.search import PolicyGrid

    def grid(thresholds: list[list[float]], quality: list[float], cost: list[float]) -> PolicyGrid:
        return PolicyGrid(
            np.asarray(thresholds, dtype=float).reshape(len(quality), -1),
            np.asarray(quality)[:, None],
            np.asarray(cost)[:, None],
        )

    search = Search(np.ones(1), target=0.9, margin_z=0.0)
    search.add(("a",), grid([[]], [0.88], [1.0]))
    for x in range(5):  # a's answer served to every request, or escalated at 0.5
        search.add(("a", f"x{x}"), grid([[-math.inf], [0.5]], [0.88, 0.89], [1.0, 1.3]))
    search.add(("b", "c"), grid([[-math.inf], [0.4]], [0.85, 0.90], [0.9, 1.2]))
    for name, q, c in (("d", 0.93, 2.0), ("e", 0.95, 3.0), ("f", 0.96, 5.0), ("g", 0.97, 6.0)):
        search.add((name,), grid([[]], [q], [c]))
    assert search.shortlist(limit=2, above_limit=1, merge_prefixes=True) == [
        ("a",), ("b", "c"), ("d",), ("g",), ("f",), ("e",)
    ]  # fmt: skip
    # as three-stage searches keep it: the duplicates fill the list
    assert search.shortlist(limit=2) == [("a",), ("a", "x0"), ("g",), ("f",), ("e",)]


def test_crossfit_scores_are_calibrated_probabilities() -> None:
    rng = np.random.default_rng(0)
    n, d = 1200, 6
    X = rng.normal(size=(n, d))
    p = 1.0 / (1.0 + np.exp(-(0.3 + X[:, 0] - 0.8 * X[:, 1])))
    y = (rng.random(n) < p).astype(float)
    cf = crossfit(X, y, fold_ids(n, 5, seed=0, strata=y), l2=1.0)
    assert cf.oof.mean() == pytest.approx(y.mean(), abs=0.02)
    Xn = rng.normal(size=(4000, d))
    pn = 1.0 / (1.0 + np.exp(-(0.3 + Xn[:, 0] - 0.8 * Xn[:, 1])))
    pred = np.asarray(cf.model.predict_proba_many(Xn.tolist()))
    # the served model's output is P(correct): binned, it matches the true probability
    for lo in (0.1, 0.3, 0.5, 0.7):
        sel = (pred >= lo) & (pred < lo + 0.2)
        assert sel.sum() > 100
        assert pred[sel].mean() == pytest.approx(pn[sel].mean(), abs=0.05)
    assert cf.model.meta["calibration"]["method"] == "platt-oof"
    assert cf.platt[0] > 0


def test_crossfit_on_noise_predicts_the_base_rate() -> None:
    rng = np.random.default_rng(1)
    X = rng.normal(size=(300, 4))
    y = (rng.random(300) < 0.3).astype(float)
    cf = crossfit(X, y, fold_ids(300, 5, seed=1), l2=10.0)
    assert float(np.std(cf.oof)) < 0.1 and cf.oof.mean() == pytest.approx(0.3, abs=0.05)


def test_fold_ids_are_stratified_and_seeded() -> None:
    y = np.array([0] * 30 + [1] * 20)
    f = fold_ids(50, 5, seed=2, strata=y)
    for k in range(5):
        assert (f[y == 1] == k).sum() == 4 and (f[y == 0] == k).sum() == 6
    assert np.array_equal(f, fold_ids(50, 5, seed=2, strata=y))
    assert not math.isnan(float(f.mean()))
