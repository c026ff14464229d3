"""What a replayed cascade is measured against: simple rules and bounds on the same test rows.

Every figure is relative to the best single model on the same rows (``quality_vs_best`` = accuracy /
its accuracy, ``savings_vs_best`` = 1 - cost / its cost), as the replay report's own figures are.

* ``agreement``: the one-line rule on the cascade's chain: ask its first two models, serve the first
  answer when the second gives the same answer (``app.answers.normalize_answer``), else ask the last
  model. A chain of two models has no middle: the rule then uses the dataset model that makes it
  cheapest at the target on the train rows (``agreement_middle``). ``None`` for one-model cascades.
* ``random``: the chain with each stage accepting at random, at the cascade's own reach (share of
  requests reaching each stage; with a router, the same share sent straight to the last stage, at
  random too): what the cascade's escalation rate is worth without its scores. An expectation, not a
  draw.
* ``oracle_chain``: the chain with a perfect scorer: per row the first stage whose answer is correct.
* ``oracle_all``: per row the cheapest correct model of the whole dataset (a perfect router).
* ``best_single``: the reference itself (1.0, 0.0).
* ``learned_at_agreement_quality``: the cascade's own chain and scorers with thresholds swept *on the
  test rows* to the cheapest setting at least as accurate as the agreement rule there: the scorers'
  worth at equal quality (a description, not a fit: the cascade's own figures are the honest ones).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from app.answers import agrees
from app.learning.rows import Row
from app.replay.dataset import best_single, model_summary, oracle, quality_vs_best, savings_vs_best


def _rel(acc: float, cost: float, best_acc: float, best_cost: float) -> dict[str, float | None]:
    return {
        "quality_vs_best": quality_vs_best(acc, best_acc),
        "savings_vs_best": savings_vs_best(cost, best_cost),
        "accuracy": acc,
        "cost_usd": cost,
    }


def agreement_rule(rows: Sequence[Row], a: str, b: str, c: str) -> tuple[float, float]:
    """(accuracy, mean cost) of: serve ``a`` when ``b`` agrees with it, else ask ``c``."""
    if not rows:
        return 0.0, 0.0
    acc = cost = 0.0
    for r in rows:
        x, y = r.answers[a], r.answers[b]
        same = agrees(y.answer, [x.answer], r.prompt)
        cost += x.cost_usd + y.cost_usd
        if same:
            acc += float(x.correct)
        else:
            cost += r.answers[c].cost_usd
            acc += float(r.answers[c].correct)
    return acc / len(rows), cost / len(rows)


def agreement_middle(
    train: Sequence[Row], models: Sequence[str], first: str, last: str, target_quality: float
) -> str | None:
    """For a two-model chain: the middle model whose agreement rule is cheapest on ``train`` at
    ``target_quality`` x the best single model's accuracy there (else the most accurate rule)."""
    others = [m for m in models if m not in (first, last)]
    if not others or not train:
        return None
    summ = model_summary(train, models)
    goal = target_quality * summ[best_single(summ)].accuracy
    scored = [(m, *agreement_rule(train, first, m, last)) for m in others]
    ok = [s for s in scored if s[1] >= goal]
    if ok:
        return min(ok, key=lambda s: (s[2], -s[1]))[0]
    return max(scored, key=lambda s: (s[1], -s[2]))[0]


def oracle_chain(rows: Sequence[Row], chain: Sequence[str]) -> tuple[float, float]:
    """(accuracy, mean cost) of the chain with a perfect scorer."""
    if not rows:
        return 0.0, 0.0
    acc = cost = 0.0
    for r in rows:
        for k, m in enumerate(chain):
            cost += r.answers[m].cost_usd
            if r.answers[m].correct or k == len(chain) - 1:
                acc += float(r.answers[m].correct)
                break
    return acc / len(rows), cost / len(rows)


def random_at_reach(
    rows: Sequence[Row], chain: Sequence[str], reach: Sequence[float], routed: float = 0.0
) -> tuple[float, float]:
    """Expected (accuracy, mean cost) of the chain accepting at random with the given reach.

    ``reach[k]``: the share of requests that called stage ``k``, as a replay report counts it: with a
    router, ``routed`` of them went straight to the last stage, so the first stage's reach is
    ``1 - routed`` and the last stage's includes them. The random policy routes the same share (at
    random, too) and escalates the rest at the cascade's own rates."""
    if not rows or not chain:
        return 0.0, 0.0
    summ = model_summary(rows, chain)
    last = len(chain) - 1
    reach = [*list(reach)[: len(chain)], *([0.0] * (len(chain) - len(reach)))]
    if last == 0:
        return summ[chain[0]].accuracy, summ[chain[0]].mean_cost_usd
    # Shares of the requests the router did not send past the chain, reaching each stage: never
    # increasing along the chain, whatever rounding left in the counts.
    flow = [1.0 - routed, *reach[1:last], max(0.0, reach[last] - routed)]
    for k in range(1, len(flow)):
        flow[k] = min(max(0.0, flow[k]), flow[k - 1])
    acc = cost = 0.0
    for k, m in enumerate(chain):
        served = flow[k] - (flow[k + 1] if k < last else 0.0)
        acc += served * summ[m].accuracy
        cost += flow[k] * summ[m].mean_cost_usd
    acc += routed * summ[chain[last]].accuracy
    cost += routed * summ[chain[last]].mean_cost_usd
    return acc, cost


def baselines(
    test: Sequence[Row],
    models: Sequence[str],
    chain: Sequence[str],
    reach: Sequence[float],
    *,
    train: Sequence[Row] = (),
    target_quality: float = 0.95,
    routed: float = 0.0,
) -> dict[str, Any]:
    """The ``"baselines"`` object of a replay report (see the module doc)."""
    summ = model_summary(test, models)
    bs = best_single(summ)
    ba, bc = summ[bs].accuracy, summ[bs].mean_cost_usd
    out: dict[str, Any] = {"best_single": {**_rel(ba, bc, ba, bc), "model": bs}}
    if len(chain) >= 3:
        a, b, c = chain[0], chain[1], chain[-1]
    elif len(chain) == 2:
        mid = agreement_middle(train or test, models, chain[0], chain[-1], target_quality)
        a, b, c = (chain[0], mid, chain[-1]) if mid is not None else ("", "", "")
    else:
        a = b = c = ""
    if a:
        out["agreement"] = {**_rel(*agreement_rule(test, a, b, c), ba, bc), "chain": [a, b, c]}
    else:
        out["agreement"] = None
    out["random"] = _rel(*random_at_reach(test, chain, reach, routed), ba, bc)
    out["oracle_chain"] = _rel(*oracle_chain(test, chain), ba, bc)
    orc = oracle(test, models)
    out["oracle_all"] = _rel(orc.accuracy, orc.mean_cost_usd, ba, bc)
    return out


def learned_at_quality(
    test: Sequence[Row],
    models: Sequence[str],
    chain: Sequence[str],
    scores: Sequence[Sequence[float]],
    quality_vs_best: float,
) -> dict[str, float | None] | None:
    """The chain with ``scores`` (per test row, one per scored stage) at the cheapest thresholds whose
    accuracy relative to the best single model on ``test`` is at least ``quality_vs_best``."""
    import numpy as np

    from app.learning.search import policy_grid
    from app.learning.thresholds import candidate_thresholds

    if len(chain) < 2 or not test:
        return None
    summ = model_summary(test, models)
    bs = best_single(summ)
    ba, bc = summ[bs].accuracy, summ[bs].mean_cost_usd
    s = np.asarray(scores, dtype=np.float64).reshape(len(test), len(chain) - 1)
    c = np.asarray([[1.0 if r.answers[m].correct else 0.0 for m in chain] for r in test])
    k = np.asarray([[r.answers[m].cost_usd for m in chain] for r in test])
    cands = [candidate_thresholds(s[:, j], 60) for j in range(len(chain) - 1)]
    grid = policy_grid(s, c, k, cands, np.ones((len(test), 1)))
    ok = grid.quality[:, 0] >= quality_vs_best * ba - 1e-12
    if not ok.any():
        return None
    g = int(np.argmin(np.where(ok, grid.cost[:, 0], np.inf)))
    return _rel(float(grid.quality[g, 0]), float(grid.cost[g, 0]), ba, bc)
