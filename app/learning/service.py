"""The learning side of a running proxy: record every request, collect labels, keep thresholds tuned.

Over 400 lines on purpose: the one owner of the writer, shadow, pruner and tuner tasks and their lifecycle.

One ``Learning`` per process, owned by the app (it outlives config reloads; ``attach`` wires each new
runtime). The request path only calls ``on_finish``: the shadow draw and a ``put_nowait`` of the
finished trace (with the draw's outcome) on a bounded queue (full: the record is dropped and counted,
never waited for). A writer task takes batches off the queue and builds and stores the rows in the
store's worker thread; free labels that need the judge (free-form answers) are then asked for in the
background (``Shadow.judge_free``). Labels and late sampling outcomes go through the same queue, so a
label is always stored after its trace.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from app.cascade.trace import Trace
from app.config import LearningConfig
from app.learning.labels import compare_mode
from app.learning.records import (
    AttemptRow,
    Built,
    LabelRow,
    TraceRow,
    build_rows,
    passthrough_fingerprint,
    plan_fingerprint,
)
from app.learning.shadow import Shadow
from app.learning.store import PRUNE_BATCH, Fit, Store, StoreError
from app.learning.tuning import PlanMeta, Tuner
from app.metrics import Metrics

if TYPE_CHECKING:
    from app.runtime import Runtime

log = logging.getLogger("cascade.learning")

BATCH = 512  # records per store transaction
RETENTION_EVERY_S = 3600.0  # how often old traces are pruned (and once at start)
_BACKOFF = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


@dataclass(slots=True)
class _Pending:
    trace: Trace
    ok: bool
    seconds: float
    meta: PlanMeta
    created: float
    sampling: str


@dataclass(slots=True)
class _Labels:
    cascade: str
    rows: list[LabelRow]
    attempts: list[tuple[str, AttemptRow]] = field(default_factory=list)  # middle stages a shadow asked


@dataclass(slots=True)
class _Sampling:
    trace_id: str
    outcome: str


_Item = _Pending | _Labels | _Sampling


class Learning:
    def __init__(
        self,
        cfg: LearningConfig,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.time,
        workers: int = 1,
    ) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.clock = clock
        self.store = Store(cfg.store, statement_timeout_s=cfg.statement_timeout_s)
        self.shadow = Shadow(
            cfg, metrics, self.emit_labels, self.settle_sampling, clock=clock, workers=workers
        )
        self.labels_added = asyncio.Event()  # set when labels were stored (wakes the tuner)
        self._queue: asyncio.Queue[_Item] = asyncio.Queue(maxsize=cfg.queue_size)
        self._pending: dict[str, str] = {}  # completion id -> cascade, while its record is queued
        self._meta: dict[str, PlanMeta] = {}
        self._adopted: dict[tuple[str, str], Fit] = {}
        self._rt: Runtime | None = None
        self._writer: asyncio.Task[None] | None = None
        self._pruner: asyncio.Task[None] | None = None
        self._closed = False
        self._opened = False
        self._writing = False  # the store is open and the writer's last batch was written
        self.tuner: Tuner | None = (
            Tuner(cfg, self.store, self.plans, self.apply, self.labels_added, clock)
            if cfg.auto_tune
            else None
        )

    # --- wiring ----------------------------------------------------------------------------------------

    def attach(self, rt: Runtime) -> None:
        """Wire a (new) runtime: record its requests, keep streamed answers' text, apply adopted fits."""
        self._rt = rt
        rt.engine.keep_text = True
        rt.finish_hooks.append(self.on_finish)
        meta: dict[str, PlanMeta] = {}
        for plan in rt.plans:
            cc = rt.config.cascades.get(plan.name)
            fp = (
                passthrough_fingerprint(rt.config, plan.name)
                if cc is None
                else plan_fingerprint(rt.config, cc)
            )
            base = tuple(t for t in plan.thresholds[:-1] if t is not None)
            compare = compare_mode(rt.config, self.cfg, plan.name)
            meta[plan.name] = PlanMeta(plan.name, plan, fp, len(plan.stages), base, compare=compare)
        self._meta = meta
        self.metrics.clear_fits()  # a cascade the reload removed or changed has no fit in force
        for fit in list(self._adopted.values()):
            self.apply(fit, log_change=False)

    def plans(self) -> list[PlanMeta]:
        """Cascades that have thresholds to tune (two stages or more)."""
        return [m for m in self._meta.values() if m.n_stages > 1]

    def apply(self, fit: Fit, *, log_change: bool = True) -> bool:
        """Put a fit's thresholds into the running plan (requests starting from now use them)."""
        m = self._meta.get(fit.cascade)
        if m is None or m.fingerprint != fit.plan or len(fit.thresholds) != m.n_stages - 1:
            return False
        before = [t for t in m.plan.thresholds[:-1]]
        for k, t in enumerate(fit.thresholds):
            m.plan.thresholds[k] = t
            self.metrics.set_threshold(m.name, k, t)
        m.fit_version = fit.version
        self._adopted[(fit.cascade, fit.plan)] = fit
        target = fit.evidence.get("target_quality")
        labels = fit.evidence.get("effective_labels") or {}
        self.metrics.set_fit(
            m.name,
            fit.quality,
            float(target) if isinstance(target, int | float) else None,
            {str(k): float(v) for k, v in labels.items()},
            fit.created,
        )
        if log_change:
            log.info(
                "thresholds changed" if list(fit.thresholds) != before else "thresholds kept",
                extra={
                    "cascade": fit.cascade,
                    "fit_version": fit.version,
                    "before": before,
                    "after": list(fit.thresholds),
                    **fit.evidence,
                },
            )
        return True

    def current(self, m: PlanMeta) -> tuple[float, ...]:
        fit = self._adopted.get((m.name, m.fingerprint))
        return fit.thresholds if fit is not None else m.config_thresholds

    # --- the request path -----------------------------------------------------------------------------

    def on_finish(self, trace: Trace, ok: bool, seconds: float) -> None:
        if self._closed:
            return
        meta = self._meta.get(trace.cascade)
        if meta is None:
            return
        self.shadow.answered(trace.cost_usd)
        if self._queue.full():
            self.metrics.traces_dropped("queue_full")
            return
        sampling = ""
        if meta.n_stages > 1 and self._rt is not None:
            sampling = self.shadow.maybe(trace, ok, meta.plan, self._rt.upstreams, meta.compare)
        self._queue.put_nowait(_Pending(trace, ok, seconds, meta, self.clock(), sampling))
        self._pending[trace.completion_id] = trace.cascade

    def emit_labels(
        self, cascade: str, labels: list[LabelRow], attempts: list[tuple[str, AttemptRow]] | None = None
    ) -> None:
        """Labels (and the attempt rows of middle stages a shadow call asked: written in the same
        transaction, so the tuner reads them with the request's first labels)."""
        self._put(_Labels(cascade, labels, list(attempts or ())))

    def settle_sampling(self, cascade: str, trace_id: str, outcome: str) -> None:
        """What finally happened about a request's labels (a label call's outcome), for its trace."""
        self._put(_Sampling(trace_id, outcome))

    def _put(self, item: _Item) -> None:
        if self._closed:
            return
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            self.metrics.traces_dropped("queue_full")

    # --- feedback --------------------------------------------------------------------------------------

    async def feedback(self, completion_id: str, score: float) -> bool:
        """Store a user's label for the answer ``completion_id``; False when no such answer is known."""
        cascade = self._pending.get(completion_id)
        if cascade is None:
            info = await self.store.trace_info(completion_id)
            if info is None or info[1] is None:
                return False
            cascade = info[0]
        # The raw score is stored; fits read it as a label at learning.user_pass_score.
        label = LabelRow(completion_id, None, "user", score, 1.0, self.clock(), 0.0, "feedback")
        if completion_id in self._pending:  # behind its queued trace: a label never lands before it
            if not self._writing:  # the store is down: the writer would drop it; say so (503), not 200
                raise StoreError("the trace store is unavailable")
            self.emit_labels(cascade, [label])
            return True
        await self.store.write([], [label])
        self.metrics.labelled(cascade, "user")
        self.labels_added.set()
        return True

    # --- lifecycle -------------------------------------------------------------------------------------

    async def start(self) -> None:
        await self._open()
        if self.tuner is not None and self._opened:
            try:
                await self.tuner.sync(refit=False)  # a restart keeps the thresholds fitted before it
            except StoreError as exc:
                log.warning("could not load fitted thresholds", extra={"error": str(exc)})
        loop = asyncio.get_running_loop()
        self._writer = loop.create_task(self._write_loop(), name="cascade-trace-writer")
        if self.cfg.retention_days > 0:
            self._pruner = loop.create_task(self._retention_loop(), name="cascade-trace-retention")
        if self.tuner is not None:
            if self.cfg.shadow_rate <= 0:
                log.warning(
                    "auto_tune with shadow_rate 0: answers accepted before the last stage get labels only "
                    "from POST /v1/feedback, so thresholds that accept most answers may never be re-fitted "
                    "(set learning.shadow_rate, e.g. 0.05)"
                )
            self.tuner.start()

    async def stop(self, grace_s: float = 10.0) -> None:
        """Stop taking records, write what is queued (within ``grace_s``), close the store."""
        self._closed = True
        await self.shadow.close()
        if self.tuner is not None:
            await self.tuner.stop()
        try:
            async with asyncio.timeout(grace_s):
                await self.flush()
        except TimeoutError:
            log.warning("trace store: records still queued at shutdown were dropped")
        for task in (self._pruner, self._writer):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await self.store.close()

    async def flush(self) -> None:
        """Wait until everything queued so far is written (or dropped)."""
        await self._queue.join()

    async def settle(self, *, tune: bool = True) -> None:
        """Wait until every label call in flight is done and everything queued is stored, then (with
        auto_tune) sync the thresholds now. The online replay calls this every few requests, so when
        fits happen depends on the request stream only, not on timing."""
        while True:
            await self.shadow.wait_idle()
            await self.flush()
            if not self.shadow.busy:  # storing may have started judge calls: wait for those too
                break
        if tune and self.tuner is not None:
            await self.tuner.sync()

    async def prune(self) -> int:
        """Delete traces older than ``retention_days`` (with their attempts and labels), in small
        transactions so request records keep flowing in between. Returns how many traces went."""
        if self.cfg.retention_days <= 0 or not await self._open():
            return 0
        before = self.clock() - self.cfg.retention_days * 86400
        total = 0
        while True:
            n = await self.store.prune(before, PRUNE_BATCH)
            total += n
            if n < PRUNE_BATCH:
                break
        if total:
            log.info(
                "trace store: pruned old traces",
                extra={"traces": total, "retention_days": self.cfg.retention_days},
            )
        return total

    async def _retention_loop(self) -> None:
        while True:
            try:
                await self.prune()
            except StoreError as exc:
                log.warning("trace store: pruning old traces failed", extra={"error": str(exc)})
            await asyncio.sleep(RETENTION_EVERY_S)

    async def _open(self) -> bool:
        if self._opened:
            return True
        try:
            await self.store.open()
        except StoreError as exc:
            log.error("trace store unavailable; records are dropped until it is", extra={"error": str(exc)})
            return False
        self._opened = self._writing = True
        return True

    async def _write_loop(self) -> None:
        failures = 0
        while True:
            batch = [await self._queue.get()]
            while len(batch) < BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                if await self._open():
                    ok = await self._write(batch)
                else:
                    ok = False
                    self.metrics.traces_dropped("store_error", _records(batch))
                failures = 0 if ok else failures + 1
                self._writing = ok
            except Exception as exc:  # nothing may end the writer: later records must flow
                self.metrics.traces_dropped("bad_record", _records(batch))
                log.error("trace store writer: batch dropped", extra={"error": type(exc).__name__})
            finally:
                self._forget(batch)
                for _ in batch:
                    self._queue.task_done()
            if failures:
                await asyncio.sleep(_BACKOFF[min(failures, len(_BACKOFF)) - 1])

    def _forget(self, batch: list[_Item]) -> None:
        for b in batch:
            if isinstance(b, _Pending):
                self._pending.pop(b.trace.completion_id, None)

    async def _write(self, batch: list[_Item]) -> bool:
        have_judge = bool(self.cfg.judge)
        try:
            try:
                labels, built = await self.store.run(
                    _build_and_write, self.store, batch, self.cfg.store_text, have_judge
                )
            except StoreError:
                raise
            except Exception:  # a record the store cannot take, not the database failing
                # One at a time, so only the records at fault are lost (each in its own transaction).
                labels, built, bad = await self.store.run(
                    _write_each, self.store, batch, self.cfg.store_text, have_judge
                )
                self.metrics.traces_dropped("bad_record", len(bad))
                log.warning(
                    "trace store: records it cannot take were dropped",
                    extra={"records": len(bad), "errors": sorted(set(bad))},
                )
        except StoreError as exc:
            n = _records(batch)
            self.metrics.traces_dropped("store_error", n or 1)
            log.warning("trace store write failed; batch dropped", extra={"error": str(exc), "records": n})
            return False
        for (cascade, source), n in labels.items():
            self.metrics.labelled(cascade, source, n)
        if labels:
            self.labels_added.set()
        self._judge_free(built)
        return True

    def _judge_free(self, built: list[tuple[Trace, Built]]) -> None:
        """Free labels of free-form answers: ask the judge now, in the background (or count the skip)."""
        judge = self.shadow.judge_of(self._rt.upstreams) if self._rt is not None else None
        for trace, b in built:
            if b.skipped:
                self.metrics.labels_skipped(trace.cascade, b.skipped)
            if not b.judge:
                continue
            outcome = self.shadow.judge_free(trace, b.prompt, b.reference, b.judge, judge)
            if outcome != "judge":
                self.settle_sampling(trace.cascade, trace.completion_id, outcome)


def _records(batch: list[_Item]) -> int:
    return sum(1 for b in batch if isinstance(b, _Pending))


def _write_each(
    store: Store, batch: list[_Item], store_text: bool, have_judge: bool
) -> tuple[Counter[tuple[str, str]], list[tuple[Trace, Built]], list[str]]:
    """``_build_and_write`` item by item; returns the labels stored, what was built and, for each item
    that could not be built or stored, its error's type name (never its data). Database errors
    propagate."""
    counts: Counter[tuple[str, str]] = Counter()
    built: list[tuple[Trace, Built]] = []
    bad: list[str] = []
    for item in batch:
        try:
            c, b = store.run_sync(_build_and_write, store, [item], store_text, have_judge)
            counts += c
            built += b
        except StoreError:
            raise
        except Exception as exc:  # this record is at fault: drop it, keep the others
            bad.append(type(exc).__name__)
    return counts, built, bad


def _build_and_write(
    store: Store, batch: list[_Item], store_text: bool, have_judge: bool
) -> tuple[Counter[tuple[str, str]], list[tuple[Trace, Built]]]:
    """Build the rows of a batch and store them in one transaction. Runs in the store's worker thread,
    off the event loop. Returns the labels stored by (cascade, source), and what was built."""
    traces: list[TraceRow] = []
    labels: list[LabelRow] = []
    updates: list[tuple[str, str]] = []
    counts: Counter[tuple[str, str]] = Counter()
    built: list[tuple[Trace, Built]] = []
    extra: list[tuple[str, AttemptRow]] = []
    for item in batch:
        if isinstance(item, _Labels):
            labels.extend(item.rows)
            extra.extend(item.attempts)
            counts.update((item.cascade, lb.source) for lb in item.rows)
            continue
        if isinstance(item, _Sampling):
            updates.append((item.trace_id, item.outcome))
            continue
        m = item.meta
        b = build_rows(
            item.trace,
            item.ok,
            item.seconds,
            n_stages=m.n_stages,
            plan=m.fingerprint,
            fit_version=m.fit_version,
            created=item.created,
            store_text=store_text,
            compare=m.compare,
            have_judge=have_judge,
            sampling=item.sampling,
        )
        traces.append(b.row)
        labels.extend(b.labels)
        counts.update((m.name, lb.source) for lb in b.labels)
        built.append((item.trace, b))
    store.backend.write(traces, labels, extra)
    if updates:
        store.backend.set_sampling(updates)
    return counts, built
