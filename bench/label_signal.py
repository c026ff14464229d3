"""Would the learned score sharpen the online tuner's estimate of what the accepted answers are worth?

The tuner knows whether an answer the first stage served was good only from the shadow labels, each
standing for 1/p requests. A difference (prediction-powered) estimator would add the learned score of
every accepted answer and correct it with the labelled ones: its variance is that of the labels times
1 - rho^2, where rho is the correlation between the score and the label among the accepted answers.
This measures rho^2 where it matters: the offline fit's first stage at its own threshold, on rows the
fit never saw, for the label of the online runs ("the same answer as the last stage's") and for
correctness, beside rho^2 over every row (where the scorer does its ranking).

    .venv/bin/python bench/label_signal.py [--data ../shared/data] [--worlds 72 73 74 43 63 68]
                                           [--targets 0.95 0.98] [--train 1000] [--test 5000]

About 2 minutes on 2 CPUs. Generated worlds always; the shared sets when ``--data`` has them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import numpy.typing as npt

from app.answers import canonical_answer
from app.learning.train import fit_cascade
from app.replay.dataset import Dataset, load_dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.synthetic import generate

SHARED = ("routellm/gsm8k.jsonl", "routerbench/winogrande.jsonl", "routerbench/mbpp.jsonl")


def rho2(score: npt.NDArray[np.float64], label: npt.NDArray[np.float64]) -> float | None:
    if len(score) < 5 or label.std() == 0 or score.std() == 0:
        return None
    return float(np.corrcoef(score, label)[0, 1] ** 2)


def study(name: str, ds: Dataset, target: float) -> dict[str, object]:
    fit = fit_cascade(ds.train, ds.models, target_quality=target)
    out: dict[str, object] = {"data": name, "target": target, "chain": fit.models}
    if len(fit.models) < 2:
        return out
    first, last = fit.models[0], fit.models[-1]
    rows = ds.test
    score = np.array([fit.probability(0, r.prompt, r.answers[first].answer) for r in rows])
    right = np.array([float(r.answers[first].correct) for r in rows])
    same = np.array(
        [
            float(
                canonical_answer(r.answers[first].answer, r.prompt)
                == canonical_answer(r.answers[last].answer, r.prompt)
            )
            for r in rows
        ]
    )
    accepted = score >= fit.thresholds[0]
    out.update(
        accepted=float(accepted.mean()),
        rho2_label=rho2(score[accepted], same[accepted]),
        rho2_correct=rho2(score[accepted], right[accepted]),
        rho2_correct_all_rows=rho2(score, right),
    )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--worlds", type=int, nargs="*", default=[72, 73, 74, 43, 63, 68])
    ap.add_argument("--targets", type=float, nargs="+", default=[0.95, 0.98])
    ap.add_argument("--train", type=int, default=1000)
    ap.add_argument("--test", type=int, default=5000)
    args = ap.parse_args(argv)
    sets: list[tuple[str, Dataset]] = [
        (f"world {w}", generate(w, args.train, args.test)) for w in args.worlds
    ]
    for rel in SHARED:
        path = Path(args.data) / rel
        if path.exists():
            sets.append((path.stem, load_dataset(path)))
    found: list[float] = []
    print("data       target  chain  accepted  rho2 label  rho2 correct  (every row)")
    for name, ds in sets:
        for target in args.targets:
            r = study(name, ds, target)
            if "accepted" not in r:
                print(f"{name:10} {target:6}  one model: nothing to estimate")
                continue
            cells = [r["rho2_label"], r["rho2_correct"], r["rho2_correct_all_rows"]]
            a, b, c = ("   n/a" if x is None else f"{x:6.3f}" for x in cells)
            chain, accepted = len(r["chain"]), r["accepted"]  # type: ignore[arg-type]
            print(f"{name:10} {target:6}  {chain:5}  {accepted:8.2f}  {a:>10}  {b:>12}  {c:>11}")
            if isinstance(r["rho2_label"], float):
                found.append(r["rho2_label"])
    if found:
        print(
            f"rho2 of the label among accepted answers: median {float(np.median(found)):.3f}, "
            f"max {max(found):.3f}: a difference estimator would cut the label variance by that share"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
