"""The trace store: decision records, labels and fitted thresholds, in SQLite or PostgreSQL.

Over 400 lines on purpose: every SQL statement of the store, for both backends, in one place to read.

``Store(url)`` is an async facade over two blocking connections, each used from a worker thread of its
own: one writes (records, labels, fits, pruning, the schema), one reads (feedback lookups, the tuner's
queries), so the event loop never waits on the database and a slow read never holds up the writes. The
two backends share every query (stdlib ``sqlite3`` in WAL mode, where readers and the writer do not
block each other; ``psycopg`` 3 for ``postgresql://``, where every statement has a time limit,
``statement_timeout_s``). ``close()`` is bounded: a call stuck past it is left to its daemon thread.
The schema is created, or migrated, on ``open()`` under a lock (``BEGIN IMMEDIATE`` / an advisory
lock), so replicas starting together agree on it. Database errors are translated to ``StoreError``
here, at the boundary.

Fits are versioned per (cascade, plan): ``save_fit`` inserts version ``base + 1`` and fails quietly
when another replica got there first, which then is the fit everyone adopts.

Incremental reads (the online tuner): traces by their insertion sequence (``seq``: SQLite's rowid, a
BIGSERIAL in PostgreSQL) and labels by id, each after the last one seen. SQLite commits in id order;
in PostgreSQL a smaller id can commit after a larger one (two replicas writing at once), so readers
there re-read a short tail (``TAIL_IDS``) and skip what they have. ``rows_read`` counts every row read.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import astuple, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from app.errors import CascadeBaseError
from app.learning.records import AttemptRow, LabelRow, TraceRow

T = TypeVar("T")
log = logging.getLogger("cascade.learning")

STATEMENT_TIMEOUT_S = 30.0  # PostgreSQL: the longest one statement may run (learning.statement_timeout_s)
CLOSE_TIMEOUT_S = 5.0  # close() waits this long for calls in flight

SCHEMA_VERSION = 3
_LOCK_KEY = 7_220_113  # advisory lock id for schema changes (PostgreSQL)

_V1 = [
    """CREATE TABLE traces (id TEXT PRIMARY KEY, request_id TEXT NOT NULL, cascade TEXT NOT NULL,
    plan TEXT NOT NULL, fit_version INTEGER NOT NULL, created {F} NOT NULL, ok INTEGER NOT NULL,
    stream INTEGER NOT NULL, n_stages INTEGER NOT NULL, accepted_stage INTEGER, cost_usd {F} NOT NULL,
    baseline_usd {F} NOT NULL, latency_ms {F} NOT NULL, prompt_hash TEXT NOT NULL,
    prompt_chars INTEGER NOT NULL, prompt_text TEXT)""",
    "CREATE INDEX traces_cascade ON traces (cascade, plan, created)",
    """CREATE TABLE attempts (trace_id TEXT NOT NULL, stage INTEGER NOT NULL, upstream TEXT NOT NULL,
    outcome TEXT NOT NULL, reason TEXT NOT NULL, score {F}, threshold {F}, scores TEXT NOT NULL,
    reasons TEXT NOT NULL, prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL,
    cost_usd {F} NOT NULL, latency_ms {F} NOT NULL, finish_reason TEXT, answer_hash TEXT,
    answer_chars INTEGER NOT NULL, answer_text TEXT, PRIMARY KEY (trace_id, stage))""",
    """CREATE TABLE labels (id {ID}, trace_id TEXT NOT NULL, stage INTEGER, source TEXT NOT NULL,
    value {F} NOT NULL, weight {F} NOT NULL, created {F} NOT NULL, cost_usd {F} NOT NULL,
    detail TEXT NOT NULL)""",
    "CREATE INDEX labels_trace ON labels (trace_id)",
    """CREATE TABLE fits (cascade TEXT NOT NULL, plan TEXT NOT NULL, version INTEGER NOT NULL,
    thresholds TEXT NOT NULL, last_label_id BIGINT NOT NULL, n_rows INTEGER NOT NULL, quality {F},
    cost_usd {F}, feasible INTEGER NOT NULL, evidence TEXT NOT NULL, created {F} NOT NULL,
    PRIMARY KEY (cascade, plan, version))""",
]
_V2 = ["CREATE INDEX traces_created ON traces (created)"]  # retention prunes by age
# v3: what happened about labels per request, and an insertion sequence for incremental reads.
_V3 = [
    "ALTER TABLE traces ADD COLUMN sampling TEXT NOT NULL DEFAULT ''",
    "{SEQ}",
    "CREATE INDEX traces_plan_seq ON traces (cascade, plan{SEQ_COL})",
]
MIGRATIONS: list[list[str]] = [_V1, _V2, _V3]  # MIGRATIONS[i] takes the schema from version i to i + 1
TAIL_IDS = 1000  # PostgreSQL: ids re-read behind the last one seen (late commits)
PRUNE_BATCH = 1000  # traces deleted per transaction, so writers are never locked out for long

_TRACE_COLUMNS = (
    "id, request_id, cascade, plan, fit_version, created, ok, stream, n_stages, accepted_stage, cost_usd, "
    "baseline_usd, latency_ms, prompt_hash, prompt_chars, prompt_text, sampling"
)
_INSERT_TRACE = (
    f"INSERT INTO traces ({_TRACE_COLUMNS}) VALUES (" + ",".join("?" * 17) + ") ON CONFLICT DO NOTHING"
)
_INSERT_ATTEMPT = "INSERT INTO attempts VALUES (" + ",".join("?" * 17) + ") ON CONFLICT DO NOTHING"
_INSERT_LABEL = (
    "INSERT INTO labels (trace_id, stage, source, value, weight, created, cost_usd, detail) "
    "VALUES (?,?,?,?,?,?,?,?)"
)
_SCOPE = "t.cascade = ? AND t.plan = ?"


class StoreError(CascadeBaseError):
    """The trace store could not be opened, read or written."""


@dataclass(frozen=True, slots=True)
class Fit:
    cascade: str
    plan: str
    version: int
    thresholds: tuple[float, ...]
    last_label_id: int
    n_rows: int
    quality: float | None
    cost_usd: float | None
    feasible: bool
    evidence: dict[str, Any]
    created: float


@dataclass(slots=True)
class LabelledData:
    """Raw rows for calibration: traces with labels, their attempts, and the labels (by id)."""

    traces: list[tuple[str, int, int | None, float]]  # id, n_stages, accepted_stage, baseline_usd
    attempts: list[tuple[str, int, str, float | None, float]]  # trace_id, stage, outcome, score, cost
    labels: list[tuple[int, str, int | None, str, float, float, float]]  # id, trace, stage, source, v, w, $
    # requests of the same scope (labelled or not) by accepted stage: what the realised labelling rates
    # are measured against; None when unknown (the stored nominal weights are used then)
    accepted: dict[int, int] | None = None


@dataclass(slots=True)
class NewTraces:
    """Traces after a sequence number (any label state), for the incremental reader."""

    # seq, id, n_stages, accepted_stage (None: failed), baseline_usd
    traces: list[tuple[int, str, int, int | None, float]]
    # seqs of those whose shadow call was drawn and not made for the spend caps (sampling "budget")
    budget: list[int] = field(default_factory=list)
    # seqs of those whose shadow call was drawn (sampling not "", "not_drawn", "no_label"; "budget" too)
    drawn: list[int] = field(default_factory=list)
    # (seq, score) of the answered ones whose first stage scored an answer (routed ones skip it)
    first_scores: list[tuple[int, float]] = field(default_factory=list)


@dataclass(slots=True)
class LabelledTexts:
    """Labelled traces of one cascade with their texts (any plan), for fitting learned scorers.
    Texts are None where ``store_text`` was off when the trace was recorded."""

    traces: list[tuple[str, int, int | None, float, str | None]]  # id, n_stages, accepted, baseline, prompt
    # trace_id, stage, upstream, outcome, reason, cost_usd, finish_reason, answer_text
    attempts: list[tuple[str, int, str, str, str, float, str | None, str | None]]
    labels: list[tuple[int, str, int | None, str, float, float, float]]  # as LabelledData.labels


@dataclass(slots=True)
class LabelSummary:
    """Labels by request (count, label spend), by source and by comparator (``detail``)."""

    by_trace: dict[str, tuple[int, float]]
    by_source: dict[str, int]
    by_detail: dict[str, int]


def _file_id(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


class _Backend:
    """One blocking connection; every method runs in the worker thread that owns it."""

    def __init__(self, url: str, statement_timeout_s: float = STATEMENT_TIMEOUT_S) -> None:
        self.url = url
        self.postgres = url.startswith(("postgresql://", "postgres://"))
        self.statement_timeout_s = statement_timeout_s
        self._conn: Any = None
        self.rows_read = 0  # every row any read returned (tests check reads stay incremental)
        self.seq = "seq" if self.postgres else "rowid"
        self._file: tuple[int, int] | None = None  # SQLite: the file's (device, inode) when opened
        self._recreated = False

    # --- connection -------------------------------------------------------------------------------

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.postgres else sql

    def connect(self) -> Any:
        if self._conn is not None:
            if self.postgres or self._same_file():
                return self._conn
            # The file was deleted or replaced under the open connection (a clean-up job, a restore):
            # writes went on into the deleted file, silently, and were lost at the next restart; a reader
            # reopened the path to an empty database without tables. Start a new one where it was.
            log.warning(
                "trace store: the SQLite file was deleted or replaced; a new one is created in its place"
            )
            self.close()
            self._recreated = True
        if self.postgres:
            import psycopg

            # A hung statement (a lock, a runaway plan) fails after the limit instead of blocking every
            # write behind it, and shutdown. A statement_timeout set in the URL's options wins.
            extra: dict[str, Any] = {}
            if "statement_timeout" not in self.url:
                extra["options"] = f"-c statement_timeout={max(1, round(self.statement_timeout_s * 1000))}"
            self._conn = psycopg.connect(self.url, autocommit=True, connect_timeout=5, **extra)
        else:
            path = Path(self.url.removeprefix("sqlite:///"))
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._conn = conn
            self._file = _file_id(path)
            if self._recreated:
                self.migrate()
                self._recreated = False
        return self._conn

    def _same_file(self) -> bool:
        return _file_id(Path(self.url.removeprefix("sqlite:///"))) == self._file

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None

    def _tx(self, work: Callable[[Any], T]) -> T:
        """Run ``work(cursor)`` in one transaction; drop the connection after an error."""
        conn = self.connect()
        cur = conn.cursor()
        try:
            cur.execute("BEGIN IMMEDIATE" if not self.postgres else "BEGIN")
            out = work(cur)
            cur.execute("COMMIT")
            return out
        except BaseException:
            try:
                cur.execute("ROLLBACK")
            except Exception:
                self.close()
            raise
        finally:
            try:
                cur.close()
            except Exception:  # the connection is already gone
                self.close()

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        cur = self.connect().cursor()
        try:
            cur.execute(self._sql(sql), tuple(args))
            rows = [tuple(r) for r in cur.fetchall()]
            self.rows_read += len(rows)
            return rows
        finally:
            cur.close()

    # --- schema -------------------------------------------------------------------------------------

    def migrate(self) -> int:
        types = (
            {
                "F": "DOUBLE PRECISION",
                "ID": "BIGSERIAL PRIMARY KEY",
                "SEQ": "ALTER TABLE traces ADD COLUMN seq BIGSERIAL",
                "SEQ_COL": ", seq",
            }
            if self.postgres
            else {
                "F": "REAL",
                "ID": "INTEGER PRIMARY KEY AUTOINCREMENT",
                "SEQ": "SELECT 1",  # the rowid is the sequence (and every SQLite index ends with it)
                "SEQ_COL": "",
            }
        )

        def work(cur: Any) -> int:
            if self.postgres:
                cur.execute(f"SELECT pg_advisory_xact_lock({_LOCK_KEY})")
            cur.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            cur.execute("SELECT max(version) FROM schema_version")
            row = cur.fetchone()
            have = int(row[0]) if row and row[0] is not None else 0
            if have > SCHEMA_VERSION:
                raise StoreError(f"the store's schema version {have} is newer than this proxy's")
            for version in range(have, SCHEMA_VERSION):
                for ddl in MIGRATIONS[version]:
                    cur.execute(ddl.format(**types))
                cur.execute(self._sql("INSERT INTO schema_version VALUES (?)"), (version + 1,))
            return SCHEMA_VERSION

        return self._tx(work)

    # --- writes --------------------------------------------------------------------------------------

    def write(
        self,
        traces: Sequence[TraceRow],
        labels: Sequence[LabelRow],
        attempts: Sequence[tuple[str, AttemptRow]] = (),
    ) -> None:
        """Traces with their attempts, labels, and ``attempts`` of earlier traces (trace id, row): the
        middle stages a shadow call asked."""
        trace_rows = [
            (
                t.id, t.request_id, t.cascade, t.plan, t.fit_version, t.created, int(t.ok), int(t.stream),
                t.n_stages, t.accepted_stage, t.cost_usd, t.baseline_usd, t.latency_ms, t.prompt_hash,
                t.prompt_chars, t.prompt_text, t.sampling,
            )
            for t in traces
        ]  # fmt: skip
        attempt_rows = [(t.id, *astuple(a)) for t in traces for a in t.attempts]
        attempt_rows += [(tid, *astuple(a)) for tid, a in attempts]
        label_rows = [astuple(lb) for lb in labels]

        def work(cur: Any) -> None:
            if trace_rows:
                cur.executemany(self._sql(_INSERT_TRACE), trace_rows)
            if attempt_rows:
                cur.executemany(self._sql(_INSERT_ATTEMPT), attempt_rows)
            if label_rows:
                cur.executemany(self._sql(_INSERT_LABEL), label_rows)

        self._tx(work)

    def set_sampling(self, updates: Sequence[tuple[str, str]]) -> None:
        """(trace id, sampling) pairs: what finally happened about a request's labels."""
        rows = [(value, tid) for tid, value in updates]

        def work(cur: Any) -> None:
            cur.executemany(self._sql("UPDATE traces SET sampling = ? WHERE id = ?"), rows)

        self._tx(work)

    def save_fit(self, fit: Fit) -> bool:
        row = (
            fit.cascade,
            fit.plan,
            fit.version,
            json.dumps(list(fit.thresholds)),
            fit.last_label_id,
            fit.n_rows,
            fit.quality,
            fit.cost_usd,
            int(fit.feasible),
            json.dumps(fit.evidence, sort_keys=True),
            fit.created,
        )
        sql = "INSERT INTO fits VALUES (?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING"

        def work(cur: Any) -> bool:
            cur.execute(self._sql(sql), row)
            return bool(cur.rowcount == 1)

        return self._tx(work)

    def prune(self, before: float, limit: int = PRUNE_BATCH) -> int:
        """Delete up to ``limit`` of the oldest traces created before ``before`` (epoch seconds), with
        their attempts and labels. Returns how many; call again until it returns less than ``limit``."""

        # The newest trace always stays: SQLite numbers new rows after the largest row id in the table,
        # so an emptied table started again at 1, below the sequence the online tuner had read up to,
        # and it missed every new trace until the numbers caught up (millions of requests).
        newest = f"(SELECT max({self.seq}) FROM traces)"

        def work(cur: Any) -> int:
            cur.execute(
                self._sql(
                    f"SELECT id FROM traces WHERE created < ? AND {self.seq} < {newest} "
                    "ORDER BY created LIMIT ?"
                ),
                (before, limit),
            )
            ids = [r[0] for r in cur.fetchall()]
            if ids:
                marks = ",".join("?" * len(ids))
                for table, column in (("labels", "trace_id"), ("attempts", "trace_id"), ("traces", "id")):
                    cur.execute(self._sql(f"DELETE FROM {table} WHERE {column} IN ({marks})"), ids)
            return len(ids)

        return self._tx(work)

    # --- reads ---------------------------------------------------------------------------------------

    def trace_info(self, trace_id: str) -> tuple[str, int | None] | None:
        rows = self._read("SELECT cascade, accepted_stage FROM traces WHERE id = ?", (trace_id,))
        return (str(rows[0][0]), rows[0][1]) if rows else None

    def latest_fit(self, cascade: str, plan: str) -> Fit | None:
        rows = self._read(
            "SELECT cascade, plan, version, thresholds, last_label_id, n_rows, quality, cost_usd, feasible,"
            " evidence, created FROM fits WHERE cascade = ? AND plan = ? ORDER BY version DESC LIMIT 1",
            (cascade, plan),
        )
        if not rows:
            return None
        r = rows[0]
        return Fit(
            r[0], r[1], int(r[2]), tuple(json.loads(r[3])), int(r[4]), int(r[5]), r[6], r[7], bool(r[8]),
            json.loads(r[9]), float(r[10]),
        )  # fmt: skip

    def label_stats(self, cascade: str, plan: str, after_id: int) -> tuple[int, int]:
        """(labels with id > after_id, the highest label id) of this cascade and plan."""
        rows = self._read(
            f"SELECT count(*), max(l.id) FROM labels l JOIN traces t ON t.id = l.trace_id "
            f"WHERE {_SCOPE} AND l.id > ?",
            (cascade, plan, after_id),
        )
        n, top = rows[0] if rows else (0, None)
        return int(n or 0), int(top or after_id)

    def labelled(self, cascade: str, plan: str, max_label_id: int | None) -> LabelledData:
        top = max_label_id if max_label_id is not None else 2**62
        labelled = "t.id IN (SELECT trace_id FROM labels WHERE id <= ?)"
        args = (cascade, plan, top)
        traces = self._read(
            f"SELECT t.id, t.n_stages, t.accepted_stage, t.baseline_usd FROM traces t "
            f"WHERE {_SCOPE} AND {labelled} ORDER BY t.id",
            args,
        )
        attempts = self._read(
            f"SELECT a.trace_id, a.stage, a.outcome, a.score, a.cost_usd FROM attempts a "
            f"JOIN traces t ON t.id = a.trace_id WHERE {_SCOPE} AND {labelled} ORDER BY a.trace_id, a.stage",
            args,
        )
        labels = self._read(
            f"SELECT l.id, l.trace_id, l.stage, l.source, l.value, l.weight, l.cost_usd FROM labels l "
            f"JOIN traces t ON t.id = l.trace_id WHERE {_SCOPE} AND l.id <= ? ORDER BY l.id",
            args,
        )
        return LabelledData(traces, attempts, labels, self.accepted_counts(cascade, plan))

    def accepted_counts(self, cascade: str, plan: str) -> dict[int, int]:
        rows = self._read(
            f"SELECT t.accepted_stage, count(*) FROM traces t WHERE {_SCOPE} "
            "AND t.accepted_stage IS NOT NULL GROUP BY t.accepted_stage",
            (cascade, plan),
        )
        return {int(k): int(n) for k, n in rows}

    # --- incremental reads (the online tuner) ---------------------------------------------------------

    def traces_after(self, cascade: str, plan: str, after_seq: int, limit: int) -> NewTraces:
        rows = self._read(
            f"SELECT t.{self.seq}, t.id, t.n_stages, t.accepted_stage, t.baseline_usd, t.sampling, "
            "(SELECT a.score FROM attempts a WHERE a.trace_id = t.id AND a.stage = 0) "
            f"FROM traces t WHERE {_SCOPE} AND t.{self.seq} > ? ORDER BY t.{self.seq} LIMIT ?",
            (cascade, plan, after_seq, limit),
        )
        return NewTraces(
            [(int(r[0]), str(r[1]), int(r[2]), r[3], float(r[4])) for r in rows],
            [int(r[0]) for r in rows if r[5] == "budget"],
            # (not "no_label": a comparator that cannot label these answers is no sign of stale labels)
            [int(r[0]) for r in rows if r[5] not in ("", "not_drawn", "no_label")],
            [(int(r[0]), float(r[6])) for r in rows if r[3] is not None and r[6] is not None],
        )

    def labels_after(
        self, cascade: str, plan: str, after_id: int, limit: int
    ) -> list[tuple[int, str, int | None, str, float, float, float]]:
        return self._read(
            "SELECT l.id, l.trace_id, l.stage, l.source, l.value, l.weight, l.cost_usd FROM labels l "
            f"JOIN traces t ON t.id = l.trace_id WHERE {_SCOPE} AND l.id > ? ORDER BY l.id LIMIT ?",
            (cascade, plan, after_id, limit),
        )

    def trace_rows(self, trace_ids: Sequence[str]) -> NewTraces:
        out: list[tuple[int, str, int, int | None, float]] = []
        for i in range(0, len(trace_ids), 500):
            chunk = list(trace_ids[i : i + 500])
            marks = ",".join("?" * len(chunk))
            rows = self._read(
                f"SELECT {self.seq}, id, n_stages, accepted_stage, baseline_usd FROM traces "
                f"WHERE id IN ({marks})",
                chunk,
            )
            out += [(int(r[0]), str(r[1]), int(r[2]), r[3], float(r[4])) for r in rows]
        return NewTraces(sorted(out))

    def attempts_of(self, trace_ids: Sequence[str]) -> list[tuple[str, int, str, float | None, float]]:
        out: list[tuple[str, int, str, float | None, float]] = []
        for i in range(0, len(trace_ids), 500):
            chunk = list(trace_ids[i : i + 500])
            marks = ",".join("?" * len(chunk))
            out += self._read(
                "SELECT trace_id, stage, outcome, score, cost_usd FROM attempts "
                f"WHERE trace_id IN ({marks}) ORDER BY trace_id, stage",
                chunk,
            )
        return out

    def labelled_texts(self, cascade: str) -> LabelledTexts:
        labelled = "t.id IN (SELECT trace_id FROM labels)"
        traces = self._read(
            f"SELECT t.id, t.n_stages, t.accepted_stage, t.baseline_usd, t.prompt_text FROM traces t "
            f"WHERE t.cascade = ? AND {labelled} ORDER BY t.id",
            (cascade,),
        )
        attempts = self._read(
            f"SELECT a.trace_id, a.stage, a.upstream, a.outcome, a.reason, a.cost_usd, a.finish_reason, "
            f"a.answer_text FROM attempts a JOIN traces t ON t.id = a.trace_id "
            f"WHERE t.cascade = ? AND {labelled} ORDER BY a.trace_id, a.stage",
            (cascade,),
        )
        labels = self._read(
            "SELECT l.id, l.trace_id, l.stage, l.source, l.value, l.weight, l.cost_usd FROM labels l "
            "JOIN traces t ON t.id = l.trace_id WHERE t.cascade = ? ORDER BY l.id",
            (cascade,),
        )
        return LabelledTexts(traces, attempts, labels)

    def label_summary(self) -> LabelSummary:
        rows = self._read("SELECT trace_id, count(*), sum(cost_usd) FROM labels GROUP BY trace_id")
        by_source = self._read("SELECT source, count(*) FROM labels GROUP BY source ORDER BY source")
        by_detail = self._read("SELECT detail, count(*) FROM labels GROUP BY detail ORDER BY detail")
        return LabelSummary(
            {str(t): (int(n), float(c or 0.0)) for t, n, c in rows},
            {str(k): int(n) for k, n in by_source},
            {str(k): int(n) for k, n in by_detail},
        )

    def counts(self) -> dict[str, int]:
        out = {"traces": int(self._read("SELECT count(*) FROM traces")[0][0])}
        for source, n in self._read("SELECT source, count(*) FROM labels GROUP BY source ORDER BY source"):
            out[f"labels_{source}"] = int(n)
        return out


def _db_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [sqlite3.Error, OSError]
    try:
        import psycopg

        errors.append(psycopg.Error)
    except ImportError:  # only needed for postgresql:// stores
        pass
    return tuple(errors)


class _Worker:
    """One daemon thread that runs calls in order. A daemon: a call stuck in the database cannot hold up
    the process exit (``ThreadPoolExecutor`` threads are joined at exit)."""

    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue[tuple[Future[Any], Callable[[], Any]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._started = False

    def submit(self, call: Callable[[], T]) -> Future[T]:
        if not self._started:
            self._started = True
            self._thread.start()
        done: Future[T] = Future()
        self._calls.put((done, call))
        return done

    def stop(self) -> None:
        self._calls.put(None)

    def _loop(self) -> None:
        while (item := self._calls.get()) is not None:
            done, call = item
            if not done.set_running_or_notify_cancel():
                continue  # its caller gave up before it started
            try:
                done.set_result(call())
            except BaseException as exc:
                done.set_exception(exc)


class Store:
    """Async trace store. ``url``: ``sqlite:///PATH`` or ``postgresql://...``."""

    def __init__(self, url: str, *, statement_timeout_s: float = STATEMENT_TIMEOUT_S) -> None:
        self.url = url
        self.kind = "postgresql" if url.startswith(("postgresql://", "postgres://")) else "sqlite"
        self._b = _Backend(url, statement_timeout_s)  # writes (and ``run``)
        self._r = _Backend(url, statement_timeout_s)  # reads
        self._writer = _Worker("cascade-store-write")
        self._reader = _Worker("cascade-store-read")
        self._errors = _db_errors()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Call ``fn(*args)`` in the store's writer thread (it may use ``self.backend``)."""
        return await asyncio.wrap_future(self._writer.submit(lambda: self._call(self._b, fn, args)))

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        """Call ``fn(*args)``, a method of the reading backend, in the reader thread."""
        return await asyncio.wrap_future(self._reader.submit(lambda: self._call(self._r, fn, args)))

    def _call(self, backend: _Backend, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        try:
            return fn(*args)
        except StoreError:
            raise
        except ImportError as exc:
            raise StoreError("postgresql:// stores need psycopg: pip install 'psycopg[binary]'") from exc
        except self._errors as exc:
            backend.close()
            raise StoreError(f"{self.kind} store: {type(exc).__name__}: {_first_line(exc)}") from exc

    def run_sync(self, fn: Callable[..., T], *args: Any) -> T:
        """Call a backend method from a thread that is not the event loop (the CLI, or the writer thread
        itself); it may use ``self.backend``."""
        return self._call(self._b, fn, args)

    @property
    def backend(self) -> _Backend:
        return self._b

    async def open(self) -> int:
        return await self.run(self._b.migrate)

    async def write(
        self,
        traces: Sequence[TraceRow],
        labels: Sequence[LabelRow],
        attempts: Sequence[tuple[str, AttemptRow]] = (),
    ) -> None:
        await self.run(self._b.write, traces, labels, attempts)

    async def prune(self, before: float, limit: int = PRUNE_BATCH) -> int:
        return await self.run(self._b.prune, before, limit)

    async def trace_info(self, trace_id: str) -> tuple[str, int | None] | None:
        return await self._read(self._r.trace_info, trace_id)

    async def latest_fit(self, cascade: str, plan: str) -> Fit | None:
        return await self._read(self._r.latest_fit, cascade, plan)

    async def save_fit(self, fit: Fit) -> bool:
        return await self.run(self._b.save_fit, fit)

    async def label_stats(self, cascade: str, plan: str, after_id: int) -> tuple[int, int]:
        return await self._read(self._r.label_stats, cascade, plan, after_id)

    async def labelled(self, cascade: str, plan: str, max_label_id: int | None = None) -> LabelledData:
        return await self._read(self._r.labelled, cascade, plan, max_label_id)

    async def labelled_texts(self, cascade: str) -> LabelledTexts:
        return await self._read(self._r.labelled_texts, cascade)

    async def label_summary(self) -> LabelSummary:
        return await self._read(self._r.label_summary)

    async def counts(self) -> dict[str, int]:
        """Traces stored, and labels by source (``labels_<source>``)."""
        return await self._read(self._r.counts)

    async def set_sampling(self, updates: Sequence[tuple[str, str]]) -> None:
        await self.run(self._b.set_sampling, updates)

    async def traces_after(self, cascade: str, plan: str, after_seq: int, limit: int) -> NewTraces:
        return await self._read(self._r.traces_after, cascade, plan, after_seq, limit)

    async def labels_after(
        self, cascade: str, plan: str, after_id: int, limit: int
    ) -> list[tuple[int, str, int | None, str, float, float, float]]:
        return await self._read(self._r.labels_after, cascade, plan, after_id, limit)

    async def trace_rows(self, trace_ids: Sequence[str]) -> NewTraces:
        return await self._read(self._r.trace_rows, trace_ids)

    async def attempts_of(self, trace_ids: Sequence[str]) -> list[tuple[str, int, str, float | None, float]]:
        return await self._read(self._r.attempts_of, trace_ids)

    @property
    def rows_read(self) -> int:
        """Rows every read so far returned (both connections): tests check reads stay incremental."""
        return self._b.rows_read + self._r.rows_read

    async def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Close both connections once the calls queued before have run, waiting at most ``timeout_s``:
        a call stuck past that (a dead network) is left to its daemon thread, and shutdown goes on."""
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.gather(self.run(self._b.close), self._read(self._r.close))
        except TimeoutError:
            log.warning("trace store: a database call still runs at close; left behind")
        finally:
            self._writer.stop()
            self._reader.stop()


def _first_line(exc: BaseException) -> str:
    # Driver messages name tables and constraints, never row values; passwords are not in them either.
    return (str(exc).strip().splitlines() or [""])[0][:200]
