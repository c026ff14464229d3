"""Hedged escalation: a stage's call running as a task, so the next stage can start beside it.

A stage with ``hedge_after_s`` that has not answered after that long gets the next stage started in
parallel (the hedge). Whichever way the race goes, exactly one of them is used at a time and the other
ends here, in ``discard``: cancelled (or, if it had already finished, dropped) and charged what it
generated: the answer so far of a call streamed upstream (hedged calls always are, for this reason),
its whole usage if it had finished, else the estimated prompt. Its attempt says ``outcome:
"cancelled"``. A cancelled task finishes its own clean-up (closing the connection, which stops the
upstream generating, and giving back its concurrency slot) after the request has moved on; ``_LIVE``
holds it until then.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any

from app.cascade.accounting import charge_cancelled, record_failure
from app.cascade.assemble import Assembler
from app.cascade.calls import EarlyAbort, Opened
from app.cascade.plan import Plan, Stage
from app.cascade.trace import Attempt, Trace
from app.errors import UpstreamError

Json = dict[str, Any]
Result = Json | Opened
_LIVE: set[asyncio.Task[Any]] = set()


@dataclass(slots=True, eq=False)
class Call:
    """One stage's upstream call running as a task (only hedged stages and their hedges do)."""

    stage: Stage
    att: Attempt
    t0: float
    task: asyncio.Task[Result]
    asm: Assembler | None = None  # the answer so far, when the call streams upstream
    taken: bool = False  # its result was used, or it was discarded

    def answered(self) -> bool:
        """Finished with an answer (not an error, not cancelled)."""
        t = self.task
        return t.done() and not t.cancelled() and t.exception() is None


@dataclass(slots=True)
class Race:
    """What starting a hedge needs from the engine's stage loop."""

    plan: Plan
    body: Json
    trace: Trace
    thresholds: list[float | None]
    last: int
    stream: bool
    deadline: float
    calls: list[Call]


def start(stage: Stage, att: Attempt, work: Any, asm: Assembler | None) -> Call:
    task: asyncio.Task[Result] = asyncio.ensure_future(work)
    _LIVE.add(task)
    task.add_done_callback(_finished)
    return Call(stage, att, time.perf_counter(), task, asm)


def _finished(task: asyncio.Task[Any]) -> None:
    _LIVE.discard(task)
    if not task.cancelled():
        task.exception()  # retrieved: a failure is reported through the attempt, not the loop's log


async def wait(call: Call, seconds: float) -> bool:
    """Wait up to ``seconds`` for the call to end; True when it did."""
    if not call.task.done():
        await asyncio.wait((call.task,), timeout=seconds)
    return call.task.done()


async def race(a: Call, b: Call) -> None:
    await asyncio.wait((a.task, b.task), return_when=asyncio.FIRST_COMPLETED)


async def outcome(call: Call) -> Result | UpstreamError | EarlyAbort:
    """The call's result, or the upstream failure / early abort that ended it."""
    call.taken = True
    try:
        return await call.task
    except (UpstreamError, EarlyAbort) as exc:
        return exc


async def _settled(res: Result) -> Json:
    """What a finished call that is no longer needed sent: its whole answer, or what an opened stream had
    delivered, the stream then closed. Closing must not fail the request the cascade answers."""
    if not isinstance(res, Opened):
        return res
    partial = res.partial()
    with contextlib.suppress(Exception):
        await res.stack.aclose()
    return partial


async def discard(call: Call, body: Json, reason: str, detail: str) -> None:
    """End a call the cascade no longer needs and record its attempt as cancelled, charged what it
    generated. A call that had already failed keeps its error."""
    if call.taken:
        return
    call.taken = True
    att, task = call.att, call.task
    partial: Json | None = None
    elapsed = time.perf_counter() - call.t0
    if task.done() and not task.cancelled():
        exc = task.exception()
        if isinstance(exc, UpstreamError):
            record_failure(att, exc, call.t0, body, final=False)
            att.escalation_reason = None
            return
        if isinstance(exc, EarlyAbort):
            partial = exc.partial
        elif exc is not None:
            raise exc
        else:
            partial = await _settled(task.result())
    else:
        task.cancel()
        if call.asm is not None:
            partial = call.asm.completion()
            partial.pop("usage", None)
        call.stage.upstream.latency.observe(elapsed)  # at least this long: keeps p95 honest
    charge_cancelled(att, call.stage, body, partial)
    att.outcome, att.reason, att.detail = "cancelled", reason, detail
    att.latency_ms = elapsed * 1000


async def abandon(calls: list[Call], body: Json) -> None:
    """The request ended (answered, failed, deadline, client gone): stop what still runs. A call cut
    off in flight is the engine's to charge (``charge_in_flight``); one that had answered is charged
    its answer here."""
    for c in calls:
        if c.taken:
            continue
        c.taken = True
        t = c.task
        if not t.done():
            t.cancel()
        elif not t.cancelled() and t.exception() is None:
            partial = await _settled(t.result())
            charge_cancelled(c.att, c.stage, body, partial)
            c.att.outcome, c.att.reason = "cancelled", "request_ended"
            c.att.latency_ms = (time.perf_counter() - c.t0) * 1000
