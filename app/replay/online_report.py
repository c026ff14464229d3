"""The report of ``cascade replay --online``: windows of requests, rolling figures, convergence. Pure.

Per window of ``WINDOW`` (100) requests: ``quality_vs_best`` = the cascade's accuracy / the best single
model's accuracy on the same rows, ``savings_vs_best`` = 1 - (what the cascade spent, label calls
included) / (what the best single model would have spent) on the same rows, the thresholds in force at
the window's end and the labelled requests so far (``labels``). The best single model is the most
accurate one of the row's own dataset over the whole stream (after a ``--drift``, the other dataset's).

A 100-request window has about +-3 points of binomial noise, so each window also carries the
``rolling_`` figures over the last ``ROLLING`` (500) requests (fewer at the start, and never reaching
back over the drift point), and the convergence figures use those:

* ``labels_to_target``: the labelled requests at the end of the first window of the first rolling span
  (500 requests) whose quality is within 1 point below the target (quality is a floor: being above it
  is judged by the savings), i.e. what the tuner had when it began serving at the target. Not the
  labels when that span ended: a trailing window lags its thresholds by up to 500 requests, and where
  most requests escalate (each a free label) that lag alone is hundreds of labels (a 14,000-request
  generated world from the loose start: the thresholds rose after 39 labels, the first span at the target
  began with a window ending at 139, and the trailing span that showed it ended at 529);
* ``min_rolling_quality_vs_best_after_target``, ``min_window_quality_vs_best_after_target``: the lowest
  figure from the end of that span on (until the drift, if any);
* ``final_quality_vs_best``, ``final_savings_vs_best``: rolling, at the end; ``offline`` gives the
  same figures of the offline thresholds on the same rows, and ``savings_vs_offline`` the ratio;
  ``final_serving_savings_vs_best`` and ``serving_savings_vs_offline`` the same with the label calls'
  cost left out: what the thresholds the tuner ended on save, apart from what learning them cost (the
  offline thresholds had every label free);
* ``offline.min_rolling_quality_vs_best_after_target``: the offline thresholds' lowest rolling quality
  over the same windows: fixed thresholds dip too (a 500-request window carries 1.5-2 points of
  binomial noise), which is what the online floor is to be read against;
* with a drift, the same after it: ``labels_to_target_after_drift`` (labels since the switch) and
  ``min_rolling_quality_vs_best_after_drift_target``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from app.replay.dataset import quality_vs_best, savings_vs_best

WINDOW = 100
ROLLING = 500
WITHIN = 0.01  # "within 1 point" of the target
FLOOR = 0.02  # "never more than 2 points below" it
SPAN = ROLLING // WINDOW  # windows in a rolling figure


@dataclass
class Served:
    """One request of the stream as the proxy served it."""

    index: int
    source: str  # the row's dataset
    row_id: str
    correct: bool
    cost: float  # what the request cost (its cascade.cost_usd)
    best_correct: bool  # the best single model on this row
    best_cost: float
    stage: int = -1
    completion_id: str = ""
    error: str | None = None
    thresholds: list[float] = field(default_factory=list)
    label_cost: float = 0.0  # label calls made for it (shadow, judge)
    labelled: bool = False
    labels: int = 0  # labelled requests so far, this one included


def _figures(rows: Sequence[Served], labels: bool = True) -> tuple[float, float | None]:
    """(quality_vs_best, savings_vs_best) of ``rows``; ``labels=False`` leaves the label calls' cost out
    (what the thresholds in force serve for)."""
    best = sum(s.best_correct for s in rows)
    best_cost = sum(s.best_cost for s in rows)
    acc = sum(s.correct for s in rows)
    cost = sum(s.cost + (s.label_cost if labels else 0.0) for s in rows)
    quality = quality_vs_best(acc, best)
    savings = savings_vs_best(cost, best_cost)
    return round(quality, 4), None if savings is None else round(savings, 4)


def windows(served: Sequence[Served], drift_at: int | None = None) -> list[dict[str, Any]]:
    out = []
    for end in range(WINDOW, len(served) + 1, WINDOW):
        q, s = _figures(served[end - WINDOW : end])
        start = max(0, end - ROLLING)
        if drift_at is not None and start < drift_at < end:
            start = drift_at
        rq, rs = _figures(served[start:end])
        last = served[end - 1]
        out.append(
            {
                "requests": end,
                "labels": last.labels,
                "quality_vs_best": q,
                "savings_vs_best": s,
                "thresholds": [round(t, 4) for t in last.thresholds],
                "rolling_quality_vs_best": rq,
                "rolling_savings_vs_best": rs,
                "source": last.source,
            }
        )
    return out


def _convergence(ws: Sequence[dict[str, Any]], target: float, since_labels: int = 0) -> dict[str, Any]:
    reached = next((i for i, w in enumerate(ws) if w["rolling_quality_vs_best"] >= target - WITHIN), None)
    if reached is None:
        return {"labels_to_target": None, "min_rolling": None, "min_window": None, "after": []}
    after = ws[reached:]
    # The span of that rolling figure: it starts SPAN - 1 windows earlier (less at the stream's start or
    # at a drift, where ``ws`` starts); no earlier span was within the point (its figure came earlier).
    first = max(0, reached - (SPAN - 1))
    return {
        "labels_to_target": ws[first]["labels"] - since_labels,
        "min_rolling": min(w["rolling_quality_vs_best"] for w in after),
        "min_window": min(w["quality_vs_best"] for w in after[1:]) if len(after) > 1 else None,
        "after": after,
    }


def _same_span(ref: Sequence[dict[str, Any]], span: Sequence[dict[str, Any]]) -> float | None:
    """The lowest rolling quality of the reference's windows over the online run's ``span`` (the same
    requests): how far fixed thresholds, fitted with every label known, dip on the same rows by the
    window's own sampling noise alone. The floor of the online figures is to be read against it."""
    ends = {w["requests"] for w in span}
    qs = [w["rolling_quality_vs_best"] for w in ref if w["requests"] in ends]
    return min(qs) if qs else None


def summarise(
    online: Sequence[Served], offline: Sequence[Served], *, target: float, drift_at: int | None = None
) -> dict[str, Any]:
    ws = windows(online, drift_at)
    before = [w for w in ws if drift_at is None or w["requests"] <= drift_at]
    c = _convergence(before, target)
    tail = online[-ROLLING:] if drift_at is None else online[max(drift_at, len(online) - ROLLING) :]
    off_tail = offline[-ROLLING:] if drift_at is None else offline[max(drift_at, len(offline) - ROLLING) :]
    fq, fs = _figures(tail)
    _, serving = _figures(tail, labels=False)
    oq, os_ = _figures(off_tail)
    wq, wsv = _figures(offline)
    ows = windows(offline, drift_at)
    report: dict[str, Any] = {
        "windows": ws,
        "target_quality": target,
        "requests": len(online),
        "labels": online[-1].labels if online else 0,
        "labels_to_target": c["labels_to_target"],
        "final_quality_vs_best": fq,
        "final_savings_vs_best": fs,
        "min_window_quality_vs_best_after_target": c["min_window"],
        "min_rolling_quality_vs_best_after_target": c["min_rolling"],
        "offline": {
            "final_quality_vs_best": oq,
            "final_savings_vs_best": os_,
            "quality_vs_best": wq,
            "savings_vs_best": wsv,
            "windows": ows,
            "min_rolling_quality_vs_best_after_target": _same_span(ows, c["after"]),
        },
        "savings_vs_offline": round(fs / os_, 4) if fs is not None and os_ is not None and os_ > 0 else None,
        # The same without the label calls: what the tuner's thresholds save, apart from what learning cost.
        "final_serving_savings_vs_best": serving,
        "serving_savings_vs_offline": (
            round(serving / os_, 4) if serving is not None and os_ is not None and os_ > 0 else None
        ),
        "errors": sum(1 for s in online if s.error),
    }
    if drift_at is not None:
        at = online[drift_at - 1].labels if 0 < drift_at <= len(online) else 0
        after = [w for w in ws if w["requests"] > drift_at]
        d = _convergence(after, target, since_labels=at)
        report["labels_to_target_after_drift"] = d["labels_to_target"]
        report["min_rolling_quality_vs_best_after_drift_target"] = d["min_rolling"]
    return report
