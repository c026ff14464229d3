"""What one upstream's calls recently took, per process: the delay a ``hedge_after_s: p95`` stage waits
before it hedges, and the estimate of what a stage would take for an answer of a given length (the
``baseline_latency_ms`` of a request: its last stage alone).

Two small structures, O(1) per call: a ring of the last ``WINDOW`` call durations, from which the 95th
percentile is recomputed when asked, at most every ``REFRESH`` observations (a call cut off early, e.g.
a cancelled hedge, adds its elapsed time there too: a lower bound, better than leaving the slow calls
out); and per power-of-two bucket of completion tokens, a moving average of whole answers' durations.
"""

from __future__ import annotations

import math

WINDOW = 256  # durations kept for the percentile
REFRESH = 16  # observations between two percentile recomputations
MIN_SAMPLES = 20  # fewer: no percentile (a p95 stage does not hedge yet)
ALPHA = 0.1  # weight of a new observation in a bucket's moving average
BUCKETS = 24  # completion-token buckets: 0, 1, 2-3, 4-7, ... up to 2**22


class LatencyStats:
    __slots__ = ("_answers", "_avg", "_count", "_n", "_p95", "_ring", "_since")

    def __init__(self) -> None:
        self._ring: list[float] = []
        self._n = 0  # observations ever (the ring's write position is _n % WINDOW)
        self._since = 0
        self._p95: float | None = None
        self._avg = [0.0] * BUCKETS
        self._count = [0] * BUCKETS
        self._answers = 0  # whole answers observed (by length)

    def observe(self, seconds: float, completion_tokens: int | None = None) -> None:
        """One call took ``seconds``; ``completion_tokens`` when it gave a whole answer that long."""
        if seconds < 0 or not math.isfinite(seconds):
            return
        if len(self._ring) < WINDOW:
            self._ring.append(seconds)
        else:
            self._ring[self._n % WINDOW] = seconds
        self._n += 1
        self._since += 1
        if completion_tokens is not None:
            b = min(BUCKETS - 1, max(0, completion_tokens).bit_length())
            c = self._count[b]
            self._avg[b] = seconds if c == 0 else self._avg[b] + ALPHA * (seconds - self._avg[b])
            self._count[b] = c + 1
            self._answers += 1

    def p95(self) -> float | None:
        """The 95th percentile of recent call durations (None until there are ``MIN_SAMPLES``).
        Recomputed here, lazily, at most every ``REFRESH`` observations: only ``p95`` stages ask."""
        if self._since >= REFRESH or (self._p95 is None and self._since):
            self._since = 0
            self._p95 = _quantile(self._ring, 0.95) if len(self._ring) >= MIN_SAMPLES else None
        return self._p95

    def estimate(self, completion_tokens: int) -> float | None:
        """Seconds a whole answer of about ``completion_tokens`` takes: the moving average of its
        bucket, else of the nearest bucket with observations; None when there are none."""
        if not self._answers:
            return None
        b = min(BUCKETS - 1, max(0, completion_tokens).bit_length())
        if self._count[b]:
            return self._avg[b]
        for d in range(1, BUCKETS):
            for i in (b - d, b + d):
                if 0 <= i < BUCKETS and self._count[i]:
                    return self._avg[i]
        return None


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]
