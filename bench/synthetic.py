"""Calibration against a known truth: generated multiple-choice worlds, fit on 1,000 rows, judged on 10,000.

A replay split of a few hundred test rows cannot say whether a fit's quality is on target: its own noise
is 1-2 points. Here each *world* is a generated 11-model multiple-choice set (item difficulty, models of
one family erring together, wrong answers drawn to the same tempting option, longer questions harder,
prices and accuracies patterned on public 2024 price lists and benchmark tables, each jittered per
world), large enough that the test figures are the truth. Per world and target the cascade is fitted
on the train rows exactly as ``cascade replay`` fits it (``fit_cascade``: cross-fitted scorers, every
chain, the bootstrap search and its optimism, the router), then every test row is scored by the fitted
scorers in process (the code a learned scorer runs at request time, router included).

    .venv/bin/python bench/synthetic.py [--worlds 0:16] [--targets 0.95,0.98] [--train 1000] [--test 10000]
                                        [--max-stages 4] [--json]
    .venv/bin/python bench/synthetic.py --write WORLD FILE.jsonl [--train 1000] [--test 470]
        # one world as a dataset for `cascade replay FILE.jsonl` (e.g. --online, --resplits)

Prints per world: the test quality relative to the test's best single model, its distance to the target,
the savings against that model, and what the fit promised (its train quality and measured optimism),
and the agreement rule on the fit's chain with the fit's scorers swept to its quality on the test rows;
then per target the mean, spread and lowest of the distances, the share of worlds within 0.01 under the
target, the mean and median savings, and in how many worlds the swept scorers save as much as the rule.
About 15 s per world and target on 2 CPUs (twice that with --max-stages 4). Generated data only:
nothing of ../shared is read.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from typing import Any

import numpy as np

from app.learning.train import DEFAULT_MAX_STAGES, FittedCascade, fit_cascade
from app.replay.baselines import baselines, learned_at_quality
from app.replay.dataset import Dataset, Row, parse_rows

# name: (accuracy, mean USD per call, family) before the per-world jitter
MODELS: dict[str, tuple[float, float, str]] = {
    "gpt-4-1106-preview": (0.93, 0.00120, "gpt"),
    "claude-v2": (0.87, 0.00095, "claude"),
    "claude-v1": (0.86, 0.00095, "claude"),
    "zero-one-ai/Yi-34B-Chat": (0.88, 0.000095, "yi"),
    "gpt-3.5-turbo-1106": (0.85, 0.00012, "gpt"),
    "mistralai/mixtral-8x7b-chat": (0.84, 0.00007, "mistral"),
    "claude-instant-v1": (0.80, 0.000095, "claude"),
    "meta/llama-2-70b-chat": (0.65, 0.00011, "llama"),
    "WizardLM/WizardLM-13B-V1.2": (0.64, 0.000036, "llama"),
    "mistralai/mistral-7b-chat": (0.63, 0.000024, "mistral"),
    "meta/code-llama-instruct-34b-chat": (0.58, 0.000092, "llama"),
}
LETTERS = "ABCD"


def _ability(z: np.ndarray, accuracy: float) -> float:
    """The ability whose mean P(correct) = sigmoid(ability - z) over these items is ``accuracy``."""
    lo, hi = -20.0, 20.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if float((1 / (1 + np.exp(-(mid - z)))).mean()) < accuracy:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def generate(world: int, n_train: int, n_test: int, jitter: float = 0.04) -> Dataset:
    rng = np.random.default_rng(world)
    n = n_train + n_test
    models = {m: (min(0.97, max(0.3, a + rng.normal(0, jitter))), c, f) for m, (a, c, f) in MODELS.items()}
    difficulty = rng.normal(0, rng.uniform(1.0, 2.2), n)
    family_sd, own_sd = rng.uniform(0.3, 1.0), rng.uniform(0.4, 1.2)
    family = {f: rng.normal(0, family_sd, n) for f in sorted({v[2] for v in models.values()})}
    gold = rng.integers(0, 4, n)
    tempting = rng.dirichlet([0.6] * 3, n)  # which wrong option draws the wrong answers
    length = rng.normal(0, 6, n)
    answers: dict[str, tuple[Any, ...]] = {}
    for m, (acc, cost, f) in models.items():
        z = difficulty + family[f] + rng.normal(0, own_sd, n)
        right = rng.random(n) < 1 / (1 + np.exp(-(_ability(z, acc) - z)))
        answers[m] = (
            right,
            rng.random(n),
            rng.normal(1, 0.25, n).clip(0.3) * cost,
            rng.random(n),
            rng.random(n),
        )
    lines = []
    for i in range(n):
        wrong = [k for k in range(4) if k != gold[i]]
        rec = {}
        for m, (right, u, cost, nl, chatty) in answers.items():
            k = gold[i] if right[i] else wrong[int(np.searchsorted(np.cumsum(tempting[i]), u[i] * 0.9999))]
            text = (
                ("The answer is " if chatty[i] < 0.05 else "") + LETTERS[k] + ("\n" if nl[i] < 0.15 else "")
            )
            rec[m] = {"answer": text, "correct": bool(k == gold[i]), "cost_usd": float(cost[i])}
        words = " ".join(
            f"w{(world * 7919 + i * 104729 + j * 31) % 5000}"
            for j in range(max(4, int(22 + 6 * difficulty[i] + length[i])))
        )
        prompt = (
            f"Question: {words}?\n"
            + "\n".join(f"{L}) option {L}" for L in LETTERS)
            + "\nAnswer with the letter."
        )
        split = "train" if i < n_train else "test"
        lines.append(json.dumps({"id": f"w{world}.{i}", "split": split, "prompt": prompt, "models": rec}))
    return parse_rows(io.StringIO("\n".join(lines) + "\n"), None, 0.5, True, name=f"world{world}")


def write(ds: Dataset, path: str) -> None:
    """The world in the shared datasets' JSONL shape (what ``cascade replay`` reads)."""
    with open(path, "w", encoding="utf-8") as fh:
        for r in ds.rows:
            models = {
                m: {"answer": a.answer, "correct": a.correct, "cost_usd": a.cost_usd}
                for m, a in r.answers.items()
            }
            fh.write(json.dumps({"id": r.id, "split": r.split, "prompt": r.prompt, "models": models}) + "\n")


def judge(fit: FittedCascade, rows: list[Row]) -> tuple[float, float]:
    """Accuracy and mean cost of the fitted cascade (router included) on ``rows``."""
    K = len(fit.models)
    right = cost = 0.0
    for r in rows:
        if fit.routed(r.prompt):
            served, paid = K - 1, r.answers[fit.models[-1]].cost_usd
        else:
            served, paid, previous = K - 1, 0.0, []
            for j, m in enumerate(fit.models):
                paid += r.answers[m].cost_usd
                if j == K - 1:
                    break
                text = r.answers[m].answer
                if fit.score(j, r.prompt, text, previous) >= fit.thresholds[j]:
                    served = j
                    break
                previous.append(text)
        right += float(r.answers[fit.models[served]].correct)
        cost += paid
    return right / len(rows), cost / len(rows)


def against_agreement(
    fit: FittedCascade, train: list[Row], test: list[Row], models: list[str], target: float
) -> dict[str, Any]:
    """The agreement rule on the fit's chain (as ``cascade replay``'s baselines: a two-model chain gets
    the middle model cheapest at the target on the train rows) on ``test``, and the fit's chain and
    scorers at the cheapest thresholds at least as accurate there (a sweep on the test rows: the
    scorers' worth at equal quality, not a fit). None where the chain has one model."""
    if len(fit.models) < 2:
        return {"agreement": None, "learned_at_agreement_quality": None}
    base = baselines(test, models, fit.models, [1.0] * len(fit.models), train=train, target_quality=target)
    agree = base["agreement"]
    if agree is None:
        return {"agreement": None, "learned_at_agreement_quality": None}
    scores = []
    for r in test:
        previous: list[str] = []
        row = []
        for j, m in enumerate(fit.models[:-1]):
            row.append(fit.score(j, r.prompt, r.answers[m].answer, previous))
            previous.append(r.answers[m].answer)
        scores.append(row)
    swept = learned_at_quality(test, models, fit.models, scores, agree["quality_vs_best"])
    return {"agreement": agree, "learned_at_agreement_quality": swept}


def _versus_agreement(rs: list[dict[str, Any]]) -> dict[str, Any]:
    """Over worlds whose chain has an agreement rule: in how many the learned scorers, swept to the rule's
    quality on the test rows, save at least as much (where no threshold of theirs reaches it, they do
    not), and the mean savings of both over the worlds where the sweep reaches it."""
    pairs = [(r["agreement"], r["learned_at_agreement_quality"]) for r in rs if r["agreement"]]
    both = [(ag, sw) for ag, sw in pairs if sw is not None]
    return {
        "agreement_worlds": len(pairs),
        "learned_at_least_agreement": sum(
            sw["savings_vs_best"] >= ag["savings_vs_best"] - 1e-12 for ag, sw in both
        ),
        "agreement_unreached": len(pairs) - len(both),
        "agreement_savings_mean": statistics.fmean(ag["savings_vs_best"] for ag, _ in both) if both else None,
        "learned_at_agreement_savings_mean": (
            statistics.fmean(sw["savings_vs_best"] for _, sw in both) if both else None
        ),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worlds", default="0:16", help="START:STOP (default 0:16)")
    ap.add_argument("--targets", default="0.95,0.98")
    ap.add_argument("--train", type=int, default=1000)
    ap.add_argument("--test", type=int, default=None, help="test rows (default 10000; 470 with --write)")
    ap.add_argument(
        "--max-stages", type=int, choices=(1, 2, 3, 4), default=DEFAULT_MAX_STAGES, help="default 3"
    )
    ap.add_argument("--json", action="store_true", help="print the results as one JSON object last")
    ap.add_argument(
        "--write", nargs=2, metavar=("WORLD", "FILE"), help="write one world as a dataset, no fit"
    )
    args = ap.parse_args(argv)
    if args.write:
        world, path = int(args.write[0]), args.write[1]
        write(generate(world, args.train, args.test if args.test is not None else 470), path)
        print(f"{path}: world {world}")
        return 0
    args.test = args.test if args.test is not None else 10000
    start, stop = (int(x) for x in args.worlds.split(":"))
    targets = [float(t) for t in args.targets.split(",")]
    results: list[dict[str, Any]] = []
    for world in range(start, stop):
        ds = generate(world, args.train, args.test)
        test = list(ds.test)
        acc = {m: statistics.fmean(float(r.answers[m].correct) for r in test) for m in ds.models}
        best = max(acc, key=lambda m: acc[m])
        best_cost = statistics.fmean(r.answers[best].cost_usd for r in test)
        for target in targets:
            t0 = time.monotonic()
            fit = fit_cascade(list(ds.train), ds.models, target_quality=target, max_stages=args.max_stages)
            q, c = judge(fit, test)
            res = {
                "world": world,
                "target": target,
                "quality_vs_best": q / acc[best],
                "gap": q / acc[best] - target,
                "savings_vs_best": 1 - c / best_cost,
                "train_quality_vs_best": fit.train["quality_vs_best"],
                "optimism": fit.train["optimism"],
                "chain": fit.models,
                "router": fit.router is not None,
                **against_agreement(fit, list(ds.train), test, ds.models, target),
            }
            results.append(res)
            ag, sw = res["agreement"], res["learned_at_agreement_quality"]
            versus = (
                f"  agreement {ag['quality_vs_best']:.4f} / {ag['savings_vs_best']:.1%}, learned there "
                + (f"{sw['savings_vs_best']:.1%}" if sw else "-")
                if ag
                else ""
            )
            print(
                f"world {world:3d} target {target:.2f}: quality {res['quality_vs_best']:.4f} "
                f"({res['gap']:+.4f}) savings {res['savings_vs_best']:7.1%}  "
                f"train {res['train_quality_vs_best']:.4f} "
                f"optimism {res['optimism']:.4f}  {' -> '.join(m.split('/')[-1] for m in fit.models)}"
                f"{'  +router' if res['router'] else ''}{versus}  ({time.monotonic() - t0:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
    summary = {}
    for target in targets:
        rs = [r for r in results if r["target"] == target]
        gaps = [r["gap"] for r in rs]
        sav = [r["savings_vs_best"] for r in rs]
        summary[str(target)] = {
            "worlds": len(rs),
            "gap_mean": statistics.fmean(gaps),
            "gap_sd": statistics.pstdev(gaps),
            "gap_min": min(gaps),
            "within_tolerance_share": sum(g >= -0.01 for g in gaps) / len(gaps),
            "true_minus_train_mean": statistics.fmean(
                r["quality_vs_best"] - r["train_quality_vs_best"] for r in rs
            ),
            "optimism_mean": statistics.fmean(r["optimism"] for r in rs),
            "savings_mean": statistics.fmean(sav),
            "savings_median": statistics.median(sav),
            **_versus_agreement(rs),
        }
        s = summary[str(target)]
        print(
            f"target {target:.2f} over {s['worlds']} worlds: quality - target mean {s['gap_mean']:+.4f} "
            f"(SD {s['gap_sd']:.4f}, lowest {s['gap_min']:+.4f}), within 0.01 under it in "
            f"{s['within_tolerance_share']:.0%}; test - train quality {s['true_minus_train_mean']:+.4f} "
            f"against a "
            f"measured optimism of {s['optimism_mean']:.4f}; savings mean {s['savings_mean']:.1%}, "
            f"median {s['savings_median']:.1%}"
            + (
                f"; against the agreement rule on the same chain ({s['agreement_worlds']} worlds), the "
                f"learned scorers at its quality save as much or more in {s['learned_at_least_agreement']}"
                f" (savings mean {s['learned_at_agreement_savings_mean']:.1%} against "
                f"{s['agreement_savings_mean']:.1%}; {s['agreement_unreached']} where they cannot reach"
                f" its quality)"
                if s["agreement_worlds"] > s["agreement_unreached"]
                else ""
            )
        )
    if args.json:
        print(json.dumps({"results": results, "summary": summary}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
