"""Error aggregation: when no stage answered, one client error that names every attempt and picks the
status the attempts call for (429 all busy, 503 all circuits open, 400 all refused the request, else
502), with ``retry-after`` where waiting helps."""

from __future__ import annotations

import math
from collections.abc import Callable

from app.cascade.trace import Attempt, Trace
from app.errors import AllStagesFailed, InvalidRequest, ProxyError, RateLimited, ServiceUnavailable

_CLIENT_4XX = frozenset({400, 404, 413, 422})


def summary(trace: Trace) -> str:
    parts = []
    for a in trace.attempts:
        what = a.reason or a.outcome
        if a.outcome == "rejected" and a.score is not None:
            what += f" (score {a.score:.2f}{': ' + a.detail if a.detail else ''})"
        elif a.detail:
            what += f" ({a.detail})"
        parts.append(f"stage {a.stage} ({a.upstream}): {what}")
    return "Attempts: " + "; ".join(parts) + "." if parts else "No stage was attempted."


def _retry_after(errors: list[Attempt], pick: Callable[[list[float]], float]) -> dict[str, str]:
    """``retry-after`` in whole seconds (at least 1) and, when an upstream or a breaker said how long,
    ``retry-after-ms`` with that exact wait (the OpenAI SDKs prefer it) when it is more than 0; 1 s when
    nobody said."""
    waits = [a.retry_after for a in errors if a.retry_after is not None]
    if not waits:
        return {"retry-after": "1"}
    wait = max(0.0, pick(waits))
    out = {"retry-after": str(max(1, math.ceil(wait)))}
    if wait > 0:  # (an upstream's "0" beside our "at least 1 s" read as "retry now" to clients taking ms)
        out["retry-after-ms"] = str(math.ceil(wait * 1000))
    return out


def all_failed(trace: Trace) -> ProxyError:
    atts = trace.attempts
    errors = [a for a in atts if a.outcome == "error"]
    if errors and len(errors) == len(atts):
        busy = [a.status == 429 or a.error_kind == "saturated" for a in errors]
        if all(busy):
            # Rate-limited upstream or our own concurrency limit full at every stage: come back later.
            return RateLimited(
                f"Every stage is rate-limited or at its concurrency limit. {summary(trace)}",
                headers=_retry_after(errors, max),
            )
        if all(b or a.error_kind == "circuit_open" for a, b in zip(errors, busy, strict=True)):
            # Nothing was (successfully) asked: every stage's circuit is open (or the rest are busy).
            # Retry when the first circuit lets a probe through.
            return ServiceUnavailable(
                f"Every stage is unavailable (circuit open after upstream failures). {summary(trace)}",
                code="circuit_open",
                headers=_retry_after([a for a in errors if a.error_kind == "circuit_open"], min),
            )
        if all(a.status in _CLIENT_4XX for a in errors):
            return InvalidRequest(f"Every stage rejected the request as invalid. {summary(trace)}")
    return AllStagesFailed(f"Every stage failed. {summary(trace)}")
