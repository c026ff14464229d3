"""Proxy overhead, side by side: added latency, time to first byte, throughput, CPU and memory versus
calling the upstream directly, all measured in the same run against the same fast fake upstream.

Starts the fake upstream and ``cascade serve`` as separate processes on 127.0.0.1, pins the proxy to
CPU 0 and the upstream and this load generator to CPU 1 (on a 2+ CPU machine), and for every scenario
x (non-stream, stream) x concurrency prints p50/p99 latency, what the proxy adds to them, the added
time to first byte, requests/s, the ratio to direct, and the proxy's CPU%. Bounded: ``--requests``
per cell. Optional sections:

    --with-litellm      LiteLLM (installed into a throw-away venv under .cache/) on the same upstream
    --workers-check     throughput of --workers 2 versus 1 at the highest concurrency; with wrk and nginx
                        installed (apt-get install -y wrk nginx-light) they are the load and the upstream
                        (~45 us of CPU a request), measured with the load sharing the CPUs and, where a
                        cgroup CPU controller is writable (root), with each worker capped at
                        --workers-cap CPUs (default 0.8) and the rest left to the load
    --memory N          RSS of the proxy after N/2 and N requests (flat = no leak)
    --skip-chunks       leave out the per-chunk section (on by default): the cost of a pass-through
                        stream for answers of --tokens (default 16,256) words, at c = 1 and the highest
                        concurrency: req/s and its ratio to direct, added time to first byte, and the
                        proxy's CPU per request and per forwarded chunk (its CPU divided by the upstream
                        events of the answer: role, words, finish, usage). With --base REV the same
                        proxy at git revision REV (checked out under .cache/ab/, as bench/ab.py does)
                        runs in the same run: before/after side by side
    --base REV          also measure REV in the main table (rows "...@REV") and the per-chunk section

    .venv/bin/python bench/overhead.py                    # c = 1, 16, 64; 2000 requests per cell
    .venv/bin/python bench/overhead.py --quick            # a small smoke run
    .venv/bin/python bench/overhead.py --skip-main --base main   # per-chunk only, before/after
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import native  # noqa: E402
from bench.loadgen import LoadResult, run_load  # noqa: E402

UPSTREAM_MODEL = "ok"
LITELLM = "litellm[proxy]>=1.108,<1.109"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not become ready")


def pin(pid: int, cpu: int | None) -> None:
    """Pin every thread of ``pid`` to ``cpu`` (None: let it run anywhere again)."""
    ncpu = os.cpu_count() or 1
    if hasattr(os, "sched_setaffinity") and ncpu > 1:
        cpus = set(range(ncpu)) if cpu is None else {cpu % ncpu}
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{pid}/task"):
                os.sched_setaffinity(int(task), cpus)


def children(pid: int) -> list[int]:
    out = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(x) for x in f.read().split()]
    return out


@contextlib.contextmanager
def process(
    cmd: list[str],
    ready_url: str,
    cpu: int | None,
    env: dict[str, str] | None = None,
    cwd: Path = ROOT,
    ready_timeout: float = 60.0,
) -> Iterator[subprocess.Popen[bytes]]:
    p = subprocess.Popen(
        cmd, cwd=cwd, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_ready(ready_url, ready_timeout)
        for pid in [p.pid, *children(p.pid)]:
            pin(pid, cpu)  # None: every CPU, whatever this process is pinned to
        yield p
    finally:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


CHUNK_TOKENS = (16, 256)


def words_model(tokens: int) -> str:
    """The fake upstream's model whose answer is ``tokens`` words, each its own chunk."""
    return f"words-{tokens}"


def proxy_config(
    upstream_url: str, port: int, workers: int = 1, tokens: tuple[int, ...] = CHUNK_TOKENS
) -> dict[str, Any]:
    up = {
        "base_url": upstream_url,
        "model": UPSTREAM_MODEL,
        "price": {"input": 0.15, "output": 0.6},
        "timeout_s": 30,
    }
    return {
        "server": {"host": "127.0.0.1", "port": port, "log_level": "warning", "workers": workers},
        "upstreams": {
            "fast": up,
            "fast2": {**up, "price": {"input": 2.5, "output": 10}},
            # pass-through upstreams for the per-chunk section: answers of a known number of chunks
            **{f"words{t}": {**up, "model": words_model(t)} for t in tokens},
        },
        "cascades": {
            "two": {
                "stages": [
                    {"upstream": "fast", "threshold": 0.5, "scorers": [{"type": "heuristic"}]},
                    {"upstream": "fast2"},
                ]
            }
        },
    }


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as f:
            parts = f.read().rsplit(")", 1)[1].split()
            total += (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")
    return total


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def ms(s: float) -> str:
    return f"{s * 1000:.2f}"


@dataclass
class Row:
    stream: bool
    c: int
    label: str
    direct: LoadResult
    res: LoadResult
    cpu_pct: float


def body_for(model: str, stream: bool) -> dict[str, Any]:
    b: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "What is 6*7?"}]}
    if stream:
        b["stream"] = True
    return b


def measure(url: str, model: str, stream: bool, c: int, n: int, pids: list[int]) -> tuple[LoadResult, float]:
    before, t0 = cpu_seconds(pids), time.time()
    res = asyncio.run(run_load(url, body_for(model, stream), concurrency=c, total=n))
    return res, 100 * (cpu_seconds(pids) - before) / max(1e-9, time.time() - t0)


def measure_cpu(url: str, body: dict[str, Any], c: int, n: int, pids: list[int]) -> tuple[LoadResult, float]:
    """The load's result and the proxy's CPU seconds per request (the pool's warm-up requests count)."""
    before = cpu_seconds(pids)
    res = asyncio.run(run_load(url, body, concurrency=c, total=n))
    done = len(res.latencies) + res.errors + c
    return res, (cpu_seconds(pids) - before) / max(1, done)


@dataclass
class ChunkRow:
    tokens: int
    c: int
    label: str
    direct: LoadResult
    res: LoadResult
    cpu_s: float  # proxy CPU seconds per request

    @property
    def events(self) -> int:
        return self.tokens + 3  # role, one chunk a word, finish, usage (the proxy always asks for it)


def print_chunk_table(rows: list[ChunkRow]) -> None:
    print(
        "\nper-chunk cost, pass-through streams (model = an upstream name): 1 worker on CPU 0, upstream + "
        "load generator on CPU 1. 'us/chunk' = proxy CPU per request / upstream events per answer "
        "(words + role, finish and usage chunks); 'ratio' = proxy req/s / direct req/s, same run."
    )
    hdr = ["tokens", "c", "proxy", "direct rps", "proxy rps", "ratio", "added TTFB p50 ms", "CPU us/req"]
    table = [[*hdr, "us/chunk", "errors"]]
    for r in rows:
        table.append(
            [
                str(r.tokens),
                str(r.c),
                r.label,
                f"{r.direct.rps:.0f}",
                f"{r.res.rps:.0f}",
                f"{r.res.rps / r.direct.rps if r.direct.rps else 0:.3f}",
                ms(r.res.pct(50, ttft=True) - r.direct.pct(50, ttft=True)),
                f"{r.cpu_s * 1e6:.0f}",
                f"{r.cpu_s * 1e6 / r.events:.1f}",
                str(r.res.errors + r.direct.errors),
            ]
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for i, row in enumerate(table):
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    lo, hi = min(r.tokens for r in rows), max(r.tokens for r in rows)
    if lo != hi:
        print(f"marginal CPU per chunk, (CPU/req at {hi} - at {lo} words) / {hi - lo}:")
        for r in rows:
            if r.tokens != hi:
                continue
            low = next((x for x in rows if (x.tokens, x.c, x.label) == (lo, r.c, r.label)), None)
            if low is not None:
                us = (r.cpu_s - low.cpu_s) * 1e6 / (hi - lo)
                print(f"  {r.label:>24}  c={r.c:<3}  {us:.1f} us/chunk")


def print_table(rows: list[Row], title: str) -> None:
    print(f"\n{title}")
    hdr = [
        "stream",
        "c",
        "path",
        "direct p50",
        "proxy p50",
        "added p50",
        "added p99",
        "added TTFB p50",
        "direct rps",
        "proxy rps",
        "ratio",
        "proxy CPU%",
        "errors",
    ]
    table = [hdr]
    for r in rows:
        ttfb = ms(r.res.pct(50, ttft=True) - r.direct.pct(50, ttft=True)) if r.stream else "-"
        table.append(
            [
                "yes" if r.stream else "no",
                str(r.c),
                r.label,
                ms(r.direct.pct(50)),
                ms(r.res.pct(50)),
                ms(r.res.pct(50) - r.direct.pct(50)),
                ms(r.res.pct(99) - r.direct.pct(99)),
                ttfb,
                f"{r.direct.rps:.0f}",
                f"{r.res.rps:.0f}",
                f"{r.res.rps / r.direct.rps if r.direct.rps else 0:.3f}",
                f"{r.cpu_pct:.0f}",
                str(r.res.errors + r.direct.errors),
            ]
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(hdr))]
    for i, row in enumerate(table):
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def litellm_cmd(tmp: Path, upstream_url: str, port: int) -> list[str]:
    venv = ROOT / ".cache" / "bench-litellm"
    if not (venv / "bin" / "litellm").exists():
        print(f"installing {LITELLM} into {venv} (once) ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", LITELLM], check=True)
    cfg = {
        "model_list": [
            {
                "model_name": "fast",
                "litellm_params": {
                    "model": f"openai/{UPSTREAM_MODEL}",
                    "api_base": upstream_url,
                    "api_key": "x",
                },
            }
        ],
        "litellm_settings": {"telemetry": False, "drop_params": True},
        # loopback-only benchmark: no proxy key, like the cascade side
        "general_settings": {"dangerously_permit_weak_or_unset_master_key": True},
    }
    path = tmp / "litellm.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return [
        str(venv / "bin" / "litellm"),
        "--config",
        str(path),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--num_workers",
        "1",
    ]


Serve = Callable[..., contextlib.AbstractContextManager[subprocess.Popen[bytes]]]


def workers_check_python(serve: Serve, c: int, n: int) -> None:
    """--workers 2 versus 1 with the Python load generator and fake upstream sharing the box."""
    results: dict[int, tuple[LoadResult, float]] = {}
    for workers in (1, 2):
        port = free_port()
        with serve(port, workers, pinned=False) as proxy:
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            asyncio.run(run_load(url, body_for("two", False), concurrency=c, total=200))
            pids = [proxy.pid, *children(proxy.pid)]
            before = cpu_seconds(pids)
            res = asyncio.run(run_load(url, body_for("two", False), concurrency=c, total=n * 2))
            results[workers] = (res, (cpu_seconds(pids) - before) / max(1, len(res.latencies)))
    (r1, cpu1), (r2, cpu2) = results[1], results[2]
    print(
        f"\n--workers (cascade@0, non-stream, c={c}, unpinned, {os.cpu_count()} CPUs shared "
        f"with the load generator and upstream):\n  1 worker {r1.rps:.0f} req/s, "
        f"{cpu1 * 1e6:.0f} us CPU/request; 2 workers {r2.rps:.0f} req/s, "
        f"{cpu2 * 1e6:.0f} us CPU/request; "
        f"throughput ratio {r2.rps / r1.rps:.2f}, CPU-efficiency ratio {cpu1 / cpu2:.2f}"
    )


def workers_check_native(tmp: Path, serve: Serve, c: int, seconds: float, rounds: int, cap: float) -> None:
    """--workers 2 versus 1 with wrk as the load and nginx as a canned upstream (C; together ~35-45 us
    of CPU per proxied request, against ~250-300 us for the proxy). Rounds alternate 1, 2, 1, 2, ...;
    the ratio is the median of the per-round ratios. Two settings:

    - shared: 1 worker on CPU 0 with wrk + nginx on CPU 1 (as in the main table); 2 workers with nothing
      pinned. With only 2 CPUs the load shares them with both workers, so even a perfectly scaling
      proxy tops out at 2p / (p + l) (p, l: proxy and load CPU per request), printed as the ceiling.
    - capped (``cap`` > 0, where a writable cgroup CPU controller exists): every worker gets ``cap``
      CPUs' worth of time (1 worker: cap, 2 workers: 2 x cap, as a CFS quota) and the load the rest,
      nothing pinned: what doubling the cores would do on a machine with a core to spare for the load.
    """
    ncpu = os.cpu_count() or 1
    pin(os.getpid(), None)  # wrk and nginx inherit this process's CPUs
    up_port = free_port()
    with native.nginx_upstream(tmp, up_port, UPSTREAM_MODEL) as nginx_pid:
        up_url = f"http://127.0.0.1:{up_port}"
        nginx_pids = [nginx_pid, *children(nginx_pid)]
        body = body_for("two", False)
        direct = native.wrk(up_url + "/v1/chat/completions", body, connections=c, seconds=3, workdir=tmp)
        print(
            f"\n--workers, cascade@0 non-stream, c={c}, wrk + nginx canned upstream; {seconds:.0f} s a run, "
            f"{ncpu} CPUs\n  wrk straight at nginx: {direct.rps:,.0f} req/s (the load side's ceiling)"
        )
        p1, p2 = free_port(), free_port()
        with (
            serve(p1, 1, pinned=True, upstream=up_url) as one,
            serve(p2, 2, pinned=False, upstream=up_url) as two,
        ):
            servers = {1: (one, p1), 2: (two, p2)}
            for _, port in servers.values():  # warm both
                native.wrk(
                    f"http://127.0.0.1:{port}/v1/chat/completions",
                    body,
                    connections=c,
                    seconds=3,
                    workdir=tmp,
                )
            run = _WorkerRounds(tmp, body, c, seconds, nginx_pids, servers)
            print("  shared CPUs:")
            ratios, ceilings = run.rounds(rounds, pinned=ncpu > 1)
            print(
                f"  ceiling with the load on the same {ncpu} CPUs: {_median(ceilings):.2f}x\n"
                f"  --workers 2 / --workers 1 throughput: median {_median(ratios):.2f}x "
                f"(rounds: {', '.join(f'{x:.2f}' for x in sorted(ratios))})"
            )
            if cap > 0 and native.can_cap() and ncpu * 1.0 > 2 * cap:
                pids1 = [one.pid, *children(one.pid)]
                pids2 = [two.pid, *children(two.pid)]
                for pid in pids1:
                    pin(pid, None)
                with native.cpu_cap("w1", cap, pids1), native.cpu_cap("w2", 2 * cap, pids2):
                    print(
                        f"  capped: {cap:g} CPU a worker (cgroup quota), the rest for the load, none pinned:"
                    )
                    ratios, _ = run.rounds(rounds, pinned=False)
                print(
                    f"  --workers 2 / --workers 1 throughput, {cap:g} CPU a worker: "
                    f"median {_median(ratios):.2f}x (rounds: {', '.join(f'{x:.2f}' for x in sorted(ratios))})"
                )
            elif cap > 0:
                print("  (capped setting skipped: no writable cgroup CPU controller, or too few CPUs)")
        for pid in nginx_pids:
            pin(pid, None)


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


@dataclass
class _WorkerRounds:
    tmp: Path
    body: dict[str, Any]
    c: int
    seconds: float
    nginx_pids: list[int]
    servers: dict[int, tuple[subprocess.Popen[bytes], int]]

    def rounds(self, n: int, *, pinned: bool) -> tuple[list[float], list[float]]:
        """Alternate 1- and 2-worker runs ``n`` times; returns the per-round ratios and, for the 1-worker
        runs, the ceiling 2p/(p+l) that two shared CPUs allow."""
        ncpu = os.cpu_count() or 1
        ratios: list[float] = []
        ceilings: list[float] = []
        cols = ("round", "workers", "req/s", "p50 ms", "p99 ms", "proxy CPU us/req", "load CPU us/req")
        print("  " + "  ".join(cols) + "  errors")
        for r in range(1, n + 1):
            got: dict[int, float] = {}
            for w, (proc, port) in self.servers.items():
                load_cpu = 1 if pinned and w == 1 else None
                for pid in self.nginx_pids:
                    pin(pid, load_cpu)
                pids = [proc.pid, *children(proc.pid)]
                before = cpu_seconds(pids)
                nginx_before = cpu_seconds(self.nginx_pids)
                kids_before = os.times()
                res = native.wrk(
                    f"http://127.0.0.1:{port}/v1/chat/completions",
                    self.body,
                    connections=self.c,
                    seconds=self.seconds,
                    workdir=self.tmp,
                    cpu=load_cpu,
                )
                kids = os.times()
                wrk_cpu = (kids.children_user - kids_before.children_user) + (
                    kids.children_system - kids_before.children_system
                )
                proxy_us = (cpu_seconds(pids) - before) / max(1, res.requests) * 1e6
                load_us = (wrk_cpu + cpu_seconds(self.nginx_pids) - nginx_before) / max(1, res.requests) * 1e6
                got[w] = res.rps
                if w == 1:
                    ceilings.append(2.0 if ncpu >= 3 else ncpu * proxy_us / (proxy_us + load_us))
                print(
                    f"  {r:>5}  {w:>7}  {res.rps:>5,.0f}  {res.p50_ms:>6.2f}  {res.p99_ms:>6.2f}  "
                    f"{proxy_us:>16.0f}  {load_us:>15.0f}  {res.errors:>6}"
                )
            ratios.append(got[2] / got[1])
        return ratios, ceilings


Target = tuple[str, int, list[int]]  # label suffix, port, pids of one proxy


def main_table(direct_url: str, targets: list[Target], levels: list[int], n: int) -> None:
    rows: list[Row] = []
    for stream in (False, True):
        for c in levels:
            count = max(50, n // 4) if c == 1 else n
            direct = asyncio.run(
                run_load(direct_url, body_for(UPSTREAM_MODEL, stream), concurrency=c, total=count)
            )
            for suffix, port, pids in targets:
                for label, model in (("pass-through", "fast"), ("cascade@0", "two")):
                    url = f"http://127.0.0.1:{port}/v1/chat/completions"
                    res, cpu = measure(url, model, stream, c, count, pids)
                    rows.append(Row(stream, c, label + suffix, direct, res, cpu))
    print_table(
        rows,
        f"cascade: 1 worker on CPU 0; upstream + load generator on CPU 1; {n} requests per cell "
        "(c=1: a quarter). Latencies in ms; 'added' = proxy minus direct, same percentile, same run.",
    )


def chunk_table(direct_url: str, targets: list[Target], tokens: tuple[int, ...], top: int, n: int) -> None:
    rows: list[ChunkRow] = []
    for t in tokens:
        for c in sorted({1, top}):
            # Long answers take longer: the same number of chunks per cell, at least 50 requests.
            count = max(50, (n // 4 if c == 1 else n) * 19 // (t + 3))
            direct = asyncio.run(
                run_load(direct_url, body_for(words_model(t), True), concurrency=c, total=count)
            )
            for suffix, port, pids in targets:
                url = f"http://127.0.0.1:{port}/v1/chat/completions"
                res, cpu_s = measure_cpu(url, body_for(f"words{t}", True), c, count, pids)
                rows.append(ChunkRow(t, c, "pass-through" + suffix, direct, res, cpu_s))
    print_chunk_table(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000, help="requests per cell (c=1 uses a quarter)")
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--quick", action="store_true", help="200 requests per cell")
    ap.add_argument("--with-litellm", action="store_true")
    ap.add_argument("--workers-check", action="store_true")
    ap.add_argument("--workers-seconds", type=float, default=10.0, help="seconds per workers-check run")
    ap.add_argument("--workers-rounds", type=int, default=5, help="alternating 1-/2-worker rounds")
    ap.add_argument(
        "--workers-cap", type=float, default=0.8, help="CPUs per worker in the capped setting (0: skip it)"
    )
    ap.add_argument("--memory", type=int, default=0, metavar="N")
    ap.add_argument("--skip-main", action="store_true", help="only the optional sections")
    ap.add_argument("--skip-chunks", action="store_true", help="no per-chunk section")
    ap.add_argument(
        "--tokens", default=",".join(map(str, CHUNK_TOKENS)), help="answer lengths of the per-chunk section"
    )
    ap.add_argument("--base", metavar="REV", help="measure git revision REV too, in the same run")
    args = ap.parse_args()
    n = 200 if args.quick else args.requests
    levels = [int(x) for x in args.concurrency.split(",")]
    tokens = tuple(int(x) for x in args.tokens.split(","))
    base_tree = None
    if args.base:
        from bench.ab import worktree

        base_tree = worktree(args.base)
    py = sys.executable
    up_port = free_port()
    up_url = f"http://127.0.0.1:{up_port}"
    pin(os.getpid(), 1)
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)

        def serve(
            port: int, workers: int = 1, pinned: bool = True, upstream: str = up_url, tree: Path = ROOT
        ) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
            cfg_path = tmp / f"config-{port}.yaml"
            cfg_path.write_text(yaml.safe_dump(proxy_config(upstream + "/v1", port, workers, tokens)))
            return process(
                [py, "-m", "app.cli", "serve", "--config", str(cfg_path)],
                f"http://127.0.0.1:{port}/readyz",
                cpu=0 if pinned and workers == 1 else None,
                cwd=tree,
            )

        with process(
            [py, "-m", "tests.fake_upstream", "--port", str(up_port)], up_url + "/v1/models", cpu=1
        ) as fake:
            direct_url = up_url + "/v1/chat/completions"
            if not args.skip_main or not args.skip_chunks:
                px_port = free_port()
                with contextlib.ExitStack() as proxies:
                    proxy = proxies.enter_context(serve(px_port))
                    targets = [("", px_port, [proxy.pid])]
                    if base_tree is not None:
                        b_port = free_port()
                        b_proxy = proxies.enter_context(serve(b_port, tree=base_tree))
                        targets.append((f"@{args.base}", b_port, [b_proxy.pid]))
                    if not args.skip_main:
                        main_table(direct_url, targets, levels, n)
                        print(f"proxy RSS at the end: {rss_mb(proxy.pid):.0f} MB")
                    if not args.skip_chunks:
                        chunk_table(direct_url, targets, tokens, max(levels), n)

            if args.with_litellm:
                lport = free_port()
                with process(
                    litellm_cmd(tmp, up_url + "/v1", lport),
                    f"http://127.0.0.1:{lport}/health/liveliness",
                    cpu=0,
                ) as lite:
                    rows = []
                    for stream in (False, True):
                        for c in levels:
                            count = max(50, n // 4) if c == 1 else n
                            direct = asyncio.run(
                                run_load(
                                    direct_url, body_for(UPSTREAM_MODEL, stream), concurrency=c, total=count
                                )
                            )
                            pids = [lite.pid, *children(lite.pid)]
                            res, cpu = measure(
                                f"http://127.0.0.1:{lport}/v1/chat/completions",
                                "fast",
                                stream,
                                c,
                                count,
                                pids,
                            )
                            rows.append(Row(stream, c, "litellm", direct, res, cpu))
                print_table(rows, f"LiteLLM ({LITELLM}), 1 worker on CPU 0, same upstream and load generator")

            if args.workers_check:
                c = max(levels)
                if native.available():
                    workers_check_native(
                        tmp, serve, c, args.workers_seconds, args.workers_rounds, args.workers_cap
                    )
                else:
                    print(
                        f"\n(no wrk and nginx -- {native.INSTALL_HINT} -- so the workers check uses the "
                        "Python load generator and upstream, which need about one CPU themselves)"
                    )
                    pin(os.getpid(), None)
                    pin(fake.pid, None)
                    workers_check_python(serve, c, n)

            if args.memory:
                port = free_port()
                with serve(port) as proxy:
                    url = f"http://127.0.0.1:{port}/v1/chat/completions"
                    rss0 = rss_mb(proxy.pid)
                    half = args.memory // 2
                    for stream in (False, True):
                        asyncio.run(run_load(url, body_for("two", stream), concurrency=32, total=half // 2))
                    rss_half = rss_mb(proxy.pid)
                    for stream in (False, True):
                        asyncio.run(run_load(url, body_for("two", stream), concurrency=32, total=half // 2))
                    rss_full = rss_mb(proxy.pid)
                print(
                    f"\nmemory (cascade@0, half stream): RSS at start {rss0:.0f} MB, after {half} requests "
                    f"{rss_half:.0f} MB, after {2 * half} requests {rss_full:.0f} MB "
                    f"(growth in the second half: {100 * (rss_full - rss_half) / rss_half:+.1f}%)"
                )


if __name__ == "__main__":
    main()
