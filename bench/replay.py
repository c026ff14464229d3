"""Replay benchmark: the shared datasets through `cascade replay`'s real HTTP path, checked against the
targets of issue 8. Fits on each dataset's train split, reports on its test split.

    .venv/bin/python bench/replay.py [--data ../shared/data] [--json]

Exit 0 when every target is met, 1 otherwise, 2 when the data is missing. Targets:
* WinoGrande: >= 30 % cost saving at >= 95 % of the best single model's accuracy;
* GSM8K: >= 95 % of GPT-4's accuracy with <= 50 % of requests escalated to it;
* MBPP: never worse than the best single model at equal cost (no single model is at least as accurate
  for no more money).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from app.replay.runner import ReplayOptions, run_replay

DATASETS = {
    "winogrande": "routerbench/winogrande.jsonl",
    "gsm8k": "routellm/gsm8k.jsonl",
    "mbpp": "routerbench/mbpp.jsonl",
}


def dominated(rep: dict[str, Any]) -> bool:
    return any(
        v["cost_usd"] <= rep["cost_usd"]
        and (
            v["accuracy"] > rep["accuracy"]
            or (v["accuracy"] == rep["accuracy"] and v["cost_usd"] < rep["cost_usd"])
        )
        for v in rep["single_models"].values()
    )


def check(name: str, rep: dict[str, Any]) -> tuple[bool, str]:
    if name == "winogrande":
        ok = rep["savings_vs_best"] >= 0.30 and rep["quality_vs_best"] >= 0.95
        return (
            ok,
            f"savings {rep['savings_vs_best']:.1%} >= 30% at quality {rep['quality_vs_best']:.3f} >= 0.95",
        )
    if name == "gsm8k":
        ok = rep["quality_vs_best"] >= 0.95 and rep["escalation_rate"][-1] <= 0.5
        esc = rep["escalation_rate"][-1]
        return ok, f"quality {rep['quality_vs_best']:.3f} >= 0.95 with {esc:.1%} <= 50% escalated"
    ok = not dominated(rep)
    return ok, "not dominated by a single model at equal cost" if ok else "dominated by a single model"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--json", action="store_true", help="print the reports as one JSON object at the end")
    args = ap.parse_args()
    root = Path(args.data)
    if not all((root / p).is_file() for p in DATASETS.values()):
        print(f"shared data not found under {root}", file=sys.stderr)
        return 2
    reports: dict[str, Any] = {}
    all_ok = True
    print(
        "| dataset | cascade | accuracy | x best | $/request | savings vs best | reach per stage | oracle |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, rel in DATASETS.items():
        res = run_replay(ReplayOptions(str(root / rel)))
        rep = res.report
        ok, why = check(name, rep)
        all_ok &= ok and not res.errors
        t = res.scorer_timing
        rep_x = {**rep, "scorer_ms": t, "http_s": res.elapsed_s, "fit_s": res.fit_s}
        reports[name] = rep_x
        print(
            f"| {name} | {' -> '.join(s.rsplit('/', 1)[-1] for s in rep['stages'])} | {rep['accuracy']:.4f} "
            f"| {rep['quality_vs_best']:.3f} | {rep['cost_usd']:.3e} | {rep['savings_vs_best']:.1%} "
            f"| {', '.join(f'{x:.1%}' for x in rep['escalation_rate'])} "
            f"| {rep['oracle']['accuracy']:.4f} @ {rep['oracle']['cost_usd']:.2e} |"
        )
        print(f"  target {'met' if ok else 'MISSED'}: {why}", file=sys.stderr)
        print(
            f"  ({name}: best single {rep['best_single']['model']} {rep['best_single']['accuracy']:.4f} "
            f"@ {rep['best_single']['cost_usd']:.3e}; learned scorer mean {t.get('call_ms_mean', 0):.3f} ms, "
            f"p50 {t.get('call_ms_p50', 0):.3f}, p99 {t.get('call_ms_p99', 0):.3f} per call; "
            f"{rep['n_test']} requests in {res.elapsed_s:.1f} s, fit {res.fit_s:.1f} s)",
            file=sys.stderr,
        )
    if args.json:
        print(json.dumps(reports))
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
