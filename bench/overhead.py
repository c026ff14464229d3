"""Proxy overhead: added latency and throughput versus calling the upstream directly, same run.

Starts the fast fake upstream and ``cascade serve`` (one worker) as separate processes on 127.0.0.1,
pins the proxy to CPU 0 and the upstream and this load generator to CPU 1 (when there are 2+ CPUs),
and for each scenario (direct, pass-through, 2-stage cascade accepted at stage 0) x (non-stream,
stream) x concurrency prints p50/p99 latency, what the proxy adds to them, time to first byte,
requests/s and the throughput ratio to direct. Bounded: ``--requests`` per cell.

    .venv/bin/python bench/overhead.py                 # c = 1, 16, 64; 2000 requests per cell
    .venv/bin/python bench/overhead.py --quick         # small smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.loadgen import LoadResult, run_load  # noqa: E402

UPSTREAM_MODEL = "ok"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not become ready")


def pin(pid: int, cpu: int) -> None:
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(pid, {cpu % (os.cpu_count() or 1)})


@contextlib.contextmanager
def process(
    cmd: list[str], ready_url: str, cpu: int, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    p = subprocess.Popen(
        cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        pin(p.pid, cpu)
        wait_ready(ready_url)
        yield p
    finally:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def proxy_config(upstream_url: str, port: int) -> dict[str, Any]:
    up = {
        "base_url": upstream_url,
        "model": UPSTREAM_MODEL,
        "price": {"input": 0.15, "output": 0.6},
        "timeout_s": 30,
    }
    return {
        "server": {"host": "127.0.0.1", "port": port, "log_level": "warning"},
        "upstreams": {"fast": up, "fast2": {**up, "price": {"input": 2.5, "output": 10}}},
        "cascades": {
            "two": {
                "stages": [
                    {"upstream": "fast", "threshold": 0.5, "scorers": [{"type": "heuristic"}]},
                    {"upstream": "fast2"},
                ]
            }
        },
    }


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def fmt_ms(s: float) -> str:
    return f"{s * 1000:7.2f}"


async def cell(url: str, model: str, stream: bool, c: int, n: int) -> LoadResult:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "What is 6*7?"}]}
    if stream:
        body["stream"] = True
    return await run_load(url, body, concurrency=c, total=n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000, help="requests per cell (c=1 uses a quarter)")
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--quick", action="store_true", help="200 requests per cell")
    args = ap.parse_args()
    n = 200 if args.quick else args.requests
    levels = [int(x) for x in args.concurrency.split(",")]
    py = sys.executable
    up_port, px_port = free_port(), free_port()
    up_url = f"http://127.0.0.1:{up_port}"
    px_url = f"http://127.0.0.1:{px_port}"
    pin(os.getpid(), 1)
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path = Path(tmp) / "config.yaml"
        cfg_path.write_text(yaml.safe_dump(proxy_config(up_url + "/v1", px_port)))
        with (
            process([py, "-m", "tests.fake_upstream", "--port", str(up_port)], up_url + "/v1/models", cpu=1),
            process(
                [py, "-m", "app.cli", "serve", "--config", str(cfg_path)], px_url + "/readyz", cpu=0
            ) as proxy,
        ):
            rows = []
            cpu0, t0 = cpu_seconds(proxy.pid), time.time()
            for stream in (False, True):
                for c in levels:
                    count = max(50, n // 4) if c == 1 else n
                    direct = asyncio.run(
                        cell(up_url + "/v1/chat/completions", UPSTREAM_MODEL, stream, c, count)
                    )
                    for label, model in (("pass-through", "fast"), ("cascade@0", "two")):
                        before = cpu_seconds(proxy.pid)
                        tb = time.time()
                        res = asyncio.run(cell(px_url + "/v1/chat/completions", model, stream, c, count))
                        cpu_pct = 100 * (cpu_seconds(proxy.pid) - before) / max(1e-9, time.time() - tb)
                        rows.append((stream, c, label, direct, res, cpu_pct))
            total_cpu = cpu_seconds(proxy.pid) - cpu0
            rss = rss_mb(proxy.pid)
    print()
    print(f"proxy: 1 worker pinned to CPU 0; upstream + load generator on CPU 1; {n} requests per cell")
    hdr = (
        f"{'stream':6} {'c':>3} {'path':13} {'direct p50':>10} {'proxy p50':>9} {'added p50':>9} "
        f"{'added p99':>9} {'TTFB p50':>8} {'direct rps':>10} {'proxy rps':>9} {'ratio':>6} {'proxy CPU%':>10} {'errors':>6}"
    )
    print(hdr)
    print("-" * len(hdr))
    for stream, c, label, d, r, cpu_pct in rows:
        ttfb = fmt_ms(r.pct(50, ttft=True)) if stream else "      -"
        print(
            f"{'yes' if stream else 'no':6} {c:>3} {label:13} {fmt_ms(d.pct(50)):>10} {fmt_ms(r.pct(50)):>9} "
            f"{fmt_ms(r.pct(50) - d.pct(50)):>9} {fmt_ms(r.pct(99) - d.pct(99)):>9} {ttfb:>8} "
            f"{d.rps:10.0f} {r.rps:9.0f} {r.rps / d.rps if d.rps else 0:6.2f} {cpu_pct:10.0f} {r.errors + d.errors:6d}"
        )
    print(f"\nproxy RSS at the end: {rss:.0f} MB; proxy CPU time: {total_cpu:.1f} s")
    print("latencies in ms; 'added' = proxy minus direct at the same percentile, same run")


if __name__ == "__main__":
    main()
