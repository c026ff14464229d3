"""Online threshold tuning (``learning.auto_tune: true``), the same on every replica.

Every ``sync_every_s`` (and whenever labels were stored here) each cascade is synced with the store:

1. adopt the newest fit in the store when it is newer than the one in force (another replica made it);
2. when ``tune_every`` labels arrived since that fit and at least ``min_labels`` requests are labelled,
   fit again from every label up to the newest one (``calibration.fit``: deterministic, so replicas
   fitting the same labels agree), move each threshold at most ``max_step`` towards the fit, within
   ``threshold_bounds``, and store it as version ``n + 1``. When another replica stored version
   ``n + 1`` first, the insert does nothing and that fit is adopted instead: one sequence of versions
   for the fleet, every replica ends on the newest.

Applying a fit changes ``Plan.thresholds`` in place (requests starting afterwards use it), sets the
``cascade_threshold`` gauge and logs before/after with the evidence. Fitting runs in a thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from app.cascade.plan import Plan
from app.config import LearningConfig
from app.learning.calibration import assemble, fit, guard
from app.learning.store import Fit, Store, StoreError
from app.learning.thresholds import evaluate_cascade

log = logging.getLogger("cascade.learning")


@dataclass(slots=True)
class PlanMeta:
    """What a record needs to know about the plan it ran on, captured when the request finished."""

    name: str
    plan: Plan
    fingerprint: str
    n_stages: int
    config_thresholds: tuple[float, ...]  # the scored stages' thresholds from config.yaml
    fit_version: int = 0


class Tuner:
    """Keeps the thresholds of ``plans()`` tuned; ``apply(fit)`` puts a fit into force."""

    def __init__(
        self,
        cfg: LearningConfig,
        store: Store,
        plans: Callable[[], list[PlanMeta]],
        apply: Callable[[Fit], bool],
        labels_added: asyncio.Event,
        clock: Callable[[], float],
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.plans = plans
        self.apply = apply
        self.labels_added = labels_added
        self.clock = clock
        self._checked: dict[tuple[str, str], int] = {}  # last label id looked at without fitting
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="cascade-tuner")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _loop(self) -> None:
        event = self.labels_added
        while True:
            try:
                async with asyncio.timeout(self.cfg.sync_every_s):
                    await event.wait()
            except TimeoutError:
                pass
            event.clear()
            try:
                await self.sync()
            except StoreError as exc:
                log.warning("threshold sync failed", extra={"error": str(exc)})

    async def sync(self, *, refit: bool = True) -> None:
        for meta in self.plans():
            await self._sync_one(meta, refit)

    async def _sync_one(self, meta: PlanMeta, refit: bool) -> None:
        store = self.store
        latest = await store.latest_fit(meta.name, meta.fingerprint)
        if latest is not None and latest.version > meta.fit_version:
            self.apply(latest)
        if not refit:
            return
        key = (meta.name, meta.fingerprint)
        since = max(latest.last_label_id if latest else 0, self._checked.get(key, 0))
        new, top = await store.label_stats(meta.name, meta.fingerprint, since)
        if new < self.cfg.tune_every:
            return
        proposal = await self._fit(meta, latest, top)
        if proposal is None:
            self._checked[key] = top
            return
        if await store.save_fit(proposal):
            self.apply(proposal)
            return
        winner = await store.latest_fit(meta.name, meta.fingerprint)  # another replica was first
        if winner is not None:
            self.apply(winner)

    async def _fit(self, meta: PlanMeta, latest: Fit | None, top: int) -> Fit | None:
        cfg = self.cfg
        data = await self.store.labelled(meta.name, meta.fingerprint, top)
        old = latest.thresholds if latest is not None else meta.config_thresholds
        rows = await asyncio.to_thread(assemble, data, meta.n_stages)
        if rows.n < cfg.min_labels:
            log.info(
                "not enough labelled requests to tune",
                extra={"cascade": meta.name, "rows": rows.n, "min_labels": cfg.min_labels},
            )
            return None
        cal = await asyncio.to_thread(
            fit, rows, cfg.target_quality, margin_z=cfg.margin_z, bounds=cfg.threshold_bounds, current=old
        )
        new = guard(old, cal.thresholds, cfg.max_step, cfg.threshold_bounds)
        at_new = evaluate_cascade(rows.scores, rows.correct, rows.cost, new, rows.weights)
        evidence = {
            "rows": rows.n,
            "rows_by_reference": dict(sorted(rows.kinds.items())),
            "labels_by_source": dict(sorted(rows.labels.items())),
            "last_label_id": top,
            "target_quality": cfg.target_quality,
            "proposed": list(cal.thresholds),
            "feasible": cal.search.feasible,
            "proposed_quality": round(cal.chosen.quality, 6),
            "est_quality": round(at_new.quality, 6),
            "est_cost_usd": at_new.cost,
            "est_quality_before": None if cal.current is None else round(cal.current.quality, 6),
            "est_cost_usd_before": None if cal.current is None else cal.current.cost,
        }
        return Fit(
            meta.name,
            meta.fingerprint,
            (latest.version if latest is not None else 0) + 1,
            new,
            top,
            rows.n,
            at_new.quality,
            at_new.cost,
            cal.search.feasible,
            evidence,
            self.clock(),
        )
