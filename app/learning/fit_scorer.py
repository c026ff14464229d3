"""``cascade fit-scorer --from-store``: learned stage scorers fitted from the labelled traces in the store.

The traces must carry their texts (``learning.store_text: true`` when they were recorded). For each
scored stage ``k`` of the cascade (every stage but the last) the training examples are the labelled
answers of that stage: the prompt, the stage's answer, the answers of the earlier stages it saw (those
it was scored after, as at request time) and its finish reason; the label is the one the fit of the
thresholds uses (free: it agreed with the last stage's answer; shadow; or the user's score, which
overrides them), weighted by the inverse of the chance the request was labelled (1, or 1/shadow_rate
for shadowed requests). Only traces that ran on the upstreams the cascade has now are used; their
scorers and thresholds may differ (fitting a learned scorer to replace them is the point).

Each stage's model (``app.learning.train.crossfit_stage_scorer``: calibrated, P(good)) is written as
``DIR/stage{k}.json``, usable as ``{type: learned, model: DIR/stage{k}.json}``. Thresholds for the new
scorers are then chosen like ``cascade calibrate`` does (the cheapest meeting ``target_quality``), on
the new scorers' cross-fitted scores of the same labelled requests (each answer scored by a model
fitted without it, so the thresholds are not chosen on scores the model has memorised), and written
with a summary to ``DIR/cascade.json`` and as a config snippet to ``DIR/cascade.yaml``. Exit codes:
0 done, 1 not enough labelled answers with text (or none: store_text was off), 2 config or usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.config import Config, ConfigError, LearningConfig
from app.errors import CascadeBaseError
from app.learning.calibration import Calibration, assemble, fit
from app.learning.store import LabelledData, LabelledTexts, Store, StoreError
from app.learning.train import StageExample, crossfit_stage_scorer
from app.scoring.features import extract_features
from app.scoring.model import LogisticModel

EXIT_OK, EXIT_LABELS, EXIT_CONFIG = 0, 1, 2


class FitError(CascadeBaseError):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class StageSet:
    """The training examples of one scored stage."""

    stage: int
    upstream: str
    examples: list[StageExample] = field(default_factory=list)
    labels: list[float] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    sources: Counter[str] = field(default_factory=Counter)
    ids: list[str] = field(default_factory=list)  # the trace of each example

    @property
    def good(self) -> int:
        return sum(1 for v in self.labels if v > 0.5)

    @property
    def bad(self) -> int:
        return len(self.labels) - self.good


@dataclass
class Collected:
    stages: list[StageSet]
    labelled: int  # labelled requests of the cascade on its current upstreams
    with_text: int  # ... of which the prompt text was kept
    other_upstreams: int  # labelled requests that ran on other upstreams (left out)


def _answered(outcome: str, reason: str, text: str | None) -> bool:
    """Whether a stage's answer was scored and passed on to later stages' scorers (``previous``)."""
    return text is not None and outcome == "rejected" and reason == "low_score"


def collect(data: LabelledTexts, upstreams: Sequence[str]) -> Collected:
    """Per scored stage, the labelled answers with their texts (pure; see the module docstring)."""
    K = len(upstreams)
    labels: dict[str, dict[int, tuple[str, float]]] = defaultdict(dict)
    user: dict[str, dict[int | None, float]] = defaultdict(dict)
    shadow_w: dict[str, float] = {}
    for _lid, tid, stage, source, value, weight, _cost in data.labels:  # by id: later ones win
        if source == "user":
            user[tid][stage] = float(value)
        elif stage is not None:
            labels[tid][int(stage)] = (source, float(value))
        if source == "shadow":
            shadow_w[tid] = max(shadow_w.get(tid, 0.0), float(weight))
    attempts: dict[str, list[tuple[int, str, str, str, str | None, str | None]]] = defaultdict(list)
    for tid, stage, upstream, outcome, reason, _cost, finish, text in data.attempts:
        attempts[tid].append((int(stage), upstream, outcome, reason, finish, text))

    sets = [StageSet(k, upstreams[k]) for k in range(K - 1)]
    labelled = with_text = other = 0
    for tid, n, accepted, _baseline, prompt in data.traces:
        atts = sorted(attempts.get(tid, []))
        if n != K or any(a[0] >= K or a[1] != upstreams[a[0]] for a in atts):
            other += 1
            continue
        got = dict(labels.get(tid, {}))
        for stage, value in user.get(tid, {}).items():
            k = accepted if stage is None else int(stage)
            if k is not None:
                got[k] = ("user", value)  # the user's word overrides a free or shadow label
        if not any(k < K - 1 for k in got):
            continue
        labelled += 1
        if prompt is None:
            continue
        with_text += 1
        weight = shadow_w.get(tid, 1.0)
        previous: list[str] = []
        for stage, _up, outcome, reason, finish, text in atts:
            if stage < K - 1 and stage in got and text is not None and reason != "early_abort":
                source, value = got[stage]
                s = sets[stage]
                s.examples.append(StageExample(prompt, text, tuple(previous), None, finish))
                s.labels.append(value)
                s.weights.append(weight)
                s.sources[source] += 1
                s.ids.append(tid)
            if _answered(outcome, reason, text):
                assert text is not None
                previous.append(text)
    return Collected(sets, labelled, with_text, other)


def rescored(
    data: LabelledTexts,
    upstreams: Sequence[str],
    models: Sequence[LogisticModel],
    fixed: Mapping[tuple[str, int], float] | None = None,
) -> LabelledData:
    """The labelled requests (with texts) as the threshold fit reads them, scored by the new models;
    ``fixed`` (trace id, stage) -> score takes precedence: the cross-fitted scores of the answers the
    models were fitted on, so the thresholds are chosen on scores the models did not see."""
    K = len(upstreams)
    by_trace: dict[str, list[tuple[int, str, str, str, float, str | None, str | None]]] = defaultdict(list)
    for tid, stage, upstream, outcome, reason, cost, finish, text in data.attempts:
        by_trace[tid].append((int(stage), upstream, outcome, reason, float(cost), finish, text))
    traces: list[tuple[str, int, int | None, float]] = []
    attempts: list[tuple[str, int, str, float | None, float]] = []
    for tid, n, accepted, baseline, prompt in data.traces:
        atts = sorted(by_trace.get(tid, []))
        if prompt is None or n != K or any(a[0] >= K or a[1] != upstreams[a[0]] for a in atts):
            continue
        traces.append((tid, n, accepted, baseline))
        previous: list[str] = []
        for stage, _up, outcome, reason, cost, finish, text in atts:
            score: float | None = None
            if reason == "early_abort":
                score = 0.0  # rejected while streaming, before any scorer ran (as at request time)
            elif fixed is not None and (tid, stage) in fixed:
                score = fixed[(tid, stage)]
            elif stage < K - 1 and text is not None and outcome != "error":
                m = models[stage]
                x = extract_features(prompt, text, previous, None, finish, m.feature_spec)
                score = m.predict_proba(x)
            attempts.append((tid, stage, outcome, score, cost))
            if _answered(outcome, reason, text):
                assert text is not None
                previous.append(text)
    return LabelledData(traces, attempts, list(data.labels))


# --- the command ------------------------------------------------------------------------------------------


def cmd_fit_from_store(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except FitError as exc:
        print(f"cascade fit-scorer: {exc}", file=sys.stderr)
        return exc.code
    except ConfigError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return EXIT_CONFIG


def _pick_cascade(cfg: Config, path: str, name: str | None) -> str:
    names = [n for n, c in cfg.cascades.items() if len(c.stages) > 1]
    if name is not None:
        if name not in names:
            raise FitError(f"--cascade: no cascade '{name}' with two stages or more in {path}", EXIT_CONFIG)
        return name
    if not names:
        raise FitError(f"{path}: no cascade has a scored stage; nothing to fit", EXIT_CONFIG)
    return "default" if "default" in names else names[0]


def _run(args: argparse.Namespace) -> int:
    from app.settings import load_effective

    path, cfg = load_effective(args.config, {})
    lcfg = cfg.learning
    if lcfg is None:
        raise FitError(f"{path}: no 'learning' section, so there is no trace store to read", EXIT_CONFIG)
    name = _pick_cascade(cfg, path, args.cascade)
    upstreams = [s.upstream for s in cfg.cascades[name].stages]
    target = args.target_quality if args.target_quality is not None else lcfg.target_quality
    margin_z = args.margin_z if args.margin_z is not None else lcfg.margin_z
    min_labels = args.min_labels if args.min_labels is not None else lcfg.min_labels
    if lcfg.store.startswith("sqlite:///") and not Path(lcfg.store.removeprefix("sqlite:///")).exists():
        raise FitError(
            f"no trace store at {lcfg.store.removeprefix('sqlite:///')}: serve with 'learning' enabled "
            "(and learning.store_text: true) first, so requests, texts and labels are recorded",
            EXIT_LABELS,
        )
    data = asyncio.run(_read(lcfg, name))
    got = collect(data, upstreams)
    _check(got, name, lcfg, path, min_labels)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    models: list[LogisticModel] = []
    files: list[str] = []
    oof: dict[tuple[str, int], float] = {}
    for s in got.stages:
        meta = {
            "source": "traces",
            "cascade": name,
            "stage": s.stage,
            "upstream": s.upstream,
            "model": cfg.upstreams[s.upstream].model,
            "previous": upstreams[: s.stage],
            "n_train": len(s.labels),
            "labels_by_source": dict(sorted(s.sources.items())),
        }
        cf = crossfit_stage_scorer(s.examples, s.labels, s.weights, meta=meta)
        p = out / f"stage{s.stage}.json"
        cf.model.save(p)
        models.append(cf.model)
        files.append(str(p.resolve()))
        oof.update({(tid, s.stage): float(v) for tid, v in zip(s.ids, cf.oof, strict=True)})
    rows = assemble(rescored(data, upstreams, models, oof), len(upstreams))
    cal = fit(rows, target, margin_z=margin_z, bounds=lcfg.threshold_bounds, honest=True) if rows.n else None
    summary = _summary(name, upstreams, got, cal, rows.n, target, margin_z, files)
    (out / "cascade.json").write_text(json.dumps(summary, indent=1, sort_keys=True), encoding="utf-8")
    (out / "cascade.yaml").write_text(_snippet(name, upstreams, cal, files), encoding="utf-8")
    _report(name, upstreams, got, cal, rows.n, target, files, out)
    return EXIT_OK


async def _read(lcfg: LearningConfig, name: str) -> LabelledTexts:
    store = Store(lcfg.store)
    try:
        await store.open()
        return await store.labelled_texts(name)
    except StoreError as exc:
        raise FitError(str(exc), EXIT_LABELS) from exc
    finally:
        await store.close()


def _check(got: Collected, name: str, lcfg: LearningConfig, path: str, min_labels: int) -> None:
    if got.labelled == 0:
        more = f" ({got.other_upstreams} ran on other upstreams)" if got.other_upstreams else ""
        raise FitError(
            f"no labelled requests of cascade '{name}' on its current upstreams in the store{more}: serve "
            "with learning.store_text: true and collect labels (escalated requests label themselves; "
            "learning.shadow_rate; POST /v1/feedback)",
            EXIT_LABELS,
        )
    if got.with_text == 0:
        now = "is still off" if not lcfg.store_text else "is on now, but was off when they were recorded"
        raise FitError(
            f"the store has {got.labelled} labelled requests of cascade '{name}' but no texts: "
            f"learning.store_text {now} ({path}). A learned scorer needs the prompt and answer texts: "
            "set learning.store_text: true, serve, and collect labels again",
            EXIT_LABELS,
        )
    problems = []
    for s in got.stages:
        where = f"stage {s.stage} ({s.upstream})"
        if len(s.labels) < min_labels:
            problems.append(
                f"{where}: {len(s.labels)} labelled answers with text, need {min_labels} "
                "(--min-labels, default learning.min_labels)"
            )
        elif s.good == 0 or s.bad == 0:
            kind = "good" if s.bad == 0 else "bad"
            problems.append(f"{where}: all {len(s.labels)} labelled answers are {kind}; a scorer needs both")
    if problems:
        skipped = got.labelled - got.with_text
        note = f" ({skipped} labelled requests without texts were left out)" if skipped else ""
        raise FitError(f"not enough labelled answers to fit{note}: " + "; ".join(problems), EXIT_LABELS)


def _summary(
    name: str,
    upstreams: list[str],
    got: Collected,
    cal: Calibration | None,
    n_rows: int,
    target: float,
    margin_z: float,
    files: list[str],
) -> dict[str, Any]:
    return {
        "source": "traces",
        "cascade": name,
        "upstreams": upstreams,
        "labelled_requests": got.labelled,
        "with_text": got.with_text,
        "stages": [
            {
                "stage": s.stage,
                "upstream": s.upstream,
                "file": f,
                "n": len(s.labels),
                "good": s.good,
                "bad": s.bad,
                "labels_by_source": dict(sorted(s.sources.items())),
            }
            for s, f in zip(got.stages, files, strict=True)
        ],
        "target_quality": target,
        "margin_z": margin_z,
        "rows": n_rows,
        "thresholds": list(cal.thresholds) if cal is not None else None,
        "feasible": cal.search.feasible if cal is not None else None,
        "quality": cal.chosen.quality if cal is not None else None,
        "quality_se": cal.chosen.quality_se if cal is not None else None,
        "cost_usd": cal.chosen.cost if cal is not None else None,
        "reach": list(cal.chosen.reach) if cal is not None else None,
    }


def _snippet(name: str, upstreams: list[str], cal: Calibration | None, files: list[str]) -> str:
    lines = [
        "# Generated by `cascade fit-scorer --from-store`: the stages of cascade "
        f"'{name}' with the learned scorers and thresholds fitted for them.",
        "cascades:",
        f"  {name}:",
        "    stages:",
    ]
    for k, up in enumerate(upstreams):
        lines.append(f"      - upstream: {up}")
        if k < len(upstreams) - 1:
            t = cal.thresholds[k] if cal is not None else 0.5
            lines.append(f"        threshold: {t!r}")
            lines.append(f"        scorers: [{{type: learned, model: {json.dumps(files[k])}}}]")
    return "\n".join(lines) + "\n"


def _report(
    name: str,
    upstreams: list[str],
    got: Collected,
    cal: Calibration | None,
    n_rows: int,
    target: float,
    files: list[str],
    out: Path,
) -> None:
    print(
        f"cascade '{name}': {' -> '.join(upstreams)}; {got.with_text} labelled requests with text "
        f"(of {got.labelled})"
    )
    for s, f in zip(got.stages, files, strict=True):
        src = ", ".join(f"{k} {v}" for k, v in sorted(s.sources.items()))
        counts = f"{len(s.labels)} answers ({s.good} good, {s.bad} bad; {src})"
        print(f"stage{s.stage} ({s.upstream}): {counts}: {f}")
    if cal is None:
        print("thresholds: not fitted (no labelled request has a reference answer)")
    else:
        ch = cal.chosen
        status = "met" if cal.search.feasible else "NOT met"
        print(
            f"thresholds: {', '.join(f'{t:.4f}' for t in cal.thresholds)} on {n_rows} labelled requests: "
            f"quality {ch.quality:.4f} +-{ch.quality_se:.4f} (target {target:.3f}, {status}), "
            f"${ch.cost:.3e}/request, reach {', '.join(f'{x:.1%}' for x in ch.reach)}"
        )
    print(f"config snippet: {out / 'cascade.yaml'}")
