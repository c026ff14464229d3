"""Helpers for the trace store, feedback, shadow, calibrate and auto-tune tests."""

from __future__ import annotations

import random
import re
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from app.config import parse_config
from app.learning.calibration import Entry, make_entry
from app.learning.records import AttemptRow, LabelRow, TraceRow, plan_fingerprint
from app.learning.service import Learning


def with_learning(cfg: dict[str, Any], store: str, **learning: Any) -> dict[str, Any]:
    cfg["learning"] = {"store": store, **learning}
    return cfg


def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'data' / 'traces.db'}"


def learning_of(app: FastAPI) -> Learning:
    learning = app.state.cascade.learning
    assert learning is not None
    return learning  # type: ignore[no-any-return]


async def settle(app: FastAPI) -> None:
    """Wait until shadow calls are done and every queued record and label is stored."""
    learning = learning_of(app)
    await learning.shadow.wait_idle()
    await learning.flush()


def query(url: str, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(url.removeprefix("sqlite:///"))
    try:
        return list(conn.execute(sql, args))
    finally:
        conn.close()


def db_bytes(url: str) -> bytes:
    """The SQLite file and its WAL together (what an attacker with the disk would see)."""
    path = Path(url.removeprefix("sqlite:///"))
    wal = path.with_name(path.name + "-wal")
    return path.read_bytes() + (wal.read_bytes() if wal.exists() else b"")


def synthetic(
    cfg: dict[str, Any],
    n: int,
    *,
    threshold: float = 0.7,
    shadow_rate: float = 0.5,
    seed: int = 1,
    cut: Callable[[int], float] = lambda i: 0.4,
    low: float = 0.0,
) -> tuple[list[TraceRow], list[LabelRow]]:
    """Labelled traces of the 2-stage cascade 'default' in ``cfg``, as the proxy would record them.

    Stage 0's answer is right (as good as stage 1's) when its score (uniform from ``low`` to 1) is above
    ~0.4 (``cut`` of the request's index, with 10 % noise).
    Requests below ``threshold`` escalate (free labels, weight 1); a ``shadow_rate`` share of the others
    carry a shadow label (weight 1/rate). Costs: stage 0 $1e-6, stage 1 $1e-4 per request.
    """
    config = parse_config(cfg, env={})
    fp = plan_fingerprint(config, config.cascades["default"])
    rng = random.Random(seed)
    traces, labels = [], []
    t0 = time.time() - n  # recent: inside the store's retention window, one second apart
    for i in range(n):
        s = round(low + (1.0 - low) * rng.random(), 4)
        good = (s > cut(i)) != (rng.random() < 0.1)
        escalated = s < threshold
        tid = f"chatcmpl-syn{seed}-{i}"
        atts = [_attempt(0, "small", "rejected" if escalated else "accepted", s, threshold, 1e-6)]
        if escalated:
            atts.append(_attempt(1, "large", "accepted", None, None, 1e-4))
        accepted = 1 if escalated else 0
        traces.append(
            TraceRow(
                tid, f"req-{i}", "default", fp, 0, t0 + i, True, False, 2, accepted,
                sum(a.cost_usd for a in atts), 1e-4, 10.0, "h", 10, None, atts,
            )
        )  # fmt: skip
        if escalated:
            labels.append(LabelRow(tid, 0, "free", float(good), 1.0, t0 + i))
        elif rng.random() < shadow_rate:
            labels.append(LabelRow(tid, 0, "shadow", float(good), 1.0 / shadow_rate, t0 + i, 1e-4))
    return traces, labels


class PromptScore:
    """A ``python`` scorer for the tests: the score is the number after ``score=`` in the last message
    (``{type: python, class: "tests.learning.learning_helpers:PromptScore"}``), so a test chooses each
    request's stage score through the real request path."""

    _RX = re.compile(r"score=([0-9]*\.?[0-9]+)")

    async def score(self, request: dict[str, Any], answer: dict[str, Any]) -> tuple[float, str]:
        messages = request.get("messages") or [{}]
        m = self._RX.search(str(messages[-1].get("content") or ""))
        return (float(m.group(1)), "from the prompt") if m else (0.0, "no score in the prompt")


def _attempt(
    stage: int, up: str, outcome: str, score: float | None, t: float | None, cost: float
) -> AttemptRow:
    scores = "{}" if score is None else f'{{"heuristic": {score}}}'
    return AttemptRow(
        stage, up, outcome, outcome, score, t, scores, "{}", 10, 5, cost, 5.0, "stop", "abc", 12, None
    )


def sampled(
    rng: random.Random, start: int, n: int, good: float, shadowed: set[int] | None = None, rate: float = 0.1
) -> tuple[list[Entry], list[tuple[int, int]]]:
    """Requests at a threshold of 0.5 on a 10 % shadow rate: accepted ones (score >= 0.5) get a shadow
    label when drawn (``shadowed`` picks which, else every 1/rate-th), right with chance ``good``;
    escalated ones get their free label (the early answer right a third of the time)."""
    entries, population = [], []
    for i in range(start, start + n):
        s = rng.random()
        early = s >= 0.5
        population.append((i, 0 if early else 1))
        drawn = (i in shadowed) if shadowed is not None else i % round(1 / rate) == 0
        if early and not drawn:
            continue
        atts: dict[int, Any] = {0: ("accepted" if early else "rejected", s, 1e-6)}
        if not early:
            atts[1] = ("accepted", None, 1e-4)
        value = float(rng.random() < (good if early else 0.33))
        label = ("shadow" if early else "free", 0, value, 1 / rate if early else 1.0, 1e-4 if early else 0.0)
        e = make_entry(i, 2, 0 if early else 1, 1e-4, atts, [label], 2)
        assert e is not None
        entries.append(e)
    return entries, population
