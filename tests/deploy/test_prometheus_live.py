"""A real Prometheus scrapes a running cascade: the series, the alert rules and the Grafana queries.

Prometheus (scripts/install-tools: Debian's package, unpacked) runs on 127.0.0.1 with the repository's
deploy/prometheus/prometheus.yml and alerts.yml, rewritten in a temp copy only where a test must:
the scrape target is the proxy under test, scrape and rule intervals are 1 s, and the rules' time
scales are compressed 60x (a `[10m]` window becomes `[10s]`, `[1d]` becomes `[1440s]`; every `for:`
becomes 2 s) so a spike shows within seconds. The expressions and thresholds stay as shipped.

Traffic runs in two phases through the real HTTP path (fake upstream and proxy under uvicorn):
1. normal: answers accepted at stage 0, a few escalations, streams: every alert stays quiet;
2. induced: escalations on `default` (JSON asked for, the cheap stage answers prose), a cascade
   whose first upstream answers HTTP 500 (errors, then fallbacks), requests straight to that
   upstream (request errors), and a cascade whose first stage always refuses (it pays two stages:
   negative savings). Exactly the alerts for those conditions fire, with the right labels.
Then every Grafana panel's query returns data. Waits are bounded; nothing is timed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import base_config, loopback_stack, upstream
from tests.deploy._tools import DEPLOY, tool
from tests.deploy.contract import load_metrics
from tests.fake_upstream import free_port

pytestmark = [pytest.mark.anyio, pytest.mark.loopback, pytest.mark.slow]

PROM = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "cascade.json"
COMPRESS = 60  # rule time scales: 1 h of production behaviour in 1 min
FOR = "2s"

EXPECTED = {
    ("CascadeEscalationRateSpike", "cascade", "default"),
    ("CascadeUpstreamErrorRatioHigh", "upstream", "broken"),
    ("CascadeUpstreamErrorRatioCritical", "upstream", "broken"),
    ("CascadeRequestErrorRatioHigh", "cascade", "broken"),
    ("CascadeNegativeSavings", "cascade", "wasteful"),
}


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def _compress(expr: str) -> str:
    """`[10m]` -> `[10s]`: every range selector (and subquery range) COMPRESS times shorter."""

    def short(m: re.Match[str]) -> str:
        seconds = int(m.group(1)) * _UNITS[m.group(2)]
        return f"[{max(1, seconds // COMPRESS)}s"

    return re.sub(r"\[(\d+)([smhdw])(?=[]:])", short, expr)


def _config(tmp: Path, target: str, prom_port: int) -> Path:
    cfg = yaml.safe_load((PROM / "prometheus.yml").read_text())
    cfg["global"].update({"scrape_interval": "1s", "evaluation_interval": "1s"})
    for job in cfg["scrape_configs"]:
        for sc in job["static_configs"]:
            if job["job_name"] == "cascade":
                sc["targets"] = [target]
            elif job["job_name"] == "prometheus":
                sc["targets"] = [f"127.0.0.1:{prom_port}"]
            else:  # the local-models profile's proxy: not running here, down and harmless
                sc["targets"] = [f"127.0.0.1:{free_port()}"]
    rules = yaml.safe_load((PROM / "alerts.yml").read_text())
    for group in rules["groups"]:
        group["interval"] = "1s"
        for rule in group["rules"]:
            rule["expr"] = _compress(rule["expr"])
            if "for" in rule:
                rule["for"] = FOR
    assert cfg["rule_files"] == ["alerts.yml"]
    (tmp / "alerts.yml").write_text(yaml.safe_dump(rules, sort_keys=False))
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    check = subprocess.run(
        [tool("promtool"), "check", "config", str(path)], capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr
    return path


@contextlib.contextmanager
def _prometheus(config: Path, port: int) -> Iterator[str]:
    # The TSDB in memory where there is a tmpfs: opening it on disk fsyncs, and behind the writes of the
    # tests before (a whole suite run) it once sat at "Starting TSDB ..." for over 150 s.
    shm = Path("/dev/shm")
    where = shm if shm.is_dir() and os.access(shm, os.W_OK) else config.parent
    data = Path(tempfile.mkdtemp(prefix="cascade-prom-data-", dir=where))
    log = (config.parent / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            tool("prometheus"),
            f"--config.file={config}",
            f"--storage.tsdb.path={data}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--storage.tsdb.retention.time=1h",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
        log.close()
        shutil.rmtree(data, ignore_errors=True)


def _log_tail(tmp: Path) -> str:
    return (tmp / "prometheus.log").read_text(errors="replace")[-3000:]


def _cfg() -> dict[str, Any]:
    cfg = base_config()
    cfg["server"]["log_level"] = "error"
    cfg["upstreams"] = {
        "small": upstream("logprobs", price={"input": 0.01, "output": 0.02}),
        "large": upstream("answer-large_says_hi+logprobs", price={"input": 10.0, "output": 20.0}),
        "refuser": upstream("refuse", price={"input": 1.0, "output": 2.0}),
        "broken": upstream("error-500", price={"input": 1.0, "output": 2.0}, max_retries=0, circuit=False),
    }
    heuristic = [{"type": "heuristic"}]
    cfg["cascades"] = {
        "default": {
            "stages": [{"upstream": "small", "threshold": 0.7, "scorers": heuristic}, {"upstream": "large"}]
        },
        "flaky": {
            "stages": [{"upstream": "broken", "threshold": 0.7, "scorers": heuristic}, {"upstream": "large"}]
        },
        "wasteful": {
            "stages": [{"upstream": "refuser", "threshold": 0.7, "scorers": heuristic}, {"upstream": "large"}]
        },
    }
    return cfg


def _body(model: str, *, json_mode: bool = False, stream: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "What is 6*7?"}]}
    if json_mode:  # the cheap stage answers prose: the heuristic rejects it, the request escalates
        body["response_format"] = {"type": "json_object"}
        body["messages"][0]["content"] = "What is 6*7? Answer in JSON."
    if stream:
        body["stream"] = True
    return body


async def _send(client: httpx.AsyncClient, body: dict[str, Any], want: int = 200) -> None:
    r = await client.post("/chat/completions", json=body)
    assert r.status_code == want, r.text[:500]
    if body.get("stream") and want == 200:
        assert "data: [DONE]" in r.text


async def _query(prom: httpx.AsyncClient, expr: str, **params: Any) -> list[dict[str, Any]]:
    path = "/api/v1/query_range" if "start" in params else "/api/v1/query"
    r = await prom.get(path, params={"query": expr, **params})
    assert r.status_code == 200, f"{expr}: {r.text[:500]}"
    out: list[dict[str, Any]] = r.json()["data"]["result"]
    return out


async def _alerts(prom: httpx.AsyncClient) -> list[dict[str, Any]]:
    r = await prom.get("/api/v1/alerts")
    assert r.status_code == 200, r.text
    out: list[dict[str, Any]] = r.json()["data"]["alerts"]
    return out


def _key(alert: dict[str, Any]) -> tuple[str, str, str]:
    labels = alert["labels"]
    by = "upstream" if "upstream" in labels else "cascade"
    return labels["alertname"], by, labels.get(by, "")


async def _until(what: str, probe: Any, within: float = 90.0) -> Any:
    """Poll `await probe()` until it returns something true; a generous bound that measures nothing."""
    end = time.monotonic() + within
    last: Any = None
    while time.monotonic() < end:
        last = await probe()
        if last:
            return last
        await asyncio.sleep(0.25)
    raise AssertionError(f"not within {within:g}s: {what} (last: {last!r})")


async def _rules_evaluated_after(prom: httpx.AsyncClient, t: float, times: int = 2) -> None:
    """Wait until every rule group has been evaluated `times` intervals after wall-clock `t`."""

    async def done() -> bool:
        groups = (await prom.get("/api/v1/rules")).json()["data"]["groups"]
        stamps = [g.get("lastEvaluation", "") for g in groups]
        if not stamps or any(s.startswith("0001") or not s for s in stamps):
            return False
        evaluated = [_rfc3339(s) for s in stamps]
        return min(evaluated) > t + times - 1

    await _until("rule evaluations after the traffic", done, within=60)


def _rfc3339(s: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(re.sub(r"(\.\d{6})\d*", r"\1", s.replace("Z", "+00:00"))).timestamp()


def _panel_queries() -> list[tuple[str, str]]:
    doc = json.loads(DASHBOARD.read_text())

    def walk(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for p in panels:
            yield p
            yield from walk(p.get("panels") or [])

    return [
        (f"{p.get('title')} [{t.get('refId')}]", t["expr"])
        for p in walk(doc["panels"])
        for t in p.get("targets") or []
        if t.get("expr")
    ]


@contextlib.asynccontextmanager
async def _stack() -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient, float]]:
    async with loopback_stack(_cfg()) as (proxy_url, _fake, _registry):
        target = proxy_url.removeprefix("http://").removesuffix("/v1")
        with tempfile.TemporaryDirectory(prefix="cascade-prom-") as tmp:
            prom_port = free_port()
            config = _config(Path(tmp), target, prom_port)
            started = time.time()
            with _prometheus(config, prom_port) as prom_url:
                async with (
                    httpx.AsyncClient(base_url=proxy_url, timeout=30) as client,
                    httpx.AsyncClient(base_url=prom_url, timeout=10) as prom,
                ):

                    async def up() -> bool:
                        try:
                            res = await _query(prom, 'up{job="cascade"} == 1')
                        except httpx.TransportError:
                            return False
                        return bool(res)

                    # Bounded, not timed: on a loaded machine Prometheus's TSDB took over 60 s to open
                    # (its log ended at "Starting TSDB ...").
                    try:
                        await _until("Prometheus up and scraping the proxy", up, within=150)
                    except AssertionError as exc:
                        raise AssertionError(f"{exc}\n{_log_tail(Path(tmp))}") from None
                    yield client, prom, started


async def test_real_prometheus_scrapes_alerts_and_dashboards() -> None:
    async with _stack() as (client, prom, started):
        # The counters must be in Prometheus before the normal traffic: a rate covers the increases
        # after a series' first sample, so normal traffic sent before the first scrape would be missing
        # from the day's ratio that the escalation spike is judged against (on a quiet machine the 300
        # requests below take less than the first scrape interval).
        await _send(client, _body("default"))
        await _send(client, _body("default", json_mode=True))

        async def seen_first() -> bool:
            esc = await _query(prom, 'sum(cascade_escalations_total{cascade="default"})')
            req = await _query(prom, 'sum(cascade_requests_total{cascade="default"})')
            return bool(esc and req) and float(req[0]["value"][1]) >= 2

        await _until("Prometheus has scraped the first requests", seen_first)
        # Phase 1, normal traffic: 300 requests, one in fifteen escalated, one in five streamed.
        for _batch in range(20):
            bodies = [_body("default", json_mode=(i == 0), stream=(i % 5 == 1)) for i in range(15)]
            await asyncio.gather(*(_send(client, b) for b in bodies))

        async def seen_all() -> bool:
            res = await _query(prom, 'sum(cascade_requests_total{cascade="default"})')
            return bool(res) and float(res[0]["value"][1]) >= 302

        await _until("Prometheus has scraped the first 300 requests", seen_all)
        await _rules_evaluated_after(prom, time.time(), times=3)
        quiet = await _alerts(prom)
        assert quiet == [], f"alerts on normal traffic: {[_key(a) for a in quiet]}"

        # Phase 2, induced conditions; traffic flows until each expected alert has fired (an alert may
        # resolve again later: the escalation spike does once the day's ratio catches up with it).
        fired: set[tuple[str, str, str]] = set()
        seen: set[tuple[str, str, str]] = set()

        async def induce() -> bool:
            # Half of `default` escalates now (1 in 15 before): a spike against the day's level that
            # stays one (up to ~100 rounds) while the answers at stage 0 keep its savings positive.
            await asyncio.gather(
                _send(client, _body("default", json_mode=True)),
                _send(client, _body("default", stream=True)),
                _send(client, _body("flaky")),
                _send(client, _body("flaky", stream=True)),
                _send(client, _body("broken"), want=502),
                _send(client, _body("wasteful")),
            )
            alerts = await _alerts(prom)
            seen.update(_key(a) for a in alerts)
            fired.update(_key(a) for a in alerts if a["state"] == "firing")
            if fired >= EXPECTED:
                return True
            await asyncio.sleep(0.5)  # pacing the traffic, not a wait for a result
            return False

        try:
            await _until("the induced alerts", induce, within=150)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; fired: {sorted(fired)}; want {sorted(EXPECTED)}") from None
        seen.update(_key(a) for a in await _alerts(prom))
        assert seen == EXPECTED, f"unexpected alerts: {sorted(seen - EXPECTED)}"

        # The exposition passes Prometheus's own lint (a gauge named like a counter, ``..._total``,
        # failed it: CI jobs that lint scrapes rejected the whole endpoint).
        scrape = (await client.get(client.base_url.copy_with(path="/metrics"))).text
        lint = await asyncio.to_thread(
            subprocess.run,
            [tool("promtool"), "check", "metrics"],
            input=scrape,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert lint.returncode == 0, lint.stdout + lint.stderr
        assert "cascade_latency_saved_seconds{" in scrape

        # The series: every contract metric, with the labels this traffic must have produced.
        names = {
            r["metric"]["__name__"]
            for r in await _query(prom, 'group by (__name__) ({__name__=~"cascade_.+"})')
        }
        for m in load_metrics().values():
            want = (
                {f"{m.name}_bucket", f"{m.name}_sum", f"{m.name}_count"}
                if m.type == "histogram"
                else {m.name}
            )
            assert want <= names, f"{m.name}: not scraped ({sorted(want - names)})"
        for expr in (
            'cascade_attempts_total{cascade="default",stage="0",upstream="small",outcome="accepted"}',
            'cascade_attempts_total{cascade="default",stage="0",upstream="small",outcome="rejected"}',
            'cascade_attempts_total{cascade="flaky",upstream="broken",outcome="error"}',
            'cascade_escalations_total{cascade="default",from_upstream="small",to_upstream="large",reason="low_score"}',
            'cascade_escalations_total{cascade="flaky",from_upstream="broken",reason="upstream_error"}',
            'cascade_upstream_errors_total{upstream="broken",kind="status_5xx"}',
            'cascade_requests_total{cascade="broken",outcome="error"}',
            'cascade_requests_total{cascade="flaky",outcome="success"}',
            'cascade_time_to_first_token_seconds_count{cascade="default"}',
            'cascade_request_duration_seconds_count{cascade="default",stream="true"}',
            'cascade_baseline_cost_usd_total{cascade="default"} > 0',
        ):
            assert await _query(prom, expr), f"no series: {expr}"

        # Every Grafana panel's query returns data over the test's time range.
        now = time.time()
        subst = {
            "$job": "cascade",
            "$cascade": ".*",
            "$upstream": ".*",
            "$__rate_interval": "10s",
            "$__range": f"{int(now - started) + 1}s",
        }
        empty = []
        for title, expr in _panel_queries():
            for var, val in subst.items():
                expr = expr.replace(var, val)
            assert "$" not in expr, f"{title}: unknown variable in {expr}"
            res = await _query(prom, expr, start=started, end=now, step="1s")
            values = [float(v) for r in res for _, v in r["values"]]
            if not any(not math.isnan(v) for v in values):
                empty.append(f"{title}: {expr}")
        assert not empty, "panels without data:\n" + "\n".join(empty)
