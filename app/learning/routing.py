"""Route-then-cascade: a prompt-only router that sends a request straight to the last stage when the
earlier stages are predicted to be rejected anyway (no wasted cheap call, no wasted latency).

Fitted after the cascade (chain, scorers, thresholds) is chosen, on the same rows: the label of a row is
whether the chosen policy, on the cross-fitted scores, sent it to the last stage; the router is a
calibrated logistic model on :mod:`app.scoring.prompt_features`, cross-fitted like the stage scorers.
Then the router threshold and the stage thresholds are searched together (:mod:`app.learning.search`,
``inf`` = route nothing among the candidates), with at least the main search's optimism to pay. The
router is kept only when that search picks a finite router threshold that routes some rows: it must
pay for itself on the rows, after the optimism, or it is reported as not chosen, with the reason.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from app.learning.crossfit import crossfit
from app.learning.rows import Row
from app.learning.search import Pick, Search, policy_grid
from app.learning.thresholds import candidate_thresholds, served_stages
from app.scoring.feature_spec import FeatureSpec
from app.scoring.model import LogisticModel
from app.scoring.prompt_features import request_prompt_features

ROUTER_SPEC = FeatureSpec(hash_dim=32, prompt_tail_chars=600, kind="prompt")
ROUTE_CANDIDATES = 12
STAGE_CANDIDATES = 24
MIN_SHARE = 0.02  # fewer rows than this reaching (or skipping) the last stage: nothing to learn


@dataclass
class RouterFit:
    chosen: bool
    reason: str
    model: LogisticModel | None = None
    threshold: float = math.inf  # route when P(the last stage will answer) >= threshold
    pick: Pick | None = None  # the joint pick (router threshold first) when chosen
    cost_without: float = 0.0  # mean cost per row on the fitting rows, the cascade alone
    cost_with: float = 0.0  # ... with the router
    routed_share: float = 0.0  # share of fitting rows the router sends straight to the last stage
    info: dict[str, Any] = field(default_factory=dict)
    oof: Any = None  # the router's cross-fitted scores on the fitting rows

    def to_dict(self) -> dict[str, Any]:
        return {
            "chosen": self.chosen,
            "reason": self.reason,
            "threshold": None if math.isinf(self.threshold) else self.threshold,
            "train_cost_usd_without": self.cost_without,
            "train_cost_usd_with": self.cost_with,
            "train_routed_share": self.routed_share,
            **self.info,
        }


def request_for(prompt: str) -> dict[str, Any]:
    """The chat request a recorded row stands for (what replay sends, what serving scores)."""
    return {"messages": [{"role": "user", "content": prompt}]}


def fit_router(
    rows: Sequence[Row],
    scores: Any,
    correct: Any,
    cost: Any,
    stage_pick: Pick,
    W: Any,
    reference: Any,
    target: float,
    *,
    margin_z: float,
    folds: Any,
    l2: float,
    weights: Any = None,
) -> RouterFit:
    """Fit the router of ``stage_pick``'s chain; ``scores`` ``(n, K-1)`` are its cross-fitted scores."""
    s = np.asarray(scores, dtype=np.float64)
    c = np.asarray(correct, dtype=np.float64)
    k = np.asarray(cost, dtype=np.float64)
    K = c.shape[1]
    if K < 2:
        return RouterFit(False, "a one-model cascade has nothing to skip")
    served = served_stages(s, stage_pick.thresholds[: K - 1])
    y = (served == K - 1).astype(np.float64)
    share = float(y.mean())
    if share < MIN_SHARE or share > 1.0 - MIN_SHARE:
        return RouterFit(
            False, f"{share:.1%} of the rows reach the last stage: nothing for a router to learn"
        )
    X = np.asarray(
        [request_prompt_features(request_for(r.prompt), ROUTER_SPEC) for r in rows], dtype=np.float64
    )
    cf = crossfit(X, y, folds, l2=l2, weights=weights, feature_spec=ROUTER_SPEC, meta={"router": True})
    route_cands = sorted(
        {float(x) for x in np.quantile(cf.oof, np.linspace(0.5, 0.98, ROUTE_CANDIDATES - 1))} | {math.inf}
    )
    stage_cands = [candidate_thresholds(s[:, j], STAGE_CANDIDATES) for j in range(K - 1)]
    search = Search(np.asarray(reference), target, margin_z)
    search.add(
        stage_pick.chain, policy_grid(s, c, k, stage_cands, W, route=cf.oof, route_candidates=route_cands)
    )
    pick = search.result(min_optimism=stage_pick.optimism)
    base_cost = float(stage_pick.cost)
    rho = pick.thresholds[0]
    routed = float((cf.oof >= rho).mean()) if math.isfinite(rho) else 0.0
    info = {"router_oof_auc": auc(cf.oof, y), "label_share": share}
    if not pick.feasible or not math.isfinite(rho) or routed <= 0.0:
        return RouterFit(
            False,
            "routing did not pay on the fitting rows after the search's optimism: "
            "the cascade alone is cheaper",
            cost_without=base_cost,
            cost_with=base_cost,
            info=info,
        )
    if pick.cost >= base_cost:
        return RouterFit(
            False,
            f"with the router ${pick.cost:.3e}/request, without ${base_cost:.3e}: it does not pay",
            cost_without=base_cost,
            cost_with=float(pick.cost),
            info=info,
        )
    return RouterFit(
        True,
        f"routes {routed:.1%} of requests straight to the last stage; "
        f"${base_cost:.3e} -> ${pick.cost:.3e}/request",
        cf.model,
        _midpoint(rho, cf.oof),
        pick,
        base_cost,
        float(pick.cost),
        routed,
        info,
        cf.oof,
    )


def _midpoint(t: float, observed: Any) -> float:
    lower = observed[observed < t]
    return float((t + float(lower.max())) / 2.0) if lower.size else float(t)


def auc(score: Any, label: Any) -> float:
    """Mann-Whitney AUC of ``score`` for ``label`` > 0.5 (0.5 when one class is missing); tied scores
    share their mean rank (a tie counts a half, whatever the rows' order)."""
    s = np.asarray(score, dtype=np.float64)
    y = np.asarray(label) > 0.5
    pos, neg = int(y.sum()), int((~y).sum())
    if not pos or not neg:
        return 0.5
    order = np.argsort(s, kind="mergesort")
    _, first, counts = np.unique(s[order], return_index=True, return_counts=True)
    ranks = np.empty(len(s))
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)
    return float((ranks[y].sum() - pos * (pos + 1) / 2) / (pos * neg))
