"""Prometheus metrics (CONTRACT section 4), bound to an injected ``CollectorRegistry``.

Labels are low-cardinality by construction: cascade, stage, upstream and scorer names come from the
config; outcome, reason, purpose and kind from fixed sets. Label children are cached so the hot path
pays one dict lookup per update instead of prometheus-client's label validation.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
SCORE_BUCKETS = tuple(round(0.1 * i, 1) for i in range(1, 11))


class Metrics:
    def __init__(self, registry: CollectorRegistry, *, multiprocess: bool = False) -> None:
        self.registry = registry
        r = registry
        self.requests = Counter(
            "cascade_requests",
            "Requests by final outcome (invalid: refused before the cascade ran).",
            ["cascade", "outcome"],
            registry=r,
        )
        self.attempts = Counter(
            "cascade_attempts",
            "Stage attempts by outcome.",
            ["cascade", "stage", "upstream", "outcome"],
            registry=r,
        )
        self.escalations = Counter(
            "cascade_escalations",
            "Escalations from one stage to the next, by reason.",
            ["cascade", "from_upstream", "to_upstream", "reason"],
            registry=r,
        )
        self.cost = Counter(
            "cascade_cost_usd", "USD spent, by purpose.", ["cascade", "upstream", "purpose"], registry=r
        )
        self.baseline_cost = Counter(
            "cascade_baseline_cost_usd",
            "USD the last stage alone would have cost for the same requests.",
            ["cascade"],
            registry=r,
        )
        self.tokens = Counter(
            "cascade_tokens", "Tokens by upstream and kind.", ["upstream", "kind"], registry=r
        )
        self.score = Histogram(
            "cascade_score",
            "Scores by scorer.",
            ["cascade", "stage", "scorer"],
            buckets=SCORE_BUCKETS,
            registry=r,
        )
        self.request_duration = Histogram(
            "cascade_request_duration_seconds",
            "Whole request duration, through the last byte.",
            ["cascade", "stream"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "cascade_time_to_first_token_seconds",
            "Time from request to the first streamed content byte.",
            ["cascade"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_duration = Histogram(
            "cascade_upstream_duration_seconds",
            "Duration of each upstream call.",
            ["upstream"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_errors = Counter(
            "cascade_upstream_errors", "Failed upstream calls by kind.", ["upstream", "kind"], registry=r
        )
        self.threshold = Gauge(
            "cascade_threshold",
            "Current acceptance threshold per stage.",
            ["cascade", "stage"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.in_flight = Gauge(
            "cascade_in_flight_requests",
            "Requests being served now.",
            registry=r,
            multiprocess_mode="livesum",
        )
        # Reliability (beyond CONTRACT section 4; same label rules).
        self.fallbacks = Counter(
            "cascade_fallbacks",
            "Requests served an earlier stage's rejected answer because the last stage failed "
            "(fallback: best_rejected), by the upstream whose answer was served.",
            ["cascade", "upstream"],
            registry=r,
        )
        self.routed_requests = Counter(
            "cascade_routed",
            "Requests the cascade's router (route-then-cascade) sent straight to its last stage, by that "
            "stage's upstream: the earlier stages were skipped, neither called nor paid.",
            ["cascade", "upstream"],
            registry=r,
        )
        self.circuit_open = Gauge(
            "cascade_circuit_open",
            "1 while an upstream's circuit is open or half-open, 0 when closed.",
            ["upstream"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.circuit_opens = Counter(
            "cascade_circuit_opens", "Times an upstream's circuit opened.", ["upstream"], registry=r
        )
        self.upstream_rejected = Counter(
            "cascade_upstream_rejected",
            "Upstream calls refused without being made, by reason (circuit_open, saturated).",
            ["upstream", "reason"],
            registry=r,
        )
        # Latency and keys (issue 17).
        self.hedges = Counter(
            "cascade_hedges",
            "Stages started as a hedge (before the stage in front answered), by that stage and result: "
            "won (the cascade went on to it), lost (the earlier answer was accepted; it was cancelled).",
            ["cascade", "stage", "result"],
            registry=r,
        )
        # A running sum that goes down when a request took longer than its baseline: a gauge (counters
        # cannot decrease). delta() over a window is the latency saved in it.
        self.latency_saved_seconds = Gauge(
            "cascade_latency_saved_seconds",
            "Seconds saved against the last stage alone (its recent latency for answers of the same "
            "length), summed over successful requests; negative when the cascade was slower.",
            ["cascade"],
            registry=r,
            multiprocess_mode="sum",
        )
        self.key_cost_usd = Counter(
            "cascade_key_cost_usd",
            "USD spent by requests of each configured key (auth.keys), by the key's name.",
            ["key"],
            registry=r,
        )
        self.budget_rejected = Counter(
            "cascade_budget_exceeded",
            "Requests of a key over its daily budget, by what happened: rejected (429) or capped "
            "(served from over_budget_max_stage at most).",
            ["key", "action"],
            registry=r,
        )
        # Learning (beyond CONTRACT section 4; same label rules).
        self.trace_dropped = Counter(
            "cascade_trace_dropped",
            "Decision records not stored, by reason (queue_full, store_error).",
            ["reason"],
            registry=r,
        )
        self.labels = Counter(
            "cascade_labels",
            "Quality labels stored, by source (free, shadow, user).",
            ["cascade", "source"],
            registry=r,
        )
        self.shadow_skipped = Counter(
            "cascade_shadow_skipped",
            "Shadow re-asks picked but not made, by reason (budget, busy, upstream_error).",
            ["cascade", "reason"],
            registry=r,
        )
        self.labels_skipped_total = Counter(
            "cascade_labels_skipped",
            "Requests that got no label although eligible, by reason (free_form: free-form answers and "
            "no judge; busy, budget, circuit_open: a label call not made; upstream_error, no_answer, "
            "no_label: a label call that gave none).",
            ["cascade", "reason"],
            registry=r,
        )

        # The fit in force, per cascade (set when a replica puts a fit in force: the fleet's fit).
        def fit_gauge(name: str, doc: str, labels: list[str]) -> Gauge:
            return Gauge(name, doc, labels, registry=r, multiprocess_mode="mostrecent")

        good = "share of answers as good as the last stage's"
        self.tuner_quality = fit_gauge(
            "cascade_tuner_estimated_quality", f"The fit in force: its estimated {good}.", ["cascade"]
        )
        self.tuner_target = fit_gauge(
            "cascade_tuner_target_quality", f"The {good} that the fit in force aimed at.", ["cascade"]
        )
        self.tuner_labels = fit_gauge(
            "cascade_tuner_effective_labels",
            "The fit in force: effective labelled requests, (sum w)^2 / sum w^2, behind the answers each "
            "scored stage accepts at its thresholds.",
            ["cascade", "stage"],
        )
        self.tuner_fit_time = fit_gauge(
            "cascade_tuner_fit_timestamp_seconds", "When the fit in force was made (Unix time).", ["cascade"]
        )
        self._tuner = (self.tuner_quality, self.tuner_target, self.tuner_labels, self.tuner_fit_time)
        self._children: dict[tuple[Any, ...], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        c = self._children.get(key)
        if c is None:
            c = self._children[key] = metric.labels(*labels)
        return c

    # --- recording helpers used by the engine and the upstream client -------------------------------

    def upstream_error(self, upstream: str, kind: str) -> None:
        self._child(self.upstream_errors, upstream, kind).inc()

    def circuit_state(self, upstream: str, state: str, *, changed: bool = True) -> None:
        """The breaker hook: ``changed`` False only sets the gauge (a client built or re-wired)."""
        self._child(self.circuit_open, upstream).set(0 if state == "closed" else 1)
        if changed and state == "open":
            self._child(self.circuit_opens, upstream).inc()

    def upstream_refused(self, upstream: str, reason: str) -> None:
        self._child(self.upstream_rejected, upstream, reason).inc()

    def upstream_call(self, upstream: str, seconds: float) -> None:
        self._child(self.upstream_duration, upstream).observe(seconds)

    def attempt(self, cascade: str, stage: int, upstream: str, outcome: str) -> None:
        self._child(self.attempts, cascade, str(stage), upstream, outcome).inc()

    def escalation(self, cascade: str, src: str, dst: str, reason: str) -> None:
        self._child(self.escalations, cascade, src, dst, reason).inc()

    def fallback(self, cascade: str, upstream: str) -> None:
        self._child(self.fallbacks, cascade, upstream).inc()

    def routed(self, cascade: str, upstream: str) -> None:
        self._child(self.routed_requests, cascade, upstream).inc()

    def spend(
        self, cascade: str, upstream: str, purpose: str, usd: float, prompt: int, completion: int
    ) -> None:
        if usd:
            self._child(self.cost, cascade, upstream, purpose).inc(usd)
        if prompt:
            self._child(self.tokens, upstream, "prompt").inc(prompt)
        if completion:
            self._child(self.tokens, upstream, "completion").inc(completion)

    def scored(self, cascade: str, stage: int, scorer: str, value: float) -> None:
        self._child(self.score, cascade, str(stage), scorer).observe(value)

    def finished(self, cascade: str, outcome: str, stream: bool, seconds: float, baseline_usd: float) -> None:
        """A request the cascade ran: ``outcome`` success, error or cancelled (the client left first)."""
        self._child(self.requests, cascade, outcome).inc()
        self._child(self.request_duration, cascade, "true" if stream else "false").observe(seconds)
        if baseline_usd:
            self._child(self.baseline_cost, cascade).inc(baseline_usd)

    def refused(self, cascade: str) -> None:
        """A request refused before the cascade ran (400, 401, 404, 413): ``outcome="invalid"``."""
        self._child(self.requests, cascade, "invalid").inc()

    def hedge(self, cascade: str, stage: int, result: str) -> None:
        self._child(self.hedges, cascade, str(stage), result).inc()

    def latency_saved(self, cascade: str, seconds: float) -> None:
        self._child(self.latency_saved_seconds, cascade).inc(seconds)

    def key_cost(self, key: str, usd: float) -> None:
        c = self._child(self.key_cost_usd, key)
        if usd > 0:
            c.inc(usd)

    def over_budget(self, key: str, action: str) -> None:
        self._child(self.budget_rejected, key, action).inc()

    def first_token(self, cascade: str, seconds: float) -> None:
        self._child(self.ttft, cascade).observe(seconds)

    def set_threshold(self, cascade: str, stage: int, value: float) -> None:
        self._child(self.threshold, cascade, str(stage)).set(value)

    def keep_thresholds(self, present: set[tuple[str, str]]) -> None:
        """Drop the ``cascade_threshold`` series of (cascade, stage) pairs a reload removed."""
        self._drop([k for k in self._children if k[0] == id(self.threshold) and tuple(k[1:]) not in present])

    def set_fit(
        self,
        cascade: str,
        quality: float | None,
        target: float | None,
        effective: Mapping[str, float],
        created: float,
    ) -> None:
        """The fit in force for ``cascade`` (the ``cascade_tuner_*`` gauges); ``None``: not known."""
        for gauge, value in ((self.tuner_quality, quality), (self.tuner_target, target)):
            if value is not None:
                self._child(gauge, cascade).set(value)
        for stage, n in effective.items():
            self._child(self.tuner_labels, cascade, stage).set(n)
        self._child(self.tuner_fit_time, cascade).set(created)

    def clear_fits(self) -> None:
        """Drop every ``cascade_tuner_*`` series (a reload: the fits that still apply set them again)."""
        tuner = {id(g) for g in self._tuner}
        self._drop([k for k in self._children if k[0] in tuner])

    def _drop(self, keys: list[tuple[Any, ...]]) -> None:
        """Remove these labelled series. With ``--workers N`` prometheus_client's files cannot drop a
        series: it reads NaN from then on."""
        files = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))  # as prometheus_client decides it
        metrics = {id(m): m for m in (self.threshold, *self._tuner)}
        for key in keys:
            child = self._children.pop(key)
            if files:  # (remove() there would only warn that it cannot)
                child.set(math.nan)
            else:
                metrics[key[0]].remove(*key[1:])

    def traces_dropped(self, reason: str, n: int = 1) -> None:
        self._child(self.trace_dropped, reason).inc(n)

    def labelled(self, cascade: str, source: str, n: int = 1) -> None:
        self._child(self.labels, cascade, source).inc(n)

    def labels_skipped(self, cascade: str, reason: str, n: int = 1) -> None:
        self._child(self.labels_skipped_total, cascade, reason).inc(n)

    def shadow_skip(self, cascade: str, reason: str) -> None:
        self._child(self.shadow_skipped, cascade, reason).inc()
