"""``cascade replay DATASET --online``: arguments, the printed table, ``--json`` and ``--plot``.

Exit 0 on a complete run, 1 when some requests failed, 2 on bad input (dataset, ``--drift`` dataset,
config, out-of-range or misplaced flags, missing matplotlib for ``--plot``)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

EXIT_FAILED_REQUESTS = 1
EXIT_BAD_INPUT = 2

ONLINE_ONLY = (
    ("--start-threshold", "start_threshold"),
    ("--shadow-rate", "shadow_rate"),
    ("--feedback-rate", "feedback_rate"),
    ("--drift", "drift"),
    ("--passes", "passes"),
    ("--sync-every", "sync_every"),
    ("--no-judge", "no_judge"),
    ("--judge-model", "judge_model"),
    ("--replicas", "replicas"),
    ("--store", "store"),
)


def offline_misuse(args: argparse.Namespace) -> str | None:
    """What is wrong with online-only flags given without ``--online``, if anything."""
    wrong = [flag for flag, dest in ONLINE_ONLY if getattr(args, dest, None) not in (None, False)]
    return f"{', '.join(wrong)}: only with --online" if wrong else None


def _options(args: argparse.Namespace) -> Any:
    from app.learning.train import DEFAULT_MAX_STAGES
    from app.replay.cli import _mapping, prices_of
    from app.replay.online import OnlineOptions

    opts = OnlineOptions(
        dataset=args.dataset,
        config=args.config,
        cascade=args.cascade,
        mapping=_mapping(args.map),
        margin_z=args.margin_z,
        max_stages=args.max_stages if args.max_stages is not None else DEFAULT_MAX_STAGES,
        limit=args.limit,
        work_dir=args.work_dir,
        judge=not args.no_judge,
        judge_model=args.judge_model,
        drift=args.drift,
        store=args.store,
        pass_score=args.pass_score,
        prices=prices_of(args.price),
    )
    for dest in (
        "target_quality",
        "seed",
        "start_threshold",
        "shadow_rate",
        "feedback_rate",
        "passes",
        "sync_every",
        "replicas",
    ):
        value = getattr(args, dest)
        if value is not None:
            setattr(opts, dest, value)
    return opts


def cmd_online(args: argparse.Namespace) -> int:
    from app.config import ConfigError
    from app.replay.configure import ReplayError
    from app.replay.online import run_online
    from app.replay.report import ProgressBar

    try:
        if args.plot:
            from app.replay.plot import require_matplotlib

            require_matplotlib(args.plot)
        opts = _options(args)
        bar = None if args.quiet else ProgressBar("online")
        result = run_online(opts, bar)
    except ConfigError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return EXIT_BAD_INPUT
    except (ReplayError, argparse.ArgumentTypeError) as exc:
        print(f"cascade replay: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(format_online(result.report))
    if args.plot:
        from app.replay.online_plot import plot_online

        plot_online(result.report, args.plot)
        print(f"plot: {args.plot}")
    if args.json:
        print(json.dumps(result.report, sort_keys=False))
    return EXIT_FAILED_REQUESTS if result.errors else 0


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def _raised(rep: dict[str, Any]) -> str:
    at = rep.get("tuner_label_quality_at_offline")
    if at is None or rep["tuner_target_quality"] == at:
        return ""
    if rep["tuner_target_quality"] < at:
        if rep.get("tuner_label_floor") != rep["tuner_target_quality"]:
            return ""  # capped at 0.999 (the offline thresholds escalate everything)
        return (
            f", the label floor, under {at:.4f} at the offline thresholds: they serve the first stage alone, "
            "and nothing is cheaper"
        )
    return (
        f", raised from {at:.4f} at the offline thresholds: on the train rows, the cheapest thresholds with "
        "that label quality miss the target"
    )


def format_online(rep: dict[str, Any]) -> str:
    """The human summary: per window quality and savings against the best single model, thresholds."""
    from app.replay.dataset import price_notes

    drift = f" -> {rep['drift']} at request {rep['drift_at']}" if rep.get("drift") else ""
    lines = [
        f"online: {rep['dataset']}{drift}, {rep['requests']} requests, seed {rep['seed']}, "
        f"cascade {' -> '.join(m.rsplit('/', 1)[-1] for m in rep['stages'])}",
        f"target {rep['target_quality']:.3f} of the best single model (learning.target_quality "
        f"{rep['tuner_target_quality']:.4f}{_raised(rep)}); start thresholds {rep['start_thresholds']}",
        f"{'requests':>8} {'labels':>6} {'quality':>8} {'savings':>8} {'rolling q':>9} {'rolling s':>9}"
        "  thresholds",
    ]
    lines[2:2] = [f"note: {x}" for x in price_notes(rep.get("prices") or {})]
    for w in rep["windows"]:
        lines.append(
            f"{w['requests']:>8} {w['labels']:>6} {_pct(w['quality_vs_best']):>8} "
            f"{_pct(w['savings_vs_best']):>8} "
            f"{_pct(w['rolling_quality_vs_best']):>9} {_pct(w['rolling_savings_vs_best']):>9}  "
            f"{', '.join(f'{t:.3f}' for t in w['thresholds'])}"
        )
    off = rep["offline"]
    lines += [
        f"labels to target: {rep['labels_to_target']}; lowest rolling quality after: "
        f"{_pct(rep['min_rolling_quality_vs_best_after_target'])}",
        f"final (last 500): quality {_pct(rep['final_quality_vs_best'])}, savings "
        f"{_pct(rep['final_savings_vs_best'])}, {_pct(rep.get('final_serving_savings_vs_best'))} without the "
        f"label calls (offline thresholds {_pct(off['final_quality_vs_best'])}, "
        f"{_pct(off['final_savings_vs_best'])}); label spend {_pct(rep.get('shadow_cost_share'))} "
        "of the total",
    ]
    if rep.get("drift"):
        lines.append(
            f"after the drift: labels to target {rep['labels_to_target_after_drift']}, lowest rolling "
            f"quality after {_pct(rep['min_rolling_quality_vs_best_after_drift_target'])}"
        )
    changes = rep.get("changes") or []
    said = ", ".join(_change(c) for c in changes)
    lines.append(f"label quality or traffic changed (fits started over): {said or 'never'}")
    return "\n".join(lines)


def _change(c: dict[str, Any]) -> str:
    moved = c.get("first_scores")
    if moved:
        return (
            f"request {c['requests']} (first-stage scores of the newest {moved['requests']} averaged "
            f"{moved['mean_now']:.2f} against {moved['mean_before']:.2f} before, KS D {moved['d']:.2f})"
        )
    shifted = c.get("shifted_stages")
    if shifted:
        (stage, (before, now, *newest)), *_ = shifted.items()
        of = f"the newest {newest[0]}" if newest else "the newest"
        return f"request {c['requests']} (stage {stage} took {_pct(now)} of {of}, {_pct(before)} before)"
    return f"request {c['requests']} (z {c['z']:+.1f}, newest {c['labelled_newest']})"
