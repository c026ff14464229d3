"""Online learning benchmark (issue 13): `cascade replay --online` on the shared datasets, from a too-loose
start (threshold 0), a too-strict one (1) and the offline fit's, over several seeds, plus a drift run.

    .venv/bin/python bench/online.py [--data ../shared/data] [--seeds 0 1 2] [--sets winogrande gsm8k mbpp]
        [--starts 0 1] [--drift winogrande:gsm8k] [--set learning_key=value ...] [--out runs.jsonl]

Every dataset is fitted once (``online_fit`` on its train rows, as ``cascade replay --online`` does) and
the fit is reused by its runs. Streams shorter than ``MIN_REQUESTS`` are repeated (``--passes``). Prints one
line per run and, per dataset and start, the median and range over the seeds of: labelled requests to
the target, the lowest rolling quality after it, final rolling quality and savings, savings as a share
of the offline thresholds' on the same rows, and label spend as a share of the run's total.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from app.replay.dataset import load_dataset
from app.replay.online import OnlineOptions, online_fit, run_online

DATASETS = {
    "winogrande": "routerbench/winogrande.jsonl",
    "gsm8k": "routellm/gsm8k.jsonl",
    "mbpp": "routerbench/mbpp.jsonl",
}
MIN_REQUESTS = 2500


def _value(v: str) -> Any:
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return {"null": None, "true": True, "false": False}.get(v, v)


def _row(name: str, start: str, seed: int, rep: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "labels_to_target",
        "min_rolling_quality_vs_best_after_target",
        "final_quality_vs_best",
        "final_savings_vs_best",
        "savings_vs_offline",
        "shadow_cost_share",
        "labels_to_target_after_drift",
        "min_rolling_quality_vs_best_after_drift_target",
    )
    out = {"set": name, "start": start, "seed": seed, **{k: rep.get(k) for k in keys}}
    out["offline_final_quality"] = rep["offline"]["final_quality_vs_best"]
    out["offline_final_savings"] = rep["offline"]["final_savings_vs_best"]
    out["offline_min_rolling"] = rep["offline"].get("min_rolling_quality_vs_best_after_target")
    out["requests"] = rep["requests"]
    return out


def _fmt(xs: list[Any], pct: bool = True) -> str:
    vals = [x for x in xs if x is not None]
    if not vals:
        return "-"
    med = statistics.median(vals)
    miss = f" ({len(xs) - len(vals)} none)" if len(vals) < len(xs) else ""
    if pct:
        return f"{med:.1%} [{min(vals):.1%}, {max(vals):.1%}]{miss}"
    return f"{med:.0f} [{min(vals):.0f}, {max(vals):.0f}]{miss}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--min-requests", type=int, default=MIN_REQUESTS, help="repeat shorter streams")
    ap.add_argument("--sets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    ap.add_argument("--starts", nargs="+", default=["0", "1"], help="start thresholds ('fit': the fit's)")
    ap.add_argument("--drift", nargs="*", default=["winogrande:gsm8k"], help="A:B pairs")
    ap.add_argument("--shadow-rate", type=float, default=0.1)
    ap.add_argument("--feedback-rate", type=float, default=0.0)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", help="append one JSON line per run")
    args = ap.parse_args()
    data = Path(args.data)
    if not data.is_dir():
        print(f"no data at {data}", file=sys.stderr)
        return 2
    learning = {k: _value(v) for k, v in (o.split("=", 1) for o in args.overrides)}
    fits: dict[str, Any] = {}

    def fitted(name: str) -> Any:
        if name not in fits:
            ds = load_dataset(data / DATASETS[name])
            fits[name] = (online_fit(ds)[0], len(ds.rows))
        return fits[name]

    runs: list[dict[str, Any]] = []
    plan = [(n, s, None) for n in args.sets for s in args.starts]
    plan += [(pair.split(":")[0], "fit", pair.split(":")[1]) for pair in args.drift]
    for name, start, other in plan:
        f, n_rows = fitted(name)
        for seed in args.seeds:
            t0 = time.perf_counter()
            opts = OnlineOptions(
                dataset=str(data / DATASETS[name]),
                seed=seed,
                start_threshold=None if start == "fit" else float(start),
                shadow_rate=args.shadow_rate,
                feedback_rate=args.feedback_rate,
                drift=str(data / DATASETS[other]) if other else None,
                passes=max(1, math.ceil(args.min_requests / n_rows)),
                fitted=f,
                learning=learning,
            )
            rep = run_online(opts).report
            row = _row(name if other is None else f"{name}->{other}", start, seed, rep)
            row["seconds"] = round(time.perf_counter() - t0, 1)
            runs.append(row)
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps({**row, "learning": learning, "report": rep}) + "\n")
    print()
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["set"], r["start"]), []).append(r)
    for (name, start), rs in groups.items():
        print(f"{name} start {start}: seeds {[r['seed'] for r in rs]}")
        print(f"  labels to target          {_fmt([r['labels_to_target'] for r in rs], pct=False)}")
        print(
            f"  min rolling q after       {_fmt([r['min_rolling_quality_vs_best_after_target'] for r in rs])}"
        )
        print(f"  ... offline, same windows {_fmt([r['offline_min_rolling'] for r in rs])}")
        print(f"  final quality / savings   {_fmt([r['final_quality_vs_best'] for r in rs])} / "
              f"{_fmt([r['final_savings_vs_best'] for r in rs])}")  # fmt: skip
        print(f"  offline q / s (same rows) {_fmt([r['offline_final_quality'] for r in rs])} / "
              f"{_fmt([r['offline_final_savings'] for r in rs])}")  # fmt: skip
        print(f"  savings vs offline        {_fmt([r['savings_vs_offline'] for r in rs])}")
        print(f"  label spend share         {_fmt([r['shadow_cost_share'] for r in rs])}")
        if "->" in name:
            after = [r["labels_to_target_after_drift"] for r in rs]
            print(f"  labels to target (drift)  {_fmt(after, pct=False)}")
            print(
                "  min rolling q after (d)   "
                f"{_fmt([r['min_rolling_quality_vs_best_after_drift_target'] for r in rs])}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
