"""Load and soak: mixed stream/non-stream traffic through 3-stage cascades whose upstreams inject faults.

Starts the fake upstream (``python -m tests.fake_upstream --seed S``) and ``cascade serve`` as separate
processes on 127.0.0.1. Every upstream model carries ``chaos-<pct>``: that share of calls gets a random
fault (HTTP 500, HTTP 429, a stall past ``timeout_s``, a mid-body / mid-stream drop, an unparsable body).
Three cascades over the same kind of stages end at stage 0, 1 or 2 when nothing fails (the earlier
stages of the later ones refuse), and each request picks one at random (seeded), stream or not.

After a warm-up (not counted), it sends ``--requests`` at ``--concurrency`` and checks:
- zero unintended 5xx: the only 5xx allowed is 502 ``all_stages_failed`` (the last stage hit a fault),
  and a stream may end with an error event only when its last stage broke mid-stream;
- every request accounted for exactly once: the rise of ``cascade_requests_total`` (all outcomes) equals
  the requests sent, and ``cascade_in_flight_requests`` is back to 0;
- RSS after the soak within 10% of RSS after the warm-up;
- no leaked connections: the proxy's open fds and TCP connections after the soak are no more than after
  the warm-up (plus a small slack for the keep-alive pool); no client connection left;
- no leaked tasks: after SIGTERM the proxy logs how many asyncio tasks were still alive at shutdown.

    .venv/bin/python -m bench.soak                      # 5,000 requests at concurrency 200, 10% faults
    .venv/bin/python -m bench.soak --requests 500 --concurrency 50    # a quick run
Loopback only; bounded; exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml

ROOT = Path(__file__).resolve().parents[1]
FD_SLACK = 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("CASCADE_") and k != "PROMETHEUS_MULTIPROC_DIR"
    }
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _config(fake: str, port: int, pct: float) -> dict[str, Any]:
    def up(model: str) -> dict[str, Any]:
        return {
            "base_url": fake,
            "model": f"{model}+chaos-{pct:g}",
            "price": {"input": 1.0, "output": 2.0},
            "timeout_s": 1.0,  # a stalled call costs one second
            "max_retries": 1,
        }

    scored = {"threshold": 0.7, "scorers": [{"type": "heuristic"}]}
    return {
        "server": {"host": "127.0.0.1", "port": port, "log_level": "info", "shutdown_grace_s": 10},
        "upstreams": {
            "s0_ok": up("answer-small_answer"),
            "s0_refuse": up("refuse"),
            "s1_ok": up("answer-medium_answer"),
            "s1_refuse": up("refuse+model-medium"),
            "s2": up("answer-large_answer+chunkdelay-2+words-20"),
        },
        "cascades": {
            "at0": {
                "stages": [
                    {"upstream": "s0_ok", **scored},
                    {"upstream": "s1_ok", **scored},
                    {"upstream": "s2"},
                ]
            },
            "at1": {
                "stages": [
                    {"upstream": "s0_refuse", **scored},
                    {"upstream": "s1_ok", **scored},
                    {"upstream": "s2"},
                ]
            },
            "at2": {
                "stages": [
                    {"upstream": "s0_refuse", **scored},
                    {"upstream": "s1_refuse", **scored},
                    {"upstream": "s2"},
                ]
            },
        },
    }


# --- the proxy process, from the outside ----------------------------------------------------------------


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _tcp_states() -> dict[str, tuple[str, int, int]]:
    """socket inode -> (state, local port, remote port) for every TCP socket on the machine."""
    out = {}
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(name).read_text().splitlines()[1:]:
                parts = line.split()
                local, remote, state, inode = parts[1], parts[2], parts[3], parts[9]
                out[inode] = (state, int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16))
    return out


@dataclass
class Snapshot:
    rss_kib: int
    fds: int
    upstream_conns: int  # ESTABLISHED TCP connections from the proxy to the fake upstream
    client_conns: int  # ESTABLISHED TCP connections accepted by the proxy


def snapshot(pid: int, proxy_port: int, fake_port: int) -> Snapshot:
    fd_dir = Path(f"/proc/{pid}/fd")
    inodes = []
    fds = 0
    for fd in fd_dir.iterdir():
        fds += 1
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.append(target[8:-1])
    states = _tcp_states()
    up = cl = 0
    for inode in inodes:
        st = states.get(inode)
        if st is None or st[0] != "01":  # 01 = ESTABLISHED
            continue
        if st[2] == fake_port:
            up += 1
        elif st[1] == proxy_port:
            cl += 1
    return Snapshot(_rss_kib(pid), fds, up, cl)


@dataclass
class Scrape:
    requests: float = 0.0  # cascade_requests_total, all cascades and outcomes
    in_flight: float = 0.0
    errors: Counter[str] = field(default_factory=Counter)  # cascade_upstream_errors_total by kind
    escalations: Counter[str] = field(default_factory=Counter)  # by reason


async def _scrape(session: aiohttp.ClientSession, url: str) -> Scrape:
    from prometheus_client.parser import text_string_to_metric_families

    async with session.get(url + "/metrics") as r:
        text = await r.text()
    out = Scrape()
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "cascade_requests_total":
                out.requests += s.value
            elif s.name == "cascade_in_flight_requests":
                out.in_flight += s.value
            elif s.name == "cascade_upstream_errors_total":
                out.errors[s.labels["kind"]] += int(s.value)
            elif s.name == "cascade_escalations_total":
                out.escalations[s.labels["reason"]] += int(s.value)
    return out


# --- load ---------------------------------------------------------------------------------------------------


@dataclass
class Tally:
    sent: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    unintended: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)


def _classify(status: int, stream: bool, body: bytes) -> tuple[str, str | None]:
    """(outcome label, why it is unintended or None)."""
    if status == 200 and not stream:
        return "200 answer", None
    if status == 200:
        events = [
            line[6:] for line in body.decode(errors="replace").splitlines() if line.startswith("data: ")
        ]
        if not events or events[-1] != "[DONE]":
            return "200 stream without [DONE]", "a stream did not end with [DONE]"
        last = orjson.loads(events[-2]) if len(events) > 1 else {}
        if "error" in last:
            code = last["error"].get("code")
            ok = code == "upstream_stream_failed"
            return f"200 stream, error event ({code})", None if ok else f"unexpected stream error {code}"
        return "200 stream", None
    try:
        code = orjson.loads(body)["error"]["code"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return f"{status} non-JSON", f"{status} without an OpenAI error body"
    label = f"{status} {code}"
    if status == 502 and code == "all_stages_failed":
        return label, None  # the last stage hit an injected fault
    if status == 429 and code == "rate_limit_exceeded":
        return label, None  # every stage answered 429 twice (a retry each): rare, correct
    return label, f"{label}: not an outcome of the injected faults"


async def run_load(url: str, *, total: int, concurrency: int, seed: int, tally: Tally) -> float:
    rng = random.Random(seed)
    bodies = []
    for i in range(total):
        stream = rng.random() < 0.5
        body: dict[str, Any] = {
            "model": rng.choice(["at0", "at1", "at2"]),
            "messages": [{"role": "user", "content": f"soak question {i}"}],
        }
        if stream:
            body["stream"] = True
            if rng.random() < 0.5:
                body["stream_options"] = {"include_usage": True}
        bodies.append((stream, orjson.dumps(body)))
    queue = iter(bodies)
    timeout = aiohttp.ClientTimeout(total=120)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def worker() -> None:
            for stream, payload in queue:
                t0 = time.perf_counter()
                tally.sent += 1
                try:
                    async with session.post(
                        url + "/v1/chat/completions",
                        data=payload,
                        headers={"content-type": "application/json"},
                    ) as r:
                        body = await r.read()
                        label, bad = _classify(r.status, stream, body)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    label, bad = f"client error {type(exc).__name__}", "the connection failed"
                tally.latencies.append(time.perf_counter() - t0)
                tally.outcomes[label] += 1
                if bad is not None:
                    tally.unintended.append(bad)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - t0


# --- orchestration ----------------------------------------------------------------------------------------


def _wait_http(url: str, proc: subprocess.Popen[bytes], seconds: float = 30) -> None:
    import urllib.request

    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{url} never became ready")
        time.sleep(0.05)


def _spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as err:
        return subprocess.Popen(
            [sys.executable, *args],
            cwd=ROOT,
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )


def _stop(proc: subprocess.Popen[bytes], seconds: float = 20) -> int | None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            return None
    return proc.returncode


def _shutdown_tasks(log: Path) -> int | None:
    for line in reversed(log.read_text(errors="replace").splitlines()):
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if entry.get("msg") == "stopped":
                return int(entry["tasks"])
    return None


async def soak(args: argparse.Namespace) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="cascade-soak-"))
    fake_port, proxy_port = _free_port(), _free_port()
    fake = _spawn(
        ["-m", "tests.fake_upstream", "--port", str(fake_port), "--seed", str(args.seed)], tmp / "fake.log"
    )
    proxy: subprocess.Popen[bytes] | None = None
    try:
        _wait_http(f"http://127.0.0.1:{fake_port}/v1/models", fake)
        cfg_path = tmp / "config.yaml"
        cfg_path.write_text(
            yaml.safe_dump(_config(f"http://127.0.0.1:{fake_port}/v1", proxy_port, args.fault_pct))
        )
        proxy = _spawn(["-m", "app.cli", "serve", "--config", str(cfg_path)], tmp / "proxy.log")
        url = f"http://127.0.0.1:{proxy_port}"
        _wait_http(url + "/readyz", proxy)
        idle = snapshot(proxy.pid, proxy_port, fake_port)

        warm = Tally()
        await run_load(url, total=args.warmup, concurrency=args.concurrency, seed=args.seed + 1, tally=warm)
        await asyncio.sleep(1.0)
        before = snapshot(proxy.pid, proxy_port, fake_port)
        async with aiohttp.ClientSession() as s:
            scraped_before = await _scrape(s, url)

        tally = Tally()
        wall = await run_load(
            url, total=args.requests, concurrency=args.concurrency, seed=args.seed, tally=tally
        )
        await asyncio.sleep(1.0)
        after = snapshot(proxy.pid, proxy_port, fake_port)
        async with aiohttp.ClientSession() as s:
            scraped_after = await _scrape(s, url)
        after.client_conns = max(
            0, after.client_conns - 1
        )  # the /metrics scrape's own connection, if still open

        code = _stop(proxy)
        tasks = _shutdown_tasks(tmp / "proxy.log")
    finally:
        if proxy is not None:
            _stop(proxy)
        _stop(fake)

    counted = scraped_after.requests - scraped_before.requests
    in_flight = scraped_after.in_flight
    errors = scraped_after.errors - scraped_before.errors
    escalations = scraped_after.escalations - scraped_before.escalations
    rss_change = (after.rss_kib - before.rss_kib) / before.rss_kib
    checks = [
        ("unintended 5xx / broken replies", len(tally.unintended) == 0, f"{len(tally.unintended)}"),
        ("cascade_requests_total rise == sent", counted == tally.sent, f"{counted:.0f} == {tally.sent}"),
        ("in-flight gauge back to 0", in_flight == 0, f"{in_flight:.0f}"),
        ("RSS after soak within 10% of after warm-up", abs(rss_change) <= 0.10, f"{rss_change:+.1%}"),
        ("open fds not grown", after.fds <= before.fds + FD_SLACK, f"{before.fds} -> {after.fds}"),
        (
            "upstream connections not grown",
            after.upstream_conns <= before.upstream_conns + FD_SLACK,
            f"{before.upstream_conns} -> {after.upstream_conns}",
        ),
        ("client connections left open", after.client_conns == 0, f"{after.client_conns}"),
        (
            "asyncio tasks alive at shutdown (only the server's own)",
            tasks is not None and tasks <= 1,
            f"{tasks}",
        ),
        ("exit status after SIGTERM", code == 0, f"{code}"),
    ]
    lat = sorted(tally.latencies)

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, round(q * (len(lat) - 1)))] * 1000 if lat else float("nan")

    print(
        f"\ncascade soak: {tally.sent} requests (after {args.warmup} warm-up), "
        f"concurrency {args.concurrency}, "
        f"{args.fault_pct:g}% injected faults per upstream call, seed {args.seed}"
    )
    print(
        f"wall {wall:.1f}s, {tally.sent / wall:.0f} req/s, "
        f"latency p50 {pct(0.5):.0f} ms, p99 {pct(0.99):.0f} ms\n"
    )
    print(f"{'outcome':<52}{'count':>8}")
    for label, n in sorted(tally.outcomes.items(), key=lambda kv: -kv[1]):
        print(f"{label:<52}{n:>8}")
    print(f"\nupstream call failures by kind: {dict(sorted(errors.items()))}")
    print(f"escalations by reason: {dict(sorted(escalations.items()))}")
    print(f"\n{'process':<30}{'idle':>10}{'warm':>10}{'after':>10}")
    for name, attr in (
        ("RSS MiB", "rss_kib"),
        ("open fds", "fds"),
        ("upstream TCP conns", "upstream_conns"),
        ("client TCP conns", "client_conns"),
    ):
        vals = [getattr(x, attr) for x in (idle, before, after)]
        if attr == "rss_kib":
            print(f"{name:<30}" + "".join(f"{v / 1024:>10.1f}" for v in vals))
        else:
            print(f"{name:<30}" + "".join(f"{v:>10}" for v in vals))
    print(f"\n{'check':<56}{'result':>8}  value")
    for name, ok, value in checks:
        print(f"{name:<56}{'ok' if ok else 'FAIL':>8}  {value}")
    if tally.unintended:
        print("\nunintended:", Counter(tally.unintended).most_common(5))
    print(f"\nlogs: {tmp}")
    return 0 if all(ok for _, ok, _ in checks) else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=5000)
    p.add_argument("--concurrency", type=int, default=200)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--fault-pct", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=1)
    return asyncio.run(soak(p.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
