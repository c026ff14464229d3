"""How much a fit's scorers could save with perfect aim: the ceiling of threshold choice.

Fits each generated world on ``--train`` rows (as `cascade replay` does), then on ``--test`` fresh rows
compares the fit's own thresholds with the cheapest thresholds of the same scorers on the same chain that
reach the target *on those test rows* (a 41-quantile grid per stage, chosen with the truth in hand), and
with a perfect scorer on the chain. Where the swept thresholds save little more than the fit, what stands
between the fit and the oracle is what the scores tell apart, not where the thresholds were put.

    .venv/bin/python bench/threshold_ceiling.py [--worlds 43 63 68 74 77] [--target 0.98]
                                                [--train 1000] [--test 10000]

About a minute for the five default worlds on 2 CPUs.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np

from app.learning.thresholds import evaluate_cascade
from app.learning.train import fit_cascade

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.synthetic import generate


def world(w: int, target: float, n_train: int, n_test: int) -> str:
    ds = generate(w, n_train, n_test)
    fit = fit_cascade(ds.train, ds.models, target_quality=target)
    chain, rows = fit.models, ds.test
    acc = {m: float(np.mean([r.answers[m].correct for r in rows])) for m in ds.models}
    cost = {m: float(np.mean([r.answers[m].cost_usd for r in rows])) for m in ds.models}
    best = max(ds.models, key=lambda m: (acc[m], -cost[m]))
    name = " -> ".join(m.split("/")[-1] for m in chain)
    if len(chain) < 2:
        return f"world {w}: {name} alone, nothing to sweep"
    k = len(chain)
    scores = np.array(
        [
            [fit.score(j, r.prompt, r.answers[chain[j]].answer, [r.answers[p].answer for p in chain[:j]])
             for j in range(k - 1)] + [0.0]
            for r in rows
        ]
    )  # fmt: skip
    right = np.array([[float(r.answers[m].correct) for m in chain] for r in rows])
    paid = np.array([[r.answers[m].cost_usd for m in chain] for r in rows])
    own = evaluate_cascade(scores, right, paid, fit.thresholds)
    grids = [[*np.unique(np.quantile(scores[:, j], np.linspace(0, 1, 41))), 1.01] for j in range(k - 1)]
    swept: tuple[float, float] | None = None
    for ts in itertools.product(*grids):
        ev = evaluate_cascade(scores, right, paid, ts)
        if ev.quality / acc[best] >= target and (swept is None or ev.cost < swept[0]):
            swept = (ev.cost, ev.quality / acc[best])
    # a perfect scorer: each row pays the chain up to its first right answer (or all of it)
    first_right = np.where(right.any(axis=1), right.argmax(axis=1), k - 1)
    oracle = float(np.mean([paid[i, : first_right[i] + 1].sum() for i in range(len(rows))]))

    def saved(c: float) -> str:
        return f"{1 - c / cost[best]:.1%}"

    sw = "none reaches it" if swept is None else f"{saved(swept[0])} at {swept[1]:.3f}"
    return (
        f"world {w} ({name}): the fit {saved(own.cost)} at {own.quality / acc[best]:.3f}; "
        f"swept on the test rows {sw}; a perfect scorer {saved(oracle)}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worlds", type=int, nargs="+", default=[43, 63, 68, 74, 77])
    ap.add_argument("--target", type=float, default=0.98)
    ap.add_argument("--train", type=int, default=1000)
    ap.add_argument("--test", type=int, default=10000)
    args = ap.parse_args(argv)
    for w in args.worlds:
        print(world(w, args.target, args.train, args.test), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
