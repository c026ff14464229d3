"""Per-upstream circuit breaker: stop calling an upstream that keeps failing, probe it to recover.

States (``upstreams.NAME.circuit``):
- closed: calls go through. The circuit opens when, among the attempts that ended in the last
  ``window_s``, at least ``failures`` failed and they are at least ``failure_ratio`` of them. A ratio,
  not a run of failures in a row: at a concurrency of hundreds a burst of a few errors says little,
  while a ratio over a window of attempts separates a sick upstream from one with occasional faults.
- open: calls are refused for ``cooldown_s``; the cascade skips the stage (reason ``upstream_error``).
- half-open: after the cool-down exactly one call (the probe) goes through while the others are still
  refused. Its success closes the circuit, its failure opens it again for another cool-down; a probe
  that ends without a verdict (client gone, early abort) frees the slot for the next probe.

What counts as a failure: timeouts, connect errors, 5xx, protocol errors (bad JSON, broken streams,
an error in a 200). A 4xx (429 included) is the upstream answering, not failing. Each result belongs to
the state it started in: a slow call that started while closed cannot close a circuit that opened since.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from app.config import CircuitConfig
from app.errors import UpstreamError

# Called with (upstream name, new state: "closed" | "open" | "half_open") on every change.
StateHook = Callable[[str, str], None]

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
_BUCKETS = 10  # the window is kept as this many time slices of (ok, failed) counts
_COUNTED = frozenset({"timeout", "connect", "status_5xx", "protocol"})


def counts_as_failure(err: UpstreamError) -> bool:
    return err.kind in _COUNTED


class Ticket:
    """One admitted call. Report its result once with ``success()`` / ``failure()``; ``close()`` when
    the call ends (a probe that ends without a verdict frees the half-open slot)."""

    __slots__ = ("_breaker", "_done", "_generation", "probe")

    def __init__(self, breaker: Breaker, generation: int, probe: bool) -> None:
        self._breaker = breaker
        self._generation = generation
        self._done = False
        self.probe = probe

    def success(self) -> None:
        if not self._done:
            self._done = True
            self._breaker._result(self, ok=True)

    def failure(self, err: UpstreamError) -> None:
        if not self._done and counts_as_failure(err):
            self._done = True
            self._breaker._result(self, ok=False)

    def close(self) -> None:
        if self.probe and self._breaker._probing is self:
            self._breaker._probing = None
        self._done = True


class Breaker:
    def __init__(
        self,
        name: str,
        cfg: CircuitConfig,
        *,
        on_change: StateHook | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.cfg = cfg
        self.on_change = on_change
        self._clock = clock
        self.state = CLOSED
        self._generation = 0  # bumped on every state change: results of older calls are ignored
        self._slice_s = cfg.window_s / _BUCKETS
        self._slots = [-1] * _BUCKETS  # the time slice each bucket counts
        self._ok = [0] * _BUCKETS
        self._failed = [0] * _BUCKETS
        self._opened_at = 0.0
        self._probing: Ticket | None = None

    # --- asked before a call -------------------------------------------------------------------------

    def blocked(self) -> str | None:
        """Why a call must not be made now, or None. Moves an open circuit whose cool-down is over to
        half-open (without claiming the probe: ``enter`` does)."""
        if not self.cfg.enabled:
            return None
        if self.state == OPEN:
            left = self.retry_after()
            if left > 0:
                return f"circuit open after repeated upstream failures; next probe in {left:.1f}s"
            self._set(HALF_OPEN)
        if self.state == HALF_OPEN and self._probing is not None:
            return "circuit half-open: a probe call is in flight"
        return None

    def retry_after(self) -> float:
        """Seconds until the circuit lets a probe through (0 when closed or already half-open)."""
        if self.state != OPEN:
            return 0.0
        return max(0.0, self._opened_at + self.cfg.cooldown_s - self._clock())

    def enter(self) -> Ticket | None:
        """Admit one call (None: refused; ``blocked()`` says why). In half-open the first caller
        becomes the probe."""
        if self.blocked() is not None:
            return None
        probe = self.state == HALF_OPEN
        ticket = Ticket(self, self._generation, probe)
        if probe:
            self._probing = ticket
        return ticket

    # --- results ---------------------------------------------------------------------------------------

    def _result(self, ticket: Ticket, *, ok: bool) -> None:
        if not self.cfg.enabled or ticket._generation != self._generation:
            return
        if self.state == HALF_OPEN:
            if ticket is self._probing:
                self._probing = None
                self._set(CLOSED if ok else OPEN)
            return
        if self.state != CLOSED:
            return
        slot = int(self._clock() / self._slice_s)
        i = slot % _BUCKETS
        if self._slots[i] != slot:
            self._slots[i], self._ok[i], self._failed[i] = slot, 0, 0
        if ok:
            self._ok[i] += 1
            return
        self._failed[i] += 1
        live = [j for j in range(_BUCKETS) if self._slots[j] > slot - _BUCKETS]
        failed = sum(self._failed[j] for j in live)
        total = failed + sum(self._ok[j] for j in live)
        if failed >= self.cfg.failures and failed >= self.cfg.failure_ratio * total:
            self._set(OPEN)

    def _set(self, state: str) -> None:
        self.state = state
        self._generation += 1
        self._slots = [-1] * _BUCKETS
        if state == OPEN:
            self._opened_at = self._clock()
        if self.on_change is not None:
            self.on_change(self.name, state)
