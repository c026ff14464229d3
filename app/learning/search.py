"""Choosing a cascade honestly: every threshold combination of every chain, over bootstrap replicates.

The cheapest of hundreds of chains x thousands of threshold combinations that *looks* good enough on
the rows it was chosen on is, on new rows, worse than it looked: it was picked partly for its luck.
This module measures that optimism and pays for it, instead of assuming a fixed margin:

1. Every policy (chain, thresholds) is evaluated at once on the rows and on ``B`` bootstrap replicates
   of them (columns of a weight matrix), vectorised: ``served (G, n) -> correct/cost @ W``.
2. The same selection rule (cheapest policy whose quality, less ``margin_z`` bootstrap standard errors,
   reaches the aim) is run inside every replicate; the policy it picks there is then evaluated on the
   original rows. The mean shortfall, ``optimism``, is what selection costs (Efron's optimism
   bootstrap, applied to the whole search).
3. On the original rows the rule is run once more with the aim raised by that optimism.

Quality is *relative*: ``quality / reference`` where the reference is, per replicate, the best of the
``reference`` columns (e.g. the accuracy of the best single model, as the replay report measures it;
or 1.0 for "as good as the last stage"). Costs are means per row. Scores must already be out-of-sample
for the rows (cross-fitted, :mod:`app.learning.crossfit`, or from scorers not fitted on them).

API::

    W = replicate_weights(n, replicates=64, seed=0, weights=None)   # (n, 1 + B): base, then bootstraps
    grid = policy_grid(scores, correct, cost, candidates, W)        # every threshold combination
    search = Search(reference_quality(ref_correct, W), target, margin_z=1.0)
    search.add(chain, grid) ...                                     # each chain once (scoring=: a tag)
    pick = search.result()   # Pick(chain, thresholds, quality, quality_corrected, se, cost, optimism, ...)
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from app.learning.thresholds import BLOCK_CELLS
from app.learning.thresholds import json_float as _json_float

FloatArray = npt.NDArray[np.float64]

CHUNK_ROWS = 2048  # rows per block when building (policies x rows) matrices, at most BLOCK_CELLS cells
# policy_grid sums in float32: with non-integer weights (decay, realised label rates) two policies of the
# same quality differ by ~1e-7, and differently on another CPU (its SIMD paths round otherwise). Qualities
# this close count as equal, so a choice between them (the most accurate, where none reaches the aim)
# does not depend on the machine: on one, the fallback's "most accurate" of thresholds all right 100 %
# of the time was whichever the rounding favoured (0.82, 0.86, 0.88 on successive fits).
QUALITY_TOL = 1e-6
# ... and so do costs: a chain whose first stage accepts every row costs what that model alone costs, but
# the float32 sums of the two grids (chunked by grid size) differ in the 8th digit, so the chain with
# stages it never reaches could win on rounding over the model alone (a fit "Yi -> Llama -> GPT-3.5" that
# serves Yi for every request). Costs this close count as equal; then the better quality, then fewer
# stages decide.
COST_RTOL = 1e-5


def replicate_weights(
    n: int, replicates: int = 64, seed: int = 0, weights: Sequence[float] | FloatArray | None = None
) -> FloatArray:
    """``(n, 1 + 2 * replicates)``: column 0 the base weights (ones, or ``weights``), then ``replicates``
    bootstrap replicates (the base weights times multinomial counts of ``n`` draws), then each
    replicate's out-of-bag rows (the base weights where the count is 0). Deterministic per seed."""
    base = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    if base.shape[0] != n:
        raise ValueError("weights must have one value per row")
    if n == 0:
        return np.zeros((0, 1 + 2 * replicates))
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=replicates).T.astype(np.float64)
    oob = (counts == 0).astype(np.float64)
    return np.concatenate([base[:, None], base[:, None] * counts, base[:, None] * oob], axis=1)


def reference_quality(correct: Any, W: FloatArray) -> FloatArray:
    """Per weight column, the best mean of the ``correct`` columns ``(n, M)``: the reference quality
    relative quality is measured against (e.g. the best single model's accuracy in that replicate)."""
    c = np.asarray(correct, dtype=np.float64)
    if c.ndim == 1:
        c = c[:, None]
    sums = W.sum(axis=0)
    sums[sums <= 0] = 1.0
    means = (c.T @ W) / sums[None, :]  # (M, R)
    return np.asarray(means.max(axis=0), dtype=np.float64)


@dataclass
class PolicyGrid:
    """Every threshold combination of one chain, evaluated in every weight column."""

    thresholds: FloatArray  # (G, K-1)
    quality: FloatArray  # (G, R) mean correctness of the served answer
    cost: FloatArray  # (G, R) mean cost of the stages tried

    @property
    def size(self) -> int:
        return int(self.thresholds.shape[0])


def policy_grid(
    scores: Any,
    correct: Any,
    cost: Any,
    candidates: Sequence[Sequence[float]],
    W: FloatArray,
    route: Any = None,
    route_candidates: Sequence[float] = (),
) -> PolicyGrid:
    """Evaluate every combination of ``candidates`` (one list per scored stage) on every column of ``W``.

    ``scores`` ``(n, K-1)``: stage k's answer is served when its score is ``>= thresholds[k]`` (NaN:
    never); ``correct``/``cost`` ``(n, K)``; a row's cost is the sum over the stages it tried.
    With ``route`` (a router's score per row) and ``route_candidates``, every combination also has a
    router threshold, first in ``thresholds``: a row whose route score is ``>=`` it goes straight to the
    last stage (served there, charged only for it); ``inf`` routes nothing.
    """
    c = np.asarray(correct, dtype=np.float64)
    k = np.asarray(cost, dtype=np.float64)
    if c.ndim == 1:
        c, k = c[:, None], k[:, None]
    n, K = c.shape
    s = np.asarray(scores, dtype=np.float64).reshape(n, K - 1)
    if len(candidates) != K - 1:
        raise ValueError("candidates: one list per scored stage")
    cand = [np.asarray(cj, dtype=np.float64) for cj in candidates]
    routed = route is not None
    if routed:
        cand = [np.asarray(route_candidates, dtype=np.float64), *cand]
        r = np.asarray(route, dtype=np.float64).reshape(n)
    if not cand:
        T = np.zeros((1, 0))
    else:
        T = np.asarray(list(itertools.product(*cand)), dtype=np.float64).reshape(-1, len(cand))
    off = 1 if routed else 0
    G, R = T.shape[0], W.shape[1]
    sums = W.sum(axis=0)
    sums[sums <= 0] = 1.0
    Q = np.zeros((G, R))
    C = np.zeros((G, R))
    cum = np.cumsum(k, axis=1)
    W32 = W.astype(np.float32)  # sums of 0/1 times weights: float32 is exact enough and twice as fast
    step = max(64, min(CHUNK_ROWS, BLOCK_CELLS // max(1, G)))
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        served = np.full((G, hi - lo), K - 1, dtype=np.int8)
        for j in range(K - 2, -1, -1):  # earlier stages take precedence
            served[s[None, lo:hi, j] >= T[:, off + j, None]] = j
        rows = np.arange(hi - lo)[None, :]
        q = c[lo:hi].astype(np.float32)[rows, served]
        paid = cum[lo:hi].astype(np.float32)[rows, served]
        if routed:
            go = r[None, lo:hi] >= T[:, 0, None]  # straight to the last stage
            q = np.where(go, c[lo:hi, K - 1].astype(np.float32)[None, :], q)
            paid = np.where(go, k[lo:hi, K - 1].astype(np.float32)[None, :], paid)
        Q += q @ W32[lo:hi]
        C += paid @ W32[lo:hi]
    return PolicyGrid(T, Q / sums[None, :], C / sums[None, :])


def live_stages(thresholds: Sequence[float]) -> int:
    """How many stages of a chain a policy can reach: up to the first scored stage accepting every
    answer (threshold -inf), else all of them (``len(thresholds) + 1``)."""
    for j, t in enumerate(thresholds):
        if t == -math.inf:
            return j + 1
    return len(thresholds) + 1


def _rounded(quality: FloatArray) -> FloatArray:
    """Qualities on a ``QUALITY_TOL`` grid: equal up to float32 noise -> equal."""
    return np.round(quality / QUALITY_TOL) * QUALITY_TOL


@dataclass(frozen=True)
class Pick:
    chain: tuple[str, ...]
    thresholds: tuple[float, ...]  # candidate values as searched (observed scores, +-inf)
    quality: float  # relative quality on the rows (column 0)
    quality_corrected: float  # ... less the search's optimism: what to expect on new rows
    se: float  # bootstrap standard error of ``quality``
    cost: float  # mean cost per row
    feasible: bool
    optimism: float
    aim: float  # the relative quality the final choice had to reach (target + optimism)
    scoring: tuple[str, ...] = ()  # the caller's tag of how each stage was scored (``Search.add``)

    def to_dict(self) -> dict[str, Any]:
        return {
            "chain": list(self.chain),
            **({"scoring": list(self.scoring)} if self.scoring else {}),
            "thresholds": [_json_float(t) for t in self.thresholds],
            "quality": self.quality,
            "quality_corrected": self.quality_corrected,
            "se": self.se,
            "cost": self.cost,
            "feasible": self.feasible,
            "optimism": self.optimism,
            "aim": self.aim,
        }


@dataclass
class _Chain:
    chain: tuple[str, ...]
    thresholds: FloatArray
    ratio: FloatArray  # (G,) relative quality on the rows
    cost: FloatArray  # (G,)
    se: FloatArray  # (G,)
    scoring: tuple[str, ...] = ()


@dataclass
class Search:
    """The cheapest policy over every chain added, with the selection's optimism measured and paid.

    ``reference``: per weight column, the quality relative quality is measured against
    (:func:`reference_quality`). ``margin_z``: how many bootstrap standard errors of the policy's own
    quality estimate to keep above the aim (0 = none).
    """

    reference: FloatArray
    target: float
    margin_z: float = 1.0
    method: str = "632"  # optimism: "632" (out-of-bag, Efron's .632) or "harrell" (on all the rows)
    chains: list[_Chain] = field(default_factory=list)

    def __post_init__(self) -> None:
        B = (self.reference.shape[0] - 1) // 2
        self._B = B
        self._best_cost = np.full(B, np.inf)
        self._best_app = np.full(B, np.nan)  # what the replicate's pick promised
        self._best_orig = np.full(B, np.nan)  # ... what it gives on all the rows
        self._best_oob = np.full(B, np.nan)  # ... and on the rows the replicate did not draw

    def add(self, chain: Sequence[str], grid: PolicyGrid, scoring: Sequence[str] = ()) -> None:
        """One candidate: ``chain`` with every policy of ``grid``. ``scoring`` tags how its stages were
        scored, when a chain is searched with more than one set of scores (kept on its ``Pick``)."""
        # Where no model is ever right (a reference of 0), every policy is as good as the best: 1.0, as
        # the replay report has it, so the cheapest is chosen (not "the most accurate" of all zeros).
        pos = self.reference > 0
        ratio = np.where(pos[None, :], grid.quality / np.where(pos, self.reference, 1.0)[None, :], 1.0)
        B = self._B
        boot = ratio[:, 1 : 1 + B]
        oob = ratio[:, 1 + B : 1 + 2 * B]
        se = boot.std(axis=1) if boot.shape[1] > 1 else np.zeros(grid.size)
        need = self.target + self.margin_z * se  # (G,)
        if boot.shape[1]:
            ok = boot >= need[:, None] - QUALITY_TOL  # (G, B)
            cost = np.where(ok, grid.cost[:, 1 : 1 + B], np.inf)
            idx = cost.argmin(axis=0)  # per replicate
            best = cost[idx, np.arange(cost.shape[1])]
            better = best < self._best_cost - 1e-15
            cols = np.nonzero(better)[0]
            self._best_cost[cols] = best[cols]
            self._best_app[cols] = boot[idx[cols], cols]
            self._best_orig[cols] = ratio[idx[cols], 0]
            self._best_oob[cols] = oob[idx[cols], cols]
        self.chains.append(
            _Chain(tuple(chain), grid.thresholds, ratio[:, 0], grid.cost[:, 0], se, tuple(scoring))
        )

    @property
    def optimism(self) -> float:
        """How much a pick falls short on new rows of what it promised on its own (>= 0): over the
        replicates, 0.632 x the mean shortfall on the out-of-bag rows (Efron's .632 weighting: a
        replicate holds ~63 % of the distinct rows), or with ``method="harrell"`` the mean shortfall on
        all the rows (smaller: they include the replicate's own)."""
        got = ~np.isnan(self._best_app)
        if not got.any():
            return 0.0
        if self.method == "harrell":
            return max(0.0, float(np.mean(self._best_app[got] - self._best_orig[got])))
        return max(0.0, 0.632 * float(np.mean(self._best_app[got] - self._best_oob[got])))

    def result(self, *, correct_optimism: bool = True, min_optimism: float = 0.0) -> Pick:
        """The cheapest policy reaching ``target + optimism`` (at least ``min_optimism``, e.g. that of
        an earlier search this one refines), with ``margin_z`` standard errors to spare."""
        if not self.chains:
            raise ValueError("no chain to choose from")
        opt = max(self.optimism, min_optimism) if correct_optimism else 0.0
        aim = self.target + opt
        found: list[tuple[float, float, int, int, int]] = []  # (cost, -quality, stages, chain, policy)
        for ci, ch in enumerate(self.chains):
            ok = ch.ratio >= aim + self.margin_z * ch.se - QUALITY_TOL
            if not ok.any():
                continue
            cost = np.where(ok, ch.cost, np.inf)
            gi = int(np.lexsort((-_rounded(ch.ratio), cost))[0])
            found.append((float(cost[gi]), -float(_rounded(ch.ratio)[gi]), len(ch.chain), ci, gi))
        feasible = bool(found)
        if not found:  # nothing reaches the aim: the most accurate policies, by the same rule among them
            for ci, ch in enumerate(self.chains):
                gi = int(np.lexsort((ch.cost, -_rounded(ch.ratio)))[0])
                found.append((float(ch.cost[gi]), -float(_rounded(ch.ratio)[gi]), len(ch.chain), ci, gi))
            top = min(f[1] for f in found)
            found = [f for f in found if f[1] == top]
        cheapest = min(f[0] for f in found)
        tied = [f for f in found if f[0] <= cheapest + COST_RTOL * abs(cheapest)]
        _, _, _, ci, gi = min(tied, key=lambda f: (f[1], f[2], f[0], f[3]))
        ch = self.chains[ci]
        return Pick(
            chain=ch.chain,
            thresholds=tuple(float(t) for t in ch.thresholds[gi]),
            quality=float(ch.ratio[gi]),
            quality_corrected=float(ch.ratio[gi]) - opt,
            se=float(ch.se[gi]),
            cost=float(ch.cost[gi]),
            feasible=feasible,
            optimism=opt,
            aim=aim,
            scoring=ch.scoring,
        )

    def shortlist(
        self,
        slack: float = 0.03,
        limit: int = 24,
        *,
        above: float = 0.015,
        above_limit: int = 0,
        merge_prefixes: bool = False,
    ) -> list[tuple[str, ...]]:
        """The chains worth a full search (column 0, no margin): the ``limit`` cheapest reaching
        ``target - slack``, the ``above_limit`` cheapest reaching ``target + above``, and the three most
        accurate (the fallback when none is good enough).

        For a search with four-stage chains (``fit_cascade`` passes ``above_limit=4`` and
        ``merge_prefixes=True`` there): a chain whose cheapest policy at an aim accepts every answer at a
        middle stage counts as the chain up to that stage (the same policy, where that shorter chain was
        added), and the higher aim stands for the final one (which adds the search's optimism, unknown
        here). Hundreds of four-model chains whose first stages take every request cost what their
        prefix does; they filled the list, and a generated world's fit at 0.98 lost Yi-34B, alone on
        target and cheapest there, for Mistral-7B -> Yi-34B -> ... accepting one request in a thousand at
        the first stage. Three-stage searches keep the list they were measured with: the merged one
        moved the measured optimism (it bootstraps more distinct chains: 0.008 -> 0.011 on one world)
        and, through it, the chains the online runs start from."""
        added = {ch.chain for ch in self.chains}
        out: list[tuple[str, ...]] = []
        for aim, most in ((self.target - slack, limit), (self.target + above, above_limit)):
            if most <= 0:
                continue
            cheap: list[tuple[float, tuple[str, ...]]] = []
            for ch in self.chains:
                ok = ch.ratio >= aim
                if not ok.any():
                    continue
                cost = np.where(ok, ch.cost, np.inf)
                gi = int(np.argmin(cost))
                name = ch.chain
                if merge_prefixes:
                    live = live_stages(ch.thresholds[gi])
                    name = ch.chain[:live] if ch.chain[:live] in added else ch.chain
                cheap.append((float(cost[gi]), name))
            taken: list[tuple[str, ...]] = []
            for _, name in sorted(cheap, key=lambda x: x[0]):
                if name not in taken:
                    taken.append(name)
                if len(taken) >= most:
                    break
            out.extend(c for c in taken if c not in out)
        for c in sorted(self.chains, key=lambda c: -float(c.ratio.max()))[:3]:
            if c.chain not in out:
                out.append(c.chain)
        return out

    def frontier(self, limit: int = 20) -> list[dict[str, Any]]:
        """Per chain its cheapest policy reaching the final aim (or its best), cheapest first."""
        aim = self.target + self.optimism
        out: list[dict[str, Any]] = []
        for ch in self.chains:
            ok = ch.ratio >= aim + self.margin_z * ch.se - QUALITY_TOL
            gi = (
                int(np.argmin(np.where(ok, ch.cost, np.inf)))
                if ok.any()
                else int(np.lexsort((ch.cost, -_rounded(ch.ratio)))[0])
            )
            out.append(
                {
                    "models": list(ch.chain),
                    **({"scoring": list(ch.scoring)} if ch.scoring else {}),
                    "thresholds": [_json_float(t) for t in ch.thresholds[gi]],
                    "quality": float(ch.ratio[gi]),
                    "cost": float(ch.cost[gi]),
                    "feasible": bool(ok.any()),
                }
            )
        # costs equal to 5 significant digits (about ``result``'s COST_RTOL): fewer stages first
        out.sort(key=lambda d: (not d["feasible"], float(f"{d['cost']:.5g}"), len(d["models"]), d["cost"]))
        return out[:limit]
