"""Reliability through the real HTTP path: circuit breaker, concurrency limits, deadline budget, client
disconnects, secrets kept out of logs, bodies and metrics, and config reload (POST /admin/reload)."""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, ClassVar

import httpx
import orjson
import pytest
import yaml
from prometheus_client import CollectorRegistry

from app.config import CircuitConfig, load_config, parse_config
from app.errors import UpstreamProtocolError, UpstreamSaturated, UpstreamStatusError, UpstreamTimeout
from app.logs import JsonFormatter
from app.protocol import estimate_prompt_tokens
from app.upstream.breaker import CLOSED, HALF_OPEN, OPEN, Breaker
from app.upstream.limits import Limiter
from tests.conftest import (
    _WATCH,
    SECRET_PROMPT,
    SECRET_PROXY_KEY,
    SECRET_UPSTREAM_KEY,
    base_config,
    chat,
    check_no_secrets,
    loopback_stack,
    proxy,
    two_stage,
    upstream,
    wait_for,
)
from tests.fake_upstream import CHAOS_FAULTS, FakeUpstream, create_fake_upstream
from tests.schema import check_error

APP_DIR = Path(__file__).resolve().parents[1] / "app"

pytestmark = pytest.mark.anyio

AUTH = {"authorization": f"Bearer {SECRET_PROXY_KEY}"}


def _sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def _secret_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` with the suite's secret upstream key on every upstream and the secret proxy key on."""
    cfg = copy.deepcopy(cfg)
    for up in cfg["upstreams"].values():
        up["api_key"] = SECRET_UPSTREAM_KEY
    cfg["auth"] = {"api_keys": [SECRET_PROXY_KEY]}
    return cfg


def _ask(**extra: Any) -> dict[str, Any]:
    return chat(content=f"Tell me about {SECRET_PROMPT}, please.", **extra)


# --- circuit breaker: the state machine ---------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _breaker(clock: Clock, **cfg: Any) -> tuple[Breaker, list[str]]:
    changes: list[str] = []
    b = Breaker(
        "up",
        CircuitConfig(**{"failures": 3, "window_s": 10, "cooldown_s": 5, **cfg}),
        on_change=lambda _name, state: changes.append(state),
        clock=clock,
    )
    return b, changes


FAIL = UpstreamStatusError("up", 503, "down")


def _call(b: Breaker, ok: bool) -> None:
    t = b.enter()
    assert t is not None
    t.success() if ok else t.failure(FAIL)
    t.close()


def test_breaker_opens_on_enough_failures_making_enough_of_the_window() -> None:
    clock = Clock()
    b, changes = _breaker(clock)  # 3 failures, at least half of the attempts in the last 10 s
    for ok in (False, False, True, True, True, True, False):
        _call(b, ok)
    assert b.state == CLOSED  # 3 failures, but 3 of 7 attempts
    clock.now += 11  # the window moved on: the old attempts no longer count
    _call(b, False)
    _call(b, True)
    _call(b, False)
    assert b.state == CLOSED  # half of them failed, but only 2
    _call(b, False)
    assert b.state == OPEN and changes == [OPEN]
    assert b.enter() is None
    assert "circuit open" in (b.blocked() or "") and b.retry_after() == pytest.approx(5)
    # Answers that are not failures of the upstream never count: 4xx (429 included).
    b2, _ = _breaker(clock, failures=1)
    t = b2.enter()
    assert t is not None
    t.failure(UpstreamStatusError("up", 429, "slow down"))
    t.failure(UpstreamStatusError("up", 400, "bad request"))
    assert b2.state == CLOSED


def test_breaker_half_open_lets_one_probe_through() -> None:
    clock = Clock()
    b, changes = _breaker(clock, failures=1)
    _call(b, False)
    clock.now += 5
    assert b.blocked() is None and b.state == HALF_OPEN
    probe = b.enter()
    assert probe is not None and probe.probe
    assert b.enter() is None and "probe" in (b.blocked() or "")
    probe.close()  # ended without a verdict (client gone): the next caller probes
    probe = b.enter()
    assert probe is not None
    probe.failure(UpstreamTimeout("up", "timed out"))
    assert b.state == OPEN and b.retry_after() == pytest.approx(5)
    clock.now += 5
    probe = b.enter()
    assert probe is not None and probe.probe
    probe.success()
    assert b.state == CLOSED and b.enter() is not None
    assert changes == [OPEN, HALF_OPEN, OPEN, HALF_OPEN, CLOSED]


def test_breaker_ignores_results_of_calls_from_an_earlier_state() -> None:
    clock = Clock()
    b, _ = _breaker(clock, failures=1)
    slow = b.enter()  # starts while closed ...
    _call(b, False)  # ... meanwhile the circuit opens
    clock.now += 5
    probe = b.enter()
    assert probe is not None
    assert slow is not None
    slow.success()  # a late success of an old call does not close the circuit
    assert b.state == HALF_OPEN
    probe.failure(UpstreamProtocolError("up", "bad JSON"))
    assert b.state == OPEN


def test_breaker_can_be_disabled() -> None:
    clock = Clock()
    b, _ = _breaker(clock, failures=1, enabled=False)
    for _ in range(5):
        _call(b, False)
    assert b.blocked() is None and b.state == CLOSED
    assert parse_config(
        {"upstreams": {"a": {"base_url": "http://x/v1", "model": "m", "circuit": False}}}, env={}
    ).upstreams["a"].circuit == CircuitConfig(enabled=False)


async def test_limiter_waits_a_bounded_time_then_reports_saturation() -> None:
    lim = Limiter("up", 2, 0.05)
    await lim.acquire()
    await lim.acquire()
    t0 = time.perf_counter()
    async with asyncio.timeout(10):
        with pytest.raises(UpstreamSaturated, match="saturated: 2 of max_concurrency 2"):
            await lim.acquire()
    assert time.perf_counter() - t0 >= 0.04  # it waited (a busy machine can only make it longer)
    patient = Limiter("up", 1, 30)
    await patient.acquire()
    waiter = asyncio.create_task(patient.acquire())
    await asyncio.sleep(0)  # the waiter runs until it waits for the slot
    patient.release()  # a slot frees up within the wait: the waiter gets it (not after 30 s)
    async with asyncio.timeout(10):
        await waiter
    assert patient.in_flight == 1


# --- circuit breaker and limits through the proxy -------------------------------------------------------


async def test_open_circuit_skips_the_stage_then_a_probe_closes_it(fake: FakeUpstream) -> None:
    cfg = _secret_config(two_stage("flaky-2"))
    cfg["upstreams"]["small"].update(max_retries=0, circuit={"failures": 2, "cooldown_s": 0.2})
    registry = CollectorRegistry()
    async with proxy(cfg, fake, registry=registry) as (c, app):
        for _ in range(2):
            r = await c.post("/v1/chat/completions", json=_ask(), headers=AUTH)
            assert r.status_code == 200 and r.json()["cascade"]["attempts"][0]["outcome"] == "error"
        assert _sample(registry, "cascade_circuit_open", upstream="small") == 1
        assert _sample(registry, "cascade_circuit_opens_total", upstream="small") == 1

        r = await c.post("/v1/chat/completions", json=_ask(), headers=AUTH)
        first = r.json()["cascade"]["attempts"][0]
        assert r.status_code == 200 and r.json()["cascade"]["upstream"] == "large"
        assert (first["outcome"], first["reason"]) == ("error", "upstream_error")
        assert first["detail"].startswith("circuit open")
        assert fake.counts["flaky-2"] == 2  # skipped: not called
        assert (
            _sample(registry, "cascade_upstream_rejected_total", upstream="small", reason="circuit_open") == 1
        )
        assert (
            _sample(
                registry,
                "cascade_escalations_total",
                cascade="default",
                from_upstream="small",
                to_upstream="large",
                reason="upstream_error",
            )
            == 3
        )

        small = app.state.cascade.runtime.upstreams["small"]
        await wait_for(lambda: small.breaker.retry_after() == 0, "cool-down over")
        # The next call probes, succeeds, closes the circuit.
        r = await c.post("/v1/chat/completions", json=_ask(), headers=AUTH)
        assert r.json()["cascade"]["upstream"] == "small"
        assert _sample(registry, "cascade_circuit_open", upstream="small") == 0
        text = (await c.get("/metrics")).text
    assert 'cascade_circuit_open{upstream="small"} 0.0' in text
    check_no_secrets(text, "/metrics")
    assert SECRET_PROMPT not in text and SECRET_UPSTREAM_KEY not in text


@pytest.mark.parametrize("stream", [False, True])
async def test_every_circuit_open_is_a_clear_503(fake: FakeUpstream, stream: bool) -> None:
    cfg = two_stage("error-500", "error-502")
    for up in cfg["upstreams"].values():
        up.update(max_retries=0, circuit={"failures": 1, "cooldown_s": 30})
    async with proxy(cfg, fake) as (c, _):
        r = await c.post("/v1/chat/completions", json=chat(stream=stream))
        assert r.status_code == 502
        calls = len(fake.requests)
        r = await c.post("/v1/chat/completions", json=chat(stream=stream))
    assert r.status_code == 503
    check_error(r.json())
    err = r.json()["error"]
    assert err["code"] == "circuit_open" and "circuit open" in err["message"]
    assert "stage 0 (small)" in err["message"] and "stage 1 (large)" in err["message"]
    assert 29 <= int(r.headers["retry-after"]) <= 30
    assert len(fake.requests) == calls  # nothing was sent upstream


async def test_saturated_first_stage_escalates_and_all_saturated_is_429(fake: FakeUpstream) -> None:
    cfg = two_stage("slow-400", "slow-400+answer-large_says_hi")
    for up in cfg["upstreams"].values():
        up.update(max_concurrency=1, queue_timeout_s=0.05)
    registry = CollectorRegistry()
    async with proxy(cfg, fake, registry=registry) as (c, _):
        rs = await asyncio.gather(*(c.post("/v1/chat/completions", json=chat()) for _ in range(3)))
    by_status = sorted(rs, key=lambda r: r.status_code)
    assert [r.status_code for r in by_status] == [200, 200, 429]
    answered = sorted(r.json()["cascade"]["stage"] for r in by_status[:2])
    assert answered == [0, 1]
    escalated = next(r.json() for r in by_status[:2] if r.json()["cascade"]["stage"] == 1)
    assert escalated["cascade"]["attempts"][0]["detail"].startswith("saturated")
    limited = by_status[2]
    check_error(limited.json())
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"
    assert "concurrency limit" in limited.json()["error"]["message"]
    assert int(limited.headers["retry-after"]) >= 1
    assert _sample(registry, "cascade_upstream_rejected_total", upstream="small", reason="saturated") == 2
    assert fake.counts["slow-400"] == 1  # saturation never reached the upstream


@pytest.mark.parametrize("ending", ["deadline", "client_gone"])
async def test_a_probe_that_ends_while_waiting_for_a_slot_frees_the_half_open_circuit(
    fake: FakeUpstream, ending: str
) -> None:
    """The half-open probe is admitted by the breaker, then waits for a concurrency slot. Whatever ends
    that wait (the cascade deadline, the client leaving) must give the probe back, or the upstream stays
    skipped ("a probe call is in flight") until a restart."""
    cfg = two_stage("flaky-1")
    cfg["cascades"]["default"]["deadline_s"] = 1.5
    cfg["upstreams"]["small"].update(
        max_retries=0, circuit={"failures": 1, "cooldown_s": 0.05}, max_concurrency=1, queue_timeout_s=60
    )
    async with proxy(cfg, fake) as (c, app):
        small = app.state.cascade.runtime.upstreams["small"]
        r = await c.post("/v1/chat/completions", json=chat())
        assert r.json()["cascade"]["upstream"] == "large" and small.breaker.state == OPEN
        await wait_for(lambda: small.breaker.retry_after() == 0, "cool-down over")
        await small.limiter.acquire()  # a call in flight holds the only slot
        waiting = asyncio.create_task(c.post("/v1/chat/completions", json=chat()))
        await wait_for(lambda: small.breaker.blocked() is not None, "the probe is admitted")
        assert small.limiter.in_flight == 1  # ... and waits for the slot
        if ending == "deadline":
            r = await waiting
            assert r.status_code == 504
        else:
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
        small.limiter.release()
        assert small.breaker.blocked() is None  # the next call may probe
        r = await c.post("/v1/chat/completions", json=chat())
        assert r.status_code == 200 and r.json()["cascade"]["upstream"] == "small"
        assert small.breaker.state == CLOSED and small.limiter.in_flight == 0


@pytest.mark.parametrize("stream", [False, True])
async def test_a_stage_that_cannot_fit_the_deadline_is_not_started(fake: FakeUpstream, stream: bool) -> None:
    cfg = two_stage("refuse")
    cfg["cascades"]["default"]["deadline_s"] = 30
    cfg["upstreams"]["large"]["min_budget_s"] = 60  # never fits: started, it would answer at once
    async with proxy(cfg, fake) as (c, _):
        r = await c.post("/v1/chat/completions", json=chat(stream=stream))
    assert r.status_code == 504
    check_error(r.json())
    msg = r.json()["error"]["message"]
    assert "cannot fit stage 1" in msg
    assert "stage 0 (small): low_score" in msg and "stage 1 (large): timeout (not started" in msg
    assert "answer-large_says_hi" not in fake.counts


# --- client disconnects (loopback: what in-process ASGI hides) -------------------------------------------


@asynccontextmanager
async def loopback(cfg: dict[str, Any]) -> AsyncIterator[tuple[str, FakeUpstream, CollectorRegistry]]:
    async with loopback_stack(cfg) as (url, fake, registry):
        yield url + "/chat/completions", fake, registry


@pytest.mark.loopback
@pytest.mark.parametrize("stream", [False, True])
async def test_disconnect_while_a_scored_stage_is_buffered_cancels_it(stream: bool) -> None:
    # Not cancelled, the upstream call would sit there for a minute, far past the wait's bound.
    async with loopback(_secret_config(two_stage("slow-60000"))) as (url, fake, registry):
        async with httpx.AsyncClient(timeout=0.3) as client:
            with pytest.raises(httpx.ReadTimeout):
                await client.post(url, json=_ask(stream=stream), headers=AUTH)
        await wait_for(lambda: fake.cancelled_waits == 1, "the upstream call is cancelled")
        # The client left: the request and its call in flight are cancelled, not errors (the error-ratio
        # alerts fired on a healthy upstream whenever users pressed "stop generating").
        cancelled = {"cascade": "default", "outcome": "cancelled"}
        await wait_for(lambda: _sample(registry, "cascade_requests_total", **cancelled) == 1, "recorded")
        assert _sample(registry, "cascade_requests_total", cascade="default", outcome="error") == 0
        assert _sample(registry, "cascade_in_flight_requests") == 0
        attempts = {"cascade": "default", "stage": "0", "upstream": "small"}
        assert _sample(registry, "cascade_attempts_total", **attempts, outcome="cancelled") == 1
        assert _sample(registry, "cascade_attempts_total", **attempts, outcome="error") == 0
        # The upstream had the prompt when the client left: it is charged (estimated), nothing more.
        prompt = _sample(registry, "cascade_tokens_total", upstream="small", kind="prompt")
        assert prompt == estimate_prompt_tokens(_ask()) > 0
        assert _sample(registry, "cascade_tokens_total", upstream="small", kind="completion") == 0
        cost = _sample(
            registry, "cascade_cost_usd_total", cascade="default", upstream="small", purpose="answer"
        )
        assert cost == pytest.approx(prompt * 0.1 / 1e6)  # small: 0.1 USD per 1M input tokens


@pytest.mark.loopback
async def test_disconnect_mid_stream_cancels_it_and_charges_what_was_generated() -> None:
    # 2000 words 40 ms apart: an upstream stream left running would take 80 s to finish.
    async with loopback(_secret_config(two_stage("refuse", "chunkdelay-40+words-2000"))) as (
        url,
        fake,
        registry,
    ):
        got = 0
        async with (
            httpx.AsyncClient(timeout=10) as client,
            client.stream("POST", url, json=_ask(stream=True), headers=AUTH) as r,
        ):
            async for line in r.aiter_lines():
                got += line.startswith('data: {"')
                if got >= 6:
                    break
        await wait_for(lambda: fake.cancelled_streams == 1, "the upstream stream is closed")
        assert fake.active_streams == 0
        cancelled = {"cascade": "default", "outcome": "cancelled"}
        await wait_for(lambda: _sample(registry, "cascade_requests_total", **cancelled) == 1, "recorded")
        assert (
            _sample(
                registry,
                "cascade_attempts_total",
                cascade="default",
                stage="1",
                upstream="large",
                outcome="cancelled",
            )
            == 1
        )
        # Both stages were charged: the rejected refusal and the part of the stream generated so far.
        assert (
            _sample(registry, "cascade_cost_usd_total", cascade="default", upstream="small", purpose="answer")
            > 0
        )
        large = _sample(
            registry, "cascade_cost_usd_total", cascade="default", upstream="large", purpose="answer"
        )
        assert large > 0
        completion = _sample(registry, "cascade_tokens_total", upstream="large", kind="completion")
        assert 4 <= completion < 2000  # some of the words, not all of them
        assert _sample(registry, "cascade_in_flight_requests") == 0


# --- secrets: never in a log line, an error body or a metric --------------------------------------------


def test_the_secret_watch_sees_every_app_log_record() -> None:
    before = _WATCH.records
    logging.getLogger("cascade.engine").debug("watch self-test")
    assert _WATCH.records == before + 1
    n = len(_WATCH.leaks)
    check_no_secrets(f"x {SECRET_PROXY_KEY} y", "self-test")
    assert len(_WATCH.leaks) == n + 1
    del _WATCH.leaks[n:]


async def test_request_log_line_is_json_without_prompt_or_answer(
    fake: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="cascade.request")
    cfg = _secret_config(two_stage("echo+refuse", "echo"))
    async with proxy(cfg, fake) as (c, _):
        r = await c.post("/v1/chat/completions", json=_ask(), headers=AUTH)
        assert r.status_code == 200 and SECRET_PROMPT in r.text  # the answer echoes the prompt
        r = await c.post("/v1/chat/completions", json=_ask(stream=True), headers=AUTH)
        assert SECRET_PROMPT in r.text
    lines = [JsonFormatter().format(rec) for rec in caplog.records if rec.name == "cascade.request"]
    assert len(lines) == 2
    for line in lines:
        assert SECRET_PROMPT not in line and SECRET_UPSTREAM_KEY not in line and SECRET_PROXY_KEY not in line
        entry = orjson.loads(line)
        assert entry["msg"] == "request" and entry["outcome"] == "success"
        assert {"request_id", "cascade", "stage", "upstream", "escalations", "cost_usd", "latency_ms"} <= set(
            entry
        )
        assert not {"messages", "content", "prompt", "answer"} & set(entry)


async def test_keys_and_prompts_stay_out_of_error_bodies(fake: FakeUpstream) -> None:
    cfg = _secret_config(two_stage("error-401+leak", "error-500+leak"))
    async with proxy(cfg, fake) as (c, _):
        failed = await c.post("/v1/chat/completions", json=_ask(), headers=AUTH)
        wrong = await c.post(
            "/v1/chat/completions", json=_ask(), headers={"authorization": f"Bearer {SECRET_PROXY_KEY}x"}
        )
        streamed = await c.post("/v1/chat/completions", json=_ask(stream=True), headers=AUTH)
        metrics = (await c.get("/metrics")).text
    # The fake echoed the upstream key in its error messages: it reached the proxy ...
    assert SECRET_UPSTREAM_KEY in fake.requests[0]["headers"]["authorization"]
    # ... and none of it the client.
    assert failed.status_code == 502 and "[redacted]" in failed.text
    assert wrong.status_code == 401
    for text in (failed.text, wrong.text, streamed.text, metrics):
        for secret in (SECRET_UPSTREAM_KEY, SECRET_PROXY_KEY, SECRET_PROMPT):
            assert secret not in text


@pytest.mark.parametrize(
    ("auth", "secret"),
    [
        # a gateway token set in `headers:` (not api_key): it was passed on in full
        ({"headers": {"Authorization": "Bearer 0123456789abcdef0123456789abcdefHDRSECRET"}}, "HDRSECRET"),
        # a long key (a JWT): the message was cut at 300 characters before redaction, and the cut key
        # no longer matched, so its first 250 characters went out
        ({"api_key": "eyJ" + "a" * 290 + "JWTSECRETTAIL" + "b" * 150}, "a" * 40),
    ],
)
async def test_keys_set_in_headers_or_long_keys_stay_out_of_error_bodies(
    fake: FakeUpstream, auth: dict[str, Any], secret: str
) -> None:
    cfg = two_stage("error-400+leak")
    cfg["upstreams"]["small"].update(auth)
    async with proxy(cfg, fake) as (c, _):
        r = await c.post("/v1/chat/completions", json=chat("small"))
    assert r.status_code == 400 and "you sent" in r.text, r.text
    assert secret not in r.text and "[redacted]" in r.text


async def test_a_failed_upstream_call_leaves_no_reference_cycle_holding_its_frames(
    fake: FakeUpstream,
) -> None:
    """The engine kept the failed call's exception in a local of a frame its traceback ran through: a
    cycle holding every frame of the call (request body, serialised payload, reply) until a full garbage
    collection, which the tuned collector rarely runs (100 failed 1 MB requests held 320 MB of RSS)."""
    import gc

    app_dir = str(APP_DIR)
    async with proxy(two_stage("error-400+leak", "error-500"), fake) as (c, _):
        await c.post("/v1/chat/completions", json=chat("small"))  # imports, caches: before the count
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for model, stream in (("small", False), ("small", True), ("default", False), ("default", True)):
                r = await c.post("/v1/chat/completions", json=chat(model, stream=stream))
                assert r.status_code in (400, 502)
            gc.collect()
            ours = sorted(
                o.f_code.co_name
                for o in gc.garbage
                if type(o).__name__ == "frame" and o.f_code.co_filename.startswith(app_dir)
            )
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
    assert ours == []


# --- the fake's fault injection used by bench/soak.py ----------------------------------------------------


async def test_chaos_directive_is_seeded_and_mixes_every_fault() -> None:
    async def run(seed: int) -> tuple[dict[str, int], list[int]]:
        fake = create_fake_upstream(seed)
        statuses = []
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=fake), base_url="http://f") as c:
            for _ in range(300):
                body = {"model": "chaos-50+slow-0", "messages": [{"role": "user", "content": "x"}]}
                try:
                    with pytest.MonkeyPatch.context() as mp:
                        mp.setattr("tests.fake_upstream.STALL_S", 0.0)
                        r = await c.post("/v1/chat/completions", json=body)
                    statuses.append(r.status_code)
                except httpx.RemoteProtocolError:
                    statuses.append(-1)  # drop
        return fake.chaos_faults, statuses

    faults, statuses = await run(7)
    assert set(faults) == set(CHAOS_FAULTS)
    assert 110 < sum(faults.values()) < 190  # ~50% of 300
    assert statuses.count(500) == faults["500"] and statuses.count(429) == faults["429"]
    assert await run(7) == (faults, statuses)  # same seed, same faults


# --- config reload: POST /admin/reload ---------------------------------------------------------------------


def _write(path: Path, cfg: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")


async def test_admin_reload_is_disabled_without_keys(fake: FakeUpstream) -> None:
    async with proxy(base_config(), fake) as (c, _):
        r = await c.post("/admin/reload")
    assert r.status_code == 403 and r.json()["error"]["code"] == "admin_disabled"
    check_error(r.json())


async def test_a_reload_drops_the_threshold_series_of_what_it_removed(
    fake: FakeUpstream, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``cascade_threshold`` of a cascade (or stage) a reload removed stayed in /metrics, at its old
    value, until the process restarted: a dashboard kept showing a cascade that no longer existed. (And
    a changed ``read_timeout_s`` is logged as taking effect on restart only, as the port is.)"""
    caplog.set_level(logging.WARNING, logger="cascade.reload")
    old = _secret_config(base_config())
    old["upstreams"]["medium"] = upstream("ok")
    old["cascades"]["spare"] = copy.deepcopy(old["cascades"]["default"])
    old["cascades"]["default"]["stages"].insert(
        1, {"upstream": "medium", "threshold": 0.8, "scorers": [{"type": "heuristic"}]}
    )
    new = copy.deepcopy(old)
    del new["cascades"]["spare"]
    new["cascades"]["default"]["stages"].pop(1)
    new["cascades"]["default"]["stages"][0]["threshold"] = 0.6
    new["server"]["read_timeout_s"] = 5
    path = tmp_path / "config.yaml"
    _write(path, new)
    registry = CollectorRegistry()
    async with proxy(old, fake, registry=registry) as (c, app):
        app.state.cascade.loader = lambda: load_config(path, env={})
        series = {(s.labels["cascade"], s.labels["stage"]): s.value for s in _thresholds(registry)}
        assert series == {("default", "0"): 0.7, ("default", "1"): 0.8, ("spare", "0"): 0.7}
        assert (await c.post("/admin/reload", headers=AUTH)).status_code == 200
        series = {(s.labels["cascade"], s.labels["stage"]): s.value for s in _thresholds(registry)}
        assert series == {("default", "0"): 0.6}
        assert 'cascade="spare"' not in (await c.get("/metrics")).text
    restart = [r for r in caplog.records if "take effect on restart only" in r.msg]
    assert [r.settings for r in restart] == [["server.read_timeout_s"]]  # type: ignore[attr-defined]


def _thresholds(registry: CollectorRegistry) -> list[Any]:
    return [s for m in registry.collect() if m.name == "cascade_threshold" for s in m.samples]


async def test_admin_reload_swaps_the_config_and_in_flight_requests_keep_theirs(
    fake: FakeUpstream, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="cascade.reload")
    old = _secret_config(base_config())
    old["upstreams"]["large"]["model"] = "gated+answer-old_config"  # answers when the test opens the gate
    path = tmp_path / "config.yaml"
    _write(path, old)
    new = copy.deepcopy(old)
    new["upstreams"]["large"]["model"] = "answer-new_config"
    new["upstreams"]["extra"] = upstream("answer-from_extra", api_key=SECRET_UPSTREAM_KEY)
    new["auth"]["api_keys"] = [SECRET_PROXY_KEY + "-rotated"]
    rotated = {"authorization": f"Bearer {SECRET_PROXY_KEY}-rotated"}
    async with proxy(old, fake) as (c, app):
        app.state.cascade.loader = lambda: load_config(path, env={})
        assert (await c.post("/admin/reload")).status_code == 401

        in_flight = asyncio.create_task(
            c.post("/v1/chat/completions", json=_ask(model="large"), headers=AUTH)
        )
        await wait_for(lambda: fake.counts.get("gated+answer-old_config"), "the request reached the upstream")
        _write(path, new)
        r = await c.post("/admin/reload", headers=AUTH)
        assert r.status_code == 200, r.text
        assert r.json()["upstreams"] == ["extra", "large", "small"] and r.json()["reloads"] == 1
        assert not in_flight.done()  # it is still waiting on the old config's upstream
        fake.gate.set()
        done = await in_flight
        assert done.json()["choices"][0]["message"]["content"] == "old config"

        assert (
            await c.post("/v1/chat/completions", json=_ask(model="large"), headers=AUTH)
        ).status_code == 401
        r = await c.post("/v1/chat/completions", json=_ask(model="large"), headers=rotated)
        assert r.json()["choices"][0]["message"]["content"] == "new config"
        r = await c.post("/v1/chat/completions", json=_ask(model="extra"), headers=rotated)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "from extra"

        # A bad config is rejected, logged, and the running one kept.
        broken = copy.deepcopy(new)
        broken["cascades"]["default"]["stages"][1]["upstream"] = "medum"
        _write(path, broken)
        r = await c.post("/admin/reload", headers=rotated)
        assert r.status_code == 422
        check_error(r.json())
        assert "cascades.default.stages[1].upstream: unknown upstream 'medum'" in r.json()["error"]["message"]
        path.write_text("upstreams: [unclosed", encoding="utf-8")
        assert (await c.post("/admin/reload", headers=rotated)).status_code == 422
        r = await c.post("/v1/chat/completions", json=_ask(), headers=rotated)
        assert r.status_code == 200 and app.state.cascade.reloads == 1
    rejected = [rec for rec in caplog.records if rec.msg.startswith("config reload rejected")]
    assert len(rejected) == 2
    assert "unknown upstream 'medum'" in rejected[0].problems[0]  # type: ignore[attr-defined]


async def test_a_reload_that_fails_unforeseen_is_refused_without_its_text(
    fake: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    """Anything but a config problem while loading (a scorer module raising on import, a file the process
    may not read) refuses the reload as a bad config does, naming only the exception's type: its text
    may quote the file, secrets included. The running config stays."""
    caplog.set_level(logging.ERROR, logger="cascade.reload")

    def loader() -> Any:
        raise RuntimeError(f"could not parse line 3: api_key: {SECRET_UPSTREAM_KEY}")

    async with proxy(_secret_config(base_config()), fake) as (c, app):
        app.state.cascade.loader = loader
        r = await c.post("/admin/reload", headers=AUTH)
        assert r.status_code == 422, r.text
        check_error(r.json())
        assert "reload: the config could not be loaded (RuntimeError)" in r.json()["error"]["message"]
        assert SECRET_UPSTREAM_KEY not in r.text
        ok = await c.post("/v1/chat/completions", json=_ask(), headers=AUTH)
        assert ok.status_code == 200 and app.state.cascade.reloads == 0
    logged = [rec for rec in caplog.records if rec.msg.startswith("config reload rejected")]
    assert len(logged) == 1 and SECRET_UPSTREAM_KEY not in str(logged[0].__dict__)


class ThreadProbe:
    """A ``python`` scorer that notes the thread it is built on (a reload imports and builds scorers)."""

    built_on: ClassVar[list[int]] = []

    def __init__(self) -> None:
        ThreadProbe.built_on.append(threading.get_ident())

    async def score(self, request: dict[str, Any], answer: dict[str, Any]) -> float:
        return 1.0


async def test_reload_reads_and_builds_the_config_off_the_event_loop(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    """Reading YAML, importing scorers and loading model files block: a reload does them in a thread and
    only swaps the finished runtime in on the loop."""
    cfg = _secret_config(
        two_stage("ok", scorers=[{"type": "python", "class": "tests.test_reliability:ThreadProbe"}])
    )
    path = tmp_path / "config.yaml"
    _write(path, cfg)
    loaded_on: list[int] = []

    def loader() -> Any:
        loaded_on.append(threading.get_ident())
        return load_config(path, env={})

    async with proxy(cfg, fake) as (c, app):
        app.state.cascade.loader = loader
        before = app.state.cascade.runtime
        ThreadProbe.built_on.clear()
        assert (await c.post("/admin/reload", headers=AUTH)).status_code == 200
        assert app.state.cascade.runtime is not before
        r = await c.post("/v1/chat/completions", json=_ask(), headers=AUTH)
    assert r.status_code == 200 and r.json()["cascade"]["attempts"][0]["scores"] == {"python": 1.0}
    on_loop = threading.get_ident()
    assert loaded_on and ThreadProbe.built_on
    assert on_loop not in loaded_on and on_loop not in ThreadProbe.built_on


async def test_reload_keeps_an_open_circuit_when_its_settings_did_not_change(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    cfg = _secret_config(two_stage("error-500"))
    cfg["upstreams"]["small"].update(max_retries=0, circuit={"failures": 1, "cooldown_s": 30})
    path = tmp_path / "config.yaml"
    _write(path, cfg)
    async with proxy(cfg, fake) as (c, app):
        app.state.cascade.loader = lambda: load_config(path, env={})
        await c.post("/v1/chat/completions", json=_ask(), headers=AUTH)
        assert (await c.post("/admin/reload", headers=AUTH)).status_code == 200
        r = await c.post("/v1/chat/completions", json=_ask(), headers=AUTH)
        assert r.json()["cascade"]["attempts"][0]["detail"].startswith("circuit open")
        cfg["upstreams"]["small"]["circuit"]["cooldown_s"] = 20  # changed settings: a fresh breaker
        _write(path, cfg)
        assert (await c.post("/admin/reload", headers=AUTH)).status_code == 200
        assert app.state.cascade.runtime.upstreams["small"].breaker.state == CLOSED


async def test_upstream_errors_that_quote_the_prompt_are_withheld(fake: FakeUpstream) -> None:
    # vLLM-style validation errors echo the offending input; the proxy must not pass the prompt on,
    # in a 502/400 body, a mid-stream error event or the logs (the session-wide watcher checks those).
    async with proxy(two_stage("error-500+quote", "error-503+quote"), fake) as (c, _):
        failed = await c.post("/v1/chat/completions", json=_ask())
        streamed = await c.post("/v1/chat/completions", json=_ask(stream=True))
    async with proxy(two_stage("error-400+quote", "error-400+quote"), fake) as (c, _):
        invalid = await c.post("/v1/chat/completions", json=_ask())
    async with proxy(two_stage("error-500", "error-500"), fake) as (c, _):
        plain = await c.post("/v1/chat/completions", json=_ask())
    assert SECRET_PROMPT in fake.requests[0]["body"]["messages"][-1]["content"]
    assert failed.status_code == 502 and invalid.status_code == 400
    assert streamed.status_code == 502  # every stage failed before the first byte
    for r in (failed, streamed, invalid):
        assert SECRET_PROMPT not in r.text and "please" not in r.text
        msg = r.json()["error"]["message"]
        assert "stage 0" in msg and "stage 1" in msg
        assert "[upstream message withheld: it quotes the request]" in msg
    assert "HTTP 500" in failed.json()["error"]["message"]
    assert "HTTP 400" in invalid.json()["error"]["message"]
    # An upstream message that quotes nothing is still shown, as before.
    assert plain.status_code == 502 and "fake upstream error 500" in plain.json()["error"]["message"]


async def test_json_nested_past_what_orjson_writes_is_a_400_or_a_502_not_a_500_or_an_empty_200(
    fake: FakeUpstream,
) -> None:
    """orjson reads 1,024 levels of nesting and writes 254: a request nested deeper was a 500 (its body
    could not be sent upstream), and an upstream reply nested deeper a 200 with an empty body."""
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    deep: Any = "x"
    for _ in range(300):
        deep = [deep]

    async def completions(request: Any) -> Response:
        body = {
            "id": "c1", "object": "chat.completion", "created": 1, "model": "deep",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "hi", "extra": deep}}],
        }  # fmt: skip
        return Response(json.dumps(body), media_type="application/json")

    deep_app = Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"])])
    cfg = base_config()
    cfg["upstreams"]["deep"] = {"base_url": "http://deep.local/v1", "model": "deep"}
    async with proxy(cfg, fake, apps={"deep.local": deep_app}) as (c, _):
        r = await c.post("/v1/chat/completions", json=chat("small", extra=deep))
        assert r.status_code == 400 and "cannot be sent on" in r.json()["error"]["message"], r.text
        r = await c.post("/v1/chat/completions", json=chat("deep"))
        assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_protocol_error", r.text
        # A stage header with a digit that is not ASCII ("²") was a 500 from int().
        r = await c.post("/v1/chat/completions", json=chat(), headers={"x-cascade-min-stage": b"\xb2"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "x-cascade-min-stage", r.text
