"""``cascade serve --workers 2``: Prometheus multiprocess mode adds the workers' counts up."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import base_config
from tests.fake_upstream import free_port

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.loopback, pytest.mark.slow]


def _wait(url: str, timeout: float = 90) -> None:
    # Generous: two workers importing the app on a loaded 2-CPU machine have taken over 40 s to be ready.
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} never became ready")


@contextmanager
def _proc(cmd: list[str], env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    p = subprocess.Popen(
        cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        yield p
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def test_counts_add_up_across_two_workers(tmp_path: Path) -> None:
    up_port, px_port = free_port(), free_port()
    cfg = base_config()
    for u in cfg["upstreams"].values():
        u["base_url"] = f"http://127.0.0.1:{up_port}/v1"
    cfg["server"] = {"host": "127.0.0.1", "port": px_port, "log_level": "warning"}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    (metrics_dir / "stale_counter_123.db").write_bytes(b"left over from an earlier run")
    with (
        _proc([sys.executable, "-m", "tests.fake_upstream", "--port", str(up_port)]),
        _proc(
            [sys.executable, "-m", "app.cli", "serve", "--config", str(path), "--workers", "2"],
            env={"CASCADE_METRICS_DIR": str(metrics_dir)},
        ) as proxy,
    ):
        _wait(f"http://127.0.0.1:{up_port}/v1/models")
        _wait(f"http://127.0.0.1:{px_port}/readyz")
        n = 40
        body = {"model": "default", "messages": [{"role": "user", "content": "hi"}]}
        for i in range(n):
            # a fresh connection per request lets the kernel spread them over both workers
            r = httpx.post(
                f"http://127.0.0.1:{px_port}/v1/chat/completions",
                json={**body, "stream": i % 2 == 1},
                timeout=10,
            )
            assert r.status_code == 200
        pids = {f.name.split("_")[-1].split(".")[0] for f in metrics_dir.glob("counter_*.db")}
        assert len(pids) >= 2, "both workers should have served requests"
        totals = []
        for _ in range(6):  # /metrics may be answered by either worker: each must see the sum
            text = httpx.get(f"http://127.0.0.1:{px_port}/metrics", timeout=5).text
            fams = {f.name: f for f in text_string_to_metric_families(text)}
            total = sum(
                s.value for s in fams["cascade_requests"].samples if s.name == "cascade_requests_total"
            )
            totals.append(total)
            costs = sum(
                s.value for s in fams["cascade_cost_usd"].samples if s.name == "cascade_cost_usd_total"
            )
            assert costs > 0
        assert totals == [n] * 6
        proxy.send_signal(signal.SIGTERM)
        assert proxy.wait(timeout=30) == 0
    assert not (metrics_dir / "stale_counter_123.db").exists()


def _listening(port: int) -> int:
    with open("/proc/net/tcp") as f:
        rows = [line.split() for line in f.readlines()[1:]]
    return sum(1 for r in rows if int(r[1].split(":")[1], 16) == port and r[3] == "0A")  # 0A: LISTEN


def _established_per_process(port: int, pids: list[int]) -> dict[int, int]:
    """Server-side established TCP connections on ``port`` held by each of ``pids`` (Linux /proc)."""
    inodes: dict[str, int] = {}
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes[link[8:-1]] = pid
    counts = dict.fromkeys(pids, 0)
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            cols = line.split()
            local_port, state, inode = int(cols[1].split(":")[1], 16), cols[3], cols[9]
            if local_port == port and state == "01" and inode in inodes:  # 01: ESTABLISHED
                counts[inodes[inode]] += 1
    return counts


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_each_listen_so_the_kernel_spreads_connections_and_a_taken_port_fails(tmp_path: Path) -> None:
    px_port = free_port()
    cfg = base_config()
    cfg["server"] = {"host": "127.0.0.1", "port": px_port, "log_level": "warning"}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "app.cli", "serve", "--config", str(path), "--workers", "2"]
    tmp = tmp_path / "tmp"  # where the proxy makes its Prometheus multiprocess directory
    tmp.mkdir()
    env = {"TMPDIR": str(tmp)}
    with _proc(cmd, env) as proxy:
        _wait(f"http://127.0.0.1:{px_port}/readyz")
        assert len(list(tmp.glob("cascade-metrics-*"))) == 1
        workers = [int(x) for x in Path(f"/proc/{proxy.pid}/task/{proxy.pid}/children").read_text().split()]
        assert len(workers) >= 2
        deadline = time.time() + 20  # /readyz answers once the first worker is up
        while _listening(px_port) < 2 and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        # A burst of 40 connections opened at once (as a client pool or load balancer opens them) and
        # kept open: with one shared socket, whichever worker wakes first may accept most of them.
        conns = [socket.create_connection(("127.0.0.1", px_port)) for _ in range(40)]
        try:
            for c in conns:
                c.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            for c in conns:
                assert c.recv(4096).startswith(b"HTTP/1.1 200")
            counts = _established_per_process(px_port, workers)
            listening = _listening(px_port)
        finally:
            for c in conns:
                c.close()
        # SO_REUSEPORT hashes connections over the workers' own sockets: both get a fair share
        # (fewer than 8 of 40 on one side has probability ~1e-5).
        assert listening == 2  # one listening socket per worker, in one SO_REUSEPORT group
        assert sum(counts.values()) == 40, counts
        assert sorted(counts.values(), reverse=True)[1] >= 8, counts
        # A second proxy on the same port fails at startup instead of joining the group.
        second = subprocess.run(
            cmd, cwd=ROOT, capture_output=True, text=True, timeout=60, env={**os.environ, **env}
        )
        assert second.returncode != 0 and "cannot listen" in second.stderr + second.stdout
        assert len(list(tmp.glob("cascade-metrics-*"))) == 1  # the second removed its own
        proxy.send_signal(signal.SIGTERM)
        assert proxy.wait(timeout=30) == 0
    assert not list(tmp.glob("cascade-metrics-*"))  # nothing left behind in the temp dir


def _in_flight(port: int) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    return sum(s.value for s in fams["cascade_in_flight_requests"].samples)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_worker_killed_mid_request_leaves_no_live_gauge_behind(tmp_path: Path) -> None:
    """A worker killed for memory or a failed health check never runs its shutdown: its share of
    ``cascade_in_flight_requests`` stayed in the multiprocess files, and in every sum after it, for good
    (5 requests "in flight" on an idle proxy)."""
    from concurrent.futures import ThreadPoolExecutor

    up_port, px_port = free_port(), free_port()
    cfg = base_config()
    for u in cfg["upstreams"].values():
        u["base_url"] = f"http://127.0.0.1:{up_port}/v1"
    cfg["upstreams"]["slow"] = {**cfg["upstreams"]["large"], "model": "slow-4000"}
    cfg["server"] = {"host": "127.0.0.1", "port": px_port, "log_level": "warning"}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    body = {"model": "slow", "messages": [{"role": "user", "content": "hi"}]}

    def ask(_: int) -> int:
        try:  # a fresh connection per request: the kernel spreads them over both workers
            return httpx.post(
                f"http://127.0.0.1:{px_port}/v1/chat/completions", json=body, timeout=30
            ).status_code
        except httpx.HTTPError:
            return 0  # the killed worker's client: the connection went with it

    with (
        _proc([sys.executable, "-m", "tests.fake_upstream", "--port", str(up_port)]),
        _proc(
            [sys.executable, "-m", "app.cli", "serve", "--config", str(path), "--workers", "2"],
            env={"CASCADE_METRICS_DIR": str(tmp_path / "metrics")},
        ) as proxy,
        ThreadPoolExecutor(12) as pool,
    ):
        _wait(f"http://127.0.0.1:{up_port}/v1/models")
        _wait(f"http://127.0.0.1:{px_port}/readyz")
        workers = [int(x) for x in Path(f"/proc/{proxy.pid}/task/{proxy.pid}/children").read_text().split()]
        deadline = time.time() + 20
        while _listening(px_port) < 2 and time.time() < deadline:
            time.sleep(0.05)
        asked = [pool.submit(ask, i) for i in range(12)]
        deadline = time.time() + 10
        while _in_flight(px_port) < 12 and time.time() < deadline:
            time.sleep(0.05)
        assert _in_flight(px_port) == 12
        held = {pid: n for pid, n in _established_per_process(px_port, workers).items() if n}
        victim = min(held, key=lambda pid: held[pid])  # (the other children: multiprocessing's helpers)
        os.kill(victim, signal.SIGKILL)
        codes = [f.result() for f in asked]
        # The killed worker's clients lost their connections; the other worker's were answered.
        assert codes.count(0) == held[victim] and codes.count(200) == 12 - held[victim], (codes, held)
        deadline = time.time() + 20  # uvicorn checks its workers every half second or so
        while _in_flight(px_port) != 0 and time.time() < deadline:
            time.sleep(0.1)
        assert _in_flight(px_port) == 0
        proxy.send_signal(signal.SIGTERM)
        assert proxy.wait(timeout=30) == 0
