"""The online tuner's memory of one cascade plan: its recent requests and labels, read incrementally.

``History.update(store)`` reads only what is new since the last call: traces after the last sequence
number seen (one small tuple each: when it arrived and which stage served it, the population the
labelling rates are measured against) and labels after the last label id seen, plus the attempts of
requests that got their first label. Nothing is re-read per refit (in PostgreSQL a short tail is, for
late commits; ``app.learning.store``). Memory is bounded: the newest ``keep`` labelled requests and the
requests since the oldest of them.

``History.rows(...)`` turns them into the fit's rows (``calibration.weigh``): deterministic, so replicas
holding the same labels fit the same thresholds.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field

from app.learning.calibration import AttemptT, Entry, LabelT, Rows, make_entry, weigh
from app.learning.store import TAIL_IDS, Store

PAGE = 5000  # rows per read
FIRST_KEEP = 2000  # first-stage scores kept (the newest; the score-shift test reads at most 1,200)


@dataclass(slots=True)
class _Request:
    seq: int
    n_stages: int
    accepted: int | None
    baseline: float
    attempts: dict[int, AttemptT] = field(default_factory=dict)
    labels: list[LabelT] = field(default_factory=list)
    label_ids: list[int] = field(default_factory=list)


class History:
    def __init__(self, cascade: str, plan: str, n_stages: int, keep: int) -> None:
        self.cascade = cascade
        self.plan = plan
        self.n_stages = n_stages
        self.keep = keep  # labelled requests kept (0: all)
        self.last_seq = 0
        self.last_label_id = 0
        self._population: deque[tuple[int, int]] = deque()  # (seq, accepted stage) of answered requests
        self._budget: deque[int] = deque()  # seqs whose shadow call the spend caps ruled out
        self._drawn: deque[int] = deque()  # seqs whose shadow call was drawn (made or not)
        # (seq, first stage's score) of the newest answered requests, labelled or not
        self._first: deque[tuple[int, float]] = deque(maxlen=FIRST_KEEP)
        self._seen_seqs: set[int] = set()  # recent ones only (the PostgreSQL tail)
        self._requests: dict[str, _Request] = {}  # labelled requests by trace id
        self._label_ids: list[int] = []  # ids of the labels held, ascending
        self._seen_labels: set[int] = set()

    def labels_after(self, label_id: int) -> int:
        """How many of the labels held have an id above ``label_id``."""
        return len(self._label_ids) - bisect.bisect_right(self._label_ids, label_id)

    async def update(self, store: Store) -> int:
        """Read what is new; returns how many labels were new."""
        tail = TAIL_IDS if store.kind == "postgresql" else 0
        await self._read_traces(store, tail)
        return await self._read_labels(store, tail)

    async def _read_traces(self, store: Store, tail: int) -> None:
        after = max(0, self.last_seq - tail)
        late = False
        while True:
            new = await store.traces_after(self.cascade, self.plan, after, PAGE)
            got = new.traces
            capped = set(new.budget)
            drawn = set(new.drawn)
            first = dict(new.first_scores)
            for seq, _tid, _n, accepted, _base in got:
                if seq in self._seen_seqs or seq <= self.last_seq - tail:
                    continue
                self._seen_seqs.add(seq)
                if accepted is not None:
                    late = late or bool(self._population and seq < self._population[-1][0])
                    self._population.append((seq, int(accepted)))
                    if seq in capped:
                        self._budget.append(seq)
                    if seq in drawn:
                        self._drawn.append(seq)
                    if seq in first:
                        self._first.append((seq, first[seq]))
                self.last_seq = max(self.last_seq, seq)
            if len(got) < PAGE:
                break
            after = got[-1][0]
        self._seen_seqs = {s for s in self._seen_seqs if s > self.last_seq - tail} if tail else set()
        if late:  # a late commit (PostgreSQL): keep arrival order
            self._population = deque(sorted(self._population))
            self._budget = deque(sorted(self._budget))
            self._drawn = deque(sorted(self._drawn))
            self._first = deque(sorted(self._first), maxlen=FIRST_KEEP)

    async def _read_labels(self, store: Store, tail: int) -> int:
        after = max(0, self.last_label_id - tail)
        new: dict[str, list[tuple[int, LabelT]]] = {}
        while True:
            got = await store.labels_after(self.cascade, self.plan, after, PAGE)
            for lid, tid, stage, source, value, weight, cost in got:
                lid = int(lid)
                if lid in self._seen_labels or lid <= self.last_label_id - tail:
                    continue
                self._seen_labels.add(lid)
                label: LabelT = (str(source), stage, float(value), float(weight), float(cost))
                new.setdefault(str(tid), []).append((lid, label))
                self.last_label_id = max(self.last_label_id, lid)
            if len(got) < PAGE:
                break
            after = int(got[-1][0])
        self._seen_labels = {i for i in self._seen_labels if i > self.last_label_id - tail} if tail else set()
        if not new:
            return 0
        fresh = [tid for tid in new if tid not in self._requests]
        if fresh:
            await self._load(store, fresh)
        count = 0
        for tid, labels in new.items():
            req = self._requests.get(tid)
            if req is None:  # its trace is gone (pruned) or of another plan
                continue
            for lid, label in sorted(labels):
                req.labels.append(label)
                req.label_ids.append(lid)
                bisect.insort(self._label_ids, lid)
                count += 1
        self._trim()
        return count

    async def _load(self, store: Store, trace_ids: list[str]) -> None:
        info = await store.trace_rows(trace_ids)
        attempts = await store.attempts_of(trace_ids)
        for seq, tid, n, accepted, baseline in info.traces:
            self._requests[tid] = _Request(seq, n, accepted, baseline)
        for tid, stage, outcome, score, cost in attempts:
            req = self._requests.get(tid)
            if req is not None:
                req.attempts[int(stage)] = (outcome, score, float(cost))

    def _trim(self) -> None:
        if not self.keep or len(self._requests) <= self.keep:
            return
        by_seq = sorted(self._requests.values(), key=lambda r: r.seq)
        self.forget_before(by_seq[len(by_seq) - self.keep].seq)

    def forget_before(self, seq: int) -> None:
        """Drop the requests (labelled or not) that arrived before ``seq``: a change was detected there,
        or they fell out of the window."""
        if seq <= 0:
            return
        old = [tid for tid, r in self._requests.items() if r.seq < seq]
        for tid in old:
            del self._requests[tid]
        while self._population and self._population[0][0] < seq:
            self._population.popleft()
        while self._budget and self._budget[0] < seq:
            self._budget.popleft()
        while self._drawn and self._drawn[0] < seq:
            self._drawn.popleft()
        while self._first and self._first[0][0] < seq:
            self._first.popleft()
        if old:
            self._label_ids = sorted(i for r in self._requests.values() for i in r.label_ids)

    def entries(self, pass_score: float) -> list[Entry]:
        out = []
        for req in sorted(self._requests.values(), key=lambda r: r.seq):
            e = make_entry(
                req.seq, req.n_stages, req.accepted, req.baseline, req.attempts, req.labels,
                self.n_stages, pass_score,
            )  # fmt: skip
            if e is not None:
                out.append(e)
        return out

    def rows(self, *, half_life: int, window: int, pass_score: float) -> Rows:
        return weigh(
            self.entries(pass_score),
            self.n_stages,
            list(self._population),
            half_life=half_life,
            window=window,
            last_id=self.last_label_id,
        )

    def early_labelled(self) -> list[tuple[int, int]]:
        """(seq, accepted stage) of the requests answered before the last stage that have a shadow or
        user label, in arrival order."""
        last = self.n_stages - 1
        out = [
            (r.seq, r.accepted)
            for r in self._requests.values()
            if r.accepted is not None
            and r.accepted < last
            and any(lb[0] in ("shadow", "user") for lb in r.labels)
        ]
        return sorted(out)

    @property
    def budget_skipped(self) -> list[int]:
        """Seqs of the requests held whose drawn shadow call the spend caps ruled out, ascending."""
        return list(self._budget)

    @property
    def drawn(self) -> list[int]:
        """Seqs of the requests held whose shadow call was drawn (made, or ruled out), ascending."""
        return list(self._drawn)

    @property
    def first_scores(self) -> list[tuple[int, float]]:
        """(seq, score) of the first stage's answers of the newest answered requests, in arrival order."""
        return list(self._first)

    @property
    def population(self) -> list[tuple[int, int]]:
        """(seq, accepted stage) of every answered request held, in arrival order."""
        return list(self._population)

    @property
    def size(self) -> tuple[int, int]:
        """(labelled requests, requests) held."""
        return len(self._requests), len(self._population)
