"""The evidence a cascade run leaves: every attempt, with scores, costs and latency, and the money sums.

``Trace.extension()`` is the ``cascade`` object of CONTRACT section 1. ``Trace.record(metrics)`` is the
only place request-level metrics are written, so the response body and the counters always agree.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from app.config import Price
from app.metrics import Metrics
from app.scoring.base import Spend
from app.upstream.client import price_usd
from app.upstream.latency import LatencyStats

Json = dict[str, Any]


@dataclass(slots=True)
class Attempt:
    stage: int
    upstream: str
    outcome: str = "error"  # accepted | rejected | error | cancelled (a hedge race or the client ended it)
    reason: str = ""
    score: float | None = None
    scores: dict[str, float] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    threshold: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    usage_estimated: bool = False
    answer_cost_usd: float = 0.0
    scoring: list[Spend] = field(default_factory=list)
    latency_ms: float = 0.0
    error_kind: str | None = None  # metric kind for upstream failures
    escalation_reason: str | None = None  # low_score | upstream_error | timeout | early_abort
    detail: str = ""  # why, in a few words; never a prompt, an answer or a key
    status: int | None = None  # upstream HTTP status of a failed attempt
    sent: bool = False  # the request was handed to the upstream client (it may be generating)
    retry_after: float | None = None
    # Started as a hedge (before the stage in front of it answered): "won" when the cascade went on to
    # it, "lost" when the earlier stage's answer was accepted and it was cancelled.
    hedge: str | None = None
    # The stage's reply (completion dict, or the StreamRelay of a streamed last stage), for the trace
    # store; only read after the request finished.
    answer: Any = None

    @property
    def cost_usd(self) -> float:
        return self.answer_cost_usd + sum(s.cost_usd for s in self.scoring)

    def as_json(self) -> Json:
        out: Json = {
            "stage": self.stage,
            "upstream": self.upstream,
            "outcome": self.outcome,
            "score": None if self.score is None else round(self.score, 6),
            "scores": self.scores,
            "reason": self.reason,
            "detail": self.detail,
            "reasons": self.reasons,
            "threshold": self.threshold,
            "cost_usd": self.cost_usd,  # unrounded: micro-dollar calls must sum exactly
            "latency_ms": round(self.latency_ms, 1),
        }
        if self.usage_estimated:
            out["usage_estimated"] = True
        if self.hedge is not None:
            out["hedge"] = self.hedge
        return out


# The message a request's task is cancelled with when its client disconnects (``app.api.http_io``): a
# cancellation without it is the server's (the end of a shutdown's grace period), which is an error.
CLIENT_GONE = "cascade: the client disconnected"


def client_left(exc: BaseException) -> bool:
    return isinstance(exc, asyncio.CancelledError) and CLIENT_GONE in exc.args


@dataclass(slots=True)
class Trace:
    cascade: str
    request_id: str
    completion_id: str
    stream: bool
    final_price: Price
    attempts: list[Attempt] = field(default_factory=list)
    accepted: Attempt | None = None
    started: float = 0.0
    # The attempt whose answer goes to the client: set before a stream starts, so headers can name it.
    serving: Attempt | None = None
    request: Json | None = None  # the client's request body (for the trace store and shadow labels)
    fallback: str | None = None  # "best_rejected" when the last stage failed and an earlier answer served
    routed: bool = False  # the cascade's router sent the request straight to its last stage
    hedged: bool = False  # a stage was hedged: the next one started before it answered
    key: str | None = None  # the name of the configured key (auth.keys) the request came with
    # The cascade's last stage: its index, and its upstream's recent latency (the latency baseline).
    final_stage: int = 0
    final_latency: LatencyStats | None = None
    relay_latency: LatencyStats | None = None  # the streamed last stage's upstream (observed at the end)
    baseline_latency_s: float | None = None  # set by extension(): what the last stage alone would take
    # The client went away before its answer was sent: not an error of the proxy or an upstream, so the
    # request counts as outcome="cancelled" and its calls in flight as attempts "cancelled" ("stop
    # generating" must not fire the error-ratio alerts). The server's own cancellation is an error.
    cancelled: bool = False

    def client_gone(self) -> None:
        """The client left while its stream was being written (``SSEResponse``)."""
        self.cancelled = True

    def outcome(self, ok: bool) -> str:
        """The request's outcome label: success, error, or cancelled (the client left first)."""
        return "success" if ok else "cancelled" if self.cancelled else "error"

    @property
    def escalations(self) -> int:
        # The last attempt never escalates: nothing came after it.
        return sum(1 for a in self.attempts[:-1] if a.escalation_reason)

    @property
    def cost_usd(self) -> float:
        return sum(a.cost_usd for a in self.attempts)

    @property
    def baseline_usd(self) -> float:
        a = self.accepted
        if a is None:
            return 0.0
        return price_usd(self.final_price, a.prompt_tokens, a.completion_tokens)

    def baseline_latency(self) -> float | None:
        """Seconds the last stage alone would have taken for this answer: its own call when it is the
        one that answered, else its recent latency for answers of this length (None: no data yet)."""
        a = self.accepted
        if a is None:
            return None
        if a.stage == self.final_stage and a.latency_ms:
            return a.latency_ms / 1000
        if self.final_latency is None:
            return None
        return self.final_latency.estimate(a.completion_tokens)

    def extension(self) -> Json:
        a = self.accepted
        cost = self.cost_usd
        baseline = self.baseline_usd
        self.baseline_latency_s = base_s = self.baseline_latency()
        ext = {
            "cascade": self.cascade,
            "stage": a.stage if a else None,
            "upstream": a.upstream if a else None,
            "escalations": self.escalations,
            "score": None if a is None or a.score is None else round(a.score, 6),
            "cost_usd": cost,
            "baseline_cost_usd": baseline,
            "savings_usd": baseline - cost,
            "attempts": [x.as_json() for x in self.attempts],
            "latency_ms": round((time.perf_counter() - self.started) * 1000, 1) if self.started else None,
            "baseline_latency_ms": None if base_s is None else round(base_s * 1000, 1),
        }
        if self.hedged:
            ext["hedged"] = True
        if self.fallback:
            ext["fallback"] = self.fallback
        if self.routed:
            ext["routed"] = True
        return ext

    def record(self, metrics: Metrics, *, ok: bool, seconds: float) -> None:
        """Write every request-level metric for this trace (once, when the request ends)."""
        c = self.cascade
        for i, a in enumerate(self.attempts):
            metrics.attempt(c, a.stage, a.upstream, a.outcome)
            metrics.spend(c, a.upstream, "answer", a.answer_cost_usd, a.prompt_tokens, a.completion_tokens)
            for s in a.scoring:
                metrics.spend(c, s.upstream, "scoring", s.cost_usd, s.prompt_tokens, s.completion_tokens)
            for name, value in a.scores.items():
                metrics.scored(c, a.stage, name.split("#", 1)[0], value)
            if a.escalation_reason and i + 1 < len(self.attempts):
                metrics.escalation(c, a.upstream, self.attempts[i + 1].upstream, a.escalation_reason)
            if a.hedge is not None:
                metrics.hedge(c, a.stage, a.hedge)
        if self.fallback and self.accepted is not None:
            metrics.fallback(c, self.accepted.upstream)
        if self.routed and self.attempts:
            metrics.routed(c, self.attempts[0].upstream)
        metrics.finished(c, self.outcome(ok), self.stream, seconds, self.baseline_usd if ok else 0.0)
        if ok and self.baseline_latency_s is not None:
            metrics.latency_saved(c, self.baseline_latency_s - seconds)
        if self.key is not None:
            metrics.key_cost(self.key, self.cost_usd)
