"""The PostgreSQL trace store, on a real server: records and labels through the proxy, schema set up by
replicas starting together, and two replicas converging on the same fitted thresholds (two apps in this
process, and two ``cascade serve`` processes).

``scripts/test`` (and so CI) starts a throw-away server with ``scripts/postgres`` and exports its URL
as CASCADE_TEST_POSTGRES_URL, with CASCADE_TEST_REQUIRE_POSTGRES=1: there these tests fail when the
server is missing. A plain ``pytest`` run without the URL skips them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from app.learning.store import SCHEMA_VERSION, Store, StoreError
from tests.conftest import base_config, chat, proxy
from tests.fake_upstream import FakeUpstream, free_port
from tests.learning.learning_helpers import learning_of, settle, synthetic, with_learning

pytestmark = pytest.mark.anyio

# Read at import: the autouse fixture in conftest clears CASCADE_* variables for every test.
PG_URL = os.environ.get("CASCADE_TEST_POSTGRES_URL")
REQUIRED = os.environ.get("CASCADE_TEST_REQUIRE_POSTGRES") == "1"


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    """A fresh database on the test server, dropped afterwards."""
    if not PG_URL:
        if REQUIRED:
            pytest.fail("CASCADE_TEST_POSTGRES_URL is not set: scripts/postgres did not start PostgreSQL")
        pytest.skip(
            "no PostgreSQL: run scripts/test, or export CASCADE_TEST_POSTGRES_URL=$(scripts/postgres start)"
        )
    import psycopg

    name = f"cascade_t_{uuid.uuid4().hex[:12]}"
    async with await psycopg.AsyncConnection.connect(PG_URL, autocommit=True) as conn:
        await conn.execute(f"CREATE DATABASE {name}")
    base, _, _ = PG_URL.rpartition("/")
    try:
        yield f"{base}/{name}"
    finally:
        async with await psycopg.AsyncConnection.connect(PG_URL, autocommit=True) as conn:
            await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


async def _rows(url: str, sql: str) -> list[tuple[Any, ...]]:
    import psycopg

    async with await psycopg.AsyncConnection.connect(url) as conn:
        cur = await conn.execute(sql)
        return list(await cur.fetchall())


async def test_records_labels_and_feedback_in_postgres(fake: FakeUpstream, pg_url: str) -> None:
    # free text compared exactly; no cap on label spend relative to the (tiny) answers' spend
    cfg = with_learning(base_config(), pg_url, shadow_rate=1.0, compare="exact", shadow_max_share=None)
    cfg["upstreams"]["refuser"] = {**cfg["upstreams"]["small"], "model": "refuse"}
    cfg["cascades"]["esc"] = {
        "stages": [
            {"upstream": "refuser", "threshold": 0.7, "scorers": [{"type": "heuristic"}]},
            {"upstream": "large"},
        ]
    }
    async with proxy(cfg, fake) as (c, app):
        r1 = await c.post("/v1/chat/completions", json=chat())  # accepted at stage 0: shadowed
        r2 = await c.post("/v1/chat/completions", json=chat("esc"))  # escalated: a free label
        await settle(app)
        fb = await c.post("/v1/feedback", json={"id": r1.json()["id"], "score": 0.5})
        assert fb.status_code == 200
        assert (
            await c.post("/v1/feedback", json={"id": "chatcmpl-unknown", "score": 0.5})
        ).status_code == 404
    traces = await _rows(
        pg_url, "SELECT id, cascade, accepted_stage, prompt_text FROM traces ORDER BY cascade"
    )
    assert [(t[1], t[2], t[3]) for t in traces] == [("default", 0, None), ("esc", 1, None)]
    labels = await _rows(pg_url, "SELECT trace_id, stage, source, value FROM labels ORDER BY source")
    assert labels == [
        (r2.json()["id"], 0, "free", 0.0),
        (r1.json()["id"], 0, "shadow", 0.0),  # "42" vs "large says hi"
        (r1.json()["id"], None, "user", 0.5),
    ]
    assert await _rows(pg_url, "SELECT count(*) FROM attempts") == [(3,)]
    # Retention: an old trace goes with its attempts and labels (the same SQL as SQLite's).
    import psycopg

    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        await conn.execute(
            "UPDATE traces SET created = created - 40 * 86400 WHERE id = %s", (r1.json()["id"],)
        )
    store = Store(pg_url)
    await store.open()
    assert await store.prune(time.time() - 30 * 86400) == 1
    await store.close()
    assert await _rows(pg_url, "SELECT id FROM traces") == [(r2.json()["id"],)]
    assert await _rows(pg_url, "SELECT count(*) FROM attempts") == [(2,)]
    assert await _rows(pg_url, "SELECT trace_id FROM labels") == [(r2.json()["id"],)]


async def test_replicas_starting_together_share_one_schema(pg_url: str) -> None:
    stores = [Store(pg_url) for _ in range(4)]
    assert await asyncio.gather(*(s.open() for s in stores)) == [SCHEMA_VERSION] * 4
    for s in stores:
        await s.close()
    assert await _rows(pg_url, "SELECT version FROM schema_version ORDER BY version") == [
        (v,) for v in range(1, SCHEMA_VERSION + 1)
    ]


async def test_two_replicas_converge_on_the_same_thresholds(fake: FakeUpstream, pg_url: str) -> None:
    cfg = with_learning(
        base_config(),
        pg_url,
        auto_tune=True,
        target_quality=0.9,
        tune_every=10,
        min_labels=50,
        max_step=0.05,
        sync_every_s=0.05,
    )
    store = Store(pg_url)
    await store.open()
    traces, labels = synthetic(cfg, 400)
    await store.write(traces, labels)
    await store.close()

    async with proxy(cfg, fake) as (ca, a), proxy(cfg, fake) as (cb, b):
        plans = [x.state.cascade.runtime.plans.get("default") for x in (a, b)]

        async def both(value: float) -> None:
            async with asyncio.timeout(10):
                while any(p.thresholds[0] != pytest.approx(value) for p in plans):  # noqa: ASYNC110
                    await asyncio.sleep(0.01)

        await both(0.65)
        # New labels arrive at replica A only; B adopts A's fit from the store.
        for t in traces[:10]:
            assert (await ca.post("/v1/feedback", json={"id": t.id, "score": 1.0})).status_code == 200
        await both(0.60)
        assert learning_of(a)._meta["default"].fit_version == learning_of(b)._meta["default"].fit_version == 2
        for client in (ca, cb):
            r = await client.post("/v1/chat/completions", json=chat())
            assert r.json()["cascade"]["attempts"][0]["threshold"] == pytest.approx(0.60)
    fits = await _rows(pg_url, "SELECT version, thresholds FROM fits ORDER BY version")
    assert fits == [(1, "[0.65]"), (2, "[0.6]")]


# --- two `cascade serve` processes on one PostgreSQL -------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]
PROMPT_SCORE = "tests.learning.learning_helpers:PromptScore"  # stage score = the prompt's "score=X"


def _spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    """Start ``python -m ARGS`` in its own process group, stderr to ``log``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASCADE_")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env["PYTHONUNBUFFERED"] = "1"
    with log.open("wb") as err:
        return subprocess.Popen(
            [sys.executable, "-m", *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )


def _tail(log: Path) -> str:
    return log.read_text(encoding="utf-8", errors="replace")[-2000:]


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """End a process started by this test (and only that one: its own process group)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


async def _until(what: str, within: float, check: Callable[[], Awaitable[Any]]) -> Any:
    deadline = time.monotonic() + within
    while True:
        with contextlib.suppress(httpx.TransportError):
            got = await check()
            if got:
                return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def _samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {
        tuple(sorted(s.labels.items())): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == name
    }


@pytest.mark.loopback
async def test_two_serve_processes_on_one_postgres_converge_on_the_same_thresholds(
    pg_url: str, tmp_path: Path
) -> None:
    """Two real ``cascade serve`` processes share one PostgreSQL store with ``auto_tune``. Labels reach
    replica A only (free labels from escalated requests, user feedback on early answers); both end on
    the same, newest fitted thresholds, read from each process's ``cascade_threshold`` gauge."""
    up_port, ports = free_port(), (free_port(), free_port())
    up = f"http://127.0.0.1:{up_port}/v1"
    cfg = {
        "server": {"host": "127.0.0.1", "log_level": "warning"},
        "upstreams": {
            "small": {"base_url": up, "model": "ok", "price": {"input": 0.1, "output": 0.2}},
            "large": {"base_url": up, "model": "answer-large_says_hi", "price": {"input": 10, "output": 20}},
        },
        "cascades": {
            "default": {
                "stages": [
                    {
                        "upstream": "small",
                        "threshold": 0.7,
                        "scorers": [{"type": "python", "class": PROMPT_SCORE}],
                    },
                    {"upstream": "large"},
                ]
            }
        },
        "learning": {
            "store": pg_url,
            "compare": "exact",  # "42" next to "large says hi": free text, compared exactly
            "auto_tune": True,
            "target_quality": 0.99,
            "margin_z": 0.0,
            "tune_every": 10,
            "min_labels": 20,
            "max_step": 0.05,
            "sync_every_s": 0.2,
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    logs = [tmp_path / "upstream.log", tmp_path / "a.log", tmp_path / "b.log"]
    serve = [["app.cli", "serve", "--config", str(path), "--port", str(p)] for p in ports]
    procs = [_spawn(["tests.fake_upstream", "--port", str(up_port)], logs[0])]
    try:
        procs += [_spawn(args, log) for args, log in zip(serve, logs[1:], strict=True)]
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        async with httpx.AsyncClient(timeout=10) as c:
            for proc, url, log in zip(procs[1:], urls, logs[1:], strict=True):

                async def ready(proc: Any = proc, url: str = url, log: Path = log) -> bool:
                    if proc.poll() is not None:
                        raise AssertionError(f"cascade serve exited early:\n{_tail(log)}")
                    return (await c.get(url + "/readyz")).status_code == 200

                await _until("both replicas ready", 20, ready)

            async def threshold(url: str) -> float | None:
                text = (await c.get(url + "/metrics")).text
                return _samples(text, "cascade_threshold").get((("cascade", "default"), ("stage", "0")))

            assert [await threshold(u) for u in urls] == [0.7, 0.7]

            # Requests with known stage scores, all through replica A. Below the threshold they escalate
            # and stage 0's answer ("42" vs "large says hi") gets a free label 0; the users say early
            # answers scored under 0.8 were bad. So the labels want a threshold near 0.8.
            labels = 0
            for i in range(90):
                s = round((i * 0.6180339887) % 1.0, 3)
                body = {"model": "default", "messages": [{"role": "user", "content": f"q{i} score={s}"}]}
                r = await c.post(urls[0] + "/v1/chat/completions", json=body)
                assert r.status_code == 200, r.text
                ext = r.json()["cascade"]
                if ext["stage"] == 0:
                    fb = {"id": r.json()["id"], "score": 1.0 if s >= 0.8 else 0.0}
                    assert (await c.post(urls[0] + "/v1/feedback", json=fb)).status_code == 200
                labels += 1  # a free label, or the feedback just sent

            async def all_labels_stored() -> bool:
                return (await _rows(pg_url, "SELECT count(*) FROM labels"))[0][0] == labels

            await _until("every label in the store", 10, all_labels_stored)
            await asyncio.sleep(1.0)  # the replicas' last syncs (every 0.2 s) fit what is left to fit

            async def converged() -> list[tuple[Any, ...]] | None:
                fits = await _rows(pg_url, "SELECT version, thresholds FROM fits ORDER BY version")
                newest = json.loads(fits[-1][1])[0] if fits else None
                seen = [await threshold(u) for u in urls]
                return fits if fits and seen == [newest, newest] else None

            fits = await _until("both replicas on the newest fit", 10, converged)
            version, fitted = fits[-1][0], json.loads(fits[-1][1])[0]
            assert [f[0] for f in fits] == list(range(1, version + 1)), "one sequence of fits"
            assert version >= 2 and 0.75 <= fitted < 0.85, (version, fitted)  # towards ~0.8, in steps
            # B got no request and no label of its own: its thresholds come from the labels in the store.
            text_b = (await c.get(urls[1] + "/metrics")).text
            assert sum(_samples(text_b, "cascade_labels_total").values()) == 0
            assert sum(_samples(text_b, "cascade_requests_total").values()) == 0
            # ...and its requests use them.
            below = round((0.7 + fitted) / 2, 4)
            body = {"model": "default", "messages": [{"role": "user", "content": f"q score={below}"}]}
            for url in urls:
                r = await c.post(url + "/v1/chat/completions", json=body)
                assert r.json()["cascade"]["attempts"][0]["threshold"] == pytest.approx(fitted)
                assert r.json()["cascade"]["stage"] == 1  # accepted under the config's 0.7, not now
        for proc in procs[1:]:
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(proc.wait, 15) == 0
    finally:
        for proc in reversed(procs):
            _stop(proc)


def _sql(store: Store, sql: str) -> Any:
    cur = store.backend.connect().cursor()
    try:
        cur.execute(sql)
        return cur.fetchall()
    finally:
        cur.close()


async def test_a_hung_query_is_cut_by_the_statement_timeout(fake: FakeUpstream, pg_url: str) -> None:
    """One hung query must not block every write and shutdown: statements have a time limit
    (``learning.statement_timeout_s``, 30 s by default)."""
    store = Store(pg_url)
    await store.open()
    try:
        assert await store.run(_sql, store, "SHOW statement_timeout") == [("30s",)]
    finally:
        await store.close()
    cfg = with_learning(base_config(), pg_url, statement_timeout_s=0.2)
    async with proxy(cfg, fake) as (c, app):
        store = learning_of(app).store
        with pytest.raises(StoreError, match="statement timeout"):
            await store.run(_sql, store, "SELECT pg_sleep(30)")
        r = await c.post("/v1/chat/completions", json=chat())  # the store carries on
        await settle(app)
    assert await _rows(pg_url, "SELECT id FROM traces") == [(r.json()["id"],)]


# --- the online replay's stream through two replicas on one PostgreSQL -------------------------------------


async def test_an_online_run_split_between_two_replicas_ends_on_one_fit(pg_url: str, tmp_path: Path) -> None:
    """``cascade replay --online --replicas 2 --store postgresql://...``: two in-process proxies share
    one PostgreSQL store, the stream alternates between them, each stores its own traces and labels and
    syncs its tuner every few requests; they follow one sequence of fits and end on the same, newest
    thresholds."""
    from app.replay.online import OnlineOptions, run_online
    from tests.replay import synth

    data = synth.write(tmp_path / "syn.jsonl", n=300, seed=11)
    opts = OnlineOptions(
        str(data), seed=4, start_threshold=1.0, shadow_rate=0.3, feedback_rate=0.2, replicas=2, store=pg_url
    )
    rep = (await asyncio.to_thread(run_online, opts)).report  # it runs its own event loop
    assert rep["errors"] == 0 and rep["replicas"] == 2
    a, b = rep["thresholds_by_replica"]
    assert a == b and max(a) < 1.0  # learned, and the same on both
    assert {"free", "shadow", "user"} <= set(rep["labels_by_source"])
    fits = await _rows(pg_url, "SELECT version, thresholds FROM fits ORDER BY version")
    assert [f[0] for f in fits] == list(range(1, len(fits) + 1)) and len(fits) >= 3
    assert json.loads(fits[-1][1]) == pytest.approx(a)
    # Both replicas recorded their half of the stream in the one store.
    assert await _rows(pg_url, "SELECT count(*) FROM traces") == [(300,)]
