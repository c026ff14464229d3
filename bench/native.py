"""Native load tools for measuring the proxy on a small machine: wrk as the load generator and nginx as a
canned upstream. Both are written in C and together cost ~15 us of CPU per request here (wrk straight at
the nginx upstream: ~130,000 req/s on 2 CPUs), against ~300 us for the proxy, so a benchmark that needs
every core for the proxy (``--workers 2`` on a 2-CPU box) is not measuring its own load generator.

Debian: ``apt-get install -y wrk nginx-light``. :func:`available` says whether both are there.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

INSTALL_HINT = "apt-get install -y wrk nginx-light"


def _nginx() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )


def available() -> bool:
    return shutil.which("wrk") is not None and _nginx() is not None


def canned_completion(model: str) -> bytes:
    """The same non-stream answer the Python fake upstream gives for ``ok``."""
    return orjson.dumps(
        {
            "id": "chatcmpl-canned",
            "object": "chat.completion",
            "created": 1795890867,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "The answer is 42.", "refusal": None},
                    "finish_reason": "stop",
                    "logprobs": None,
                }
            ],
            "usage": {"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11},
        }
    )


@contextlib.contextmanager
def nginx_upstream(workdir: Path, port: int, model: str, cpu: int | None = None) -> Iterator[int]:
    """An OpenAI-shaped upstream that answers every chat completion with one canned non-stream body.
    Yields the master PID; nginx runs one worker process."""
    nginx = _nginx()
    if nginx is None:
        raise RuntimeError(f"nginx not found ({INSTALL_HINT})")
    d = workdir / f"nginx-{port}"
    d.mkdir(parents=True, exist_ok=True)
    body = canned_completion(model).decode()
    assert "'" not in body and "\\" not in body
    conf = d / "nginx.conf"
    conf.write_text(
        f"""worker_processes 1;
error_log {d}/error.log warn;
pid {d}/nginx.pid;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  keepalive_requests 100000000;
  keepalive_timeout 300s;
  server {{
    listen 127.0.0.1:{port};
    location = /v1/chat/completions {{ default_type application/json; return 200 '{body}'; }}
    location = /v1/models {{ default_type application/json; return 200 '{{"object":"list","data":[]}}'; }}
  }}
}}
"""
    )
    p = subprocess.Popen(
        [nginx, "-c", str(conf), "-p", str(d), "-g", "daemon off;"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 10
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1):
                    break
            except OSError:
                if p.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"nginx did not start: {(d / 'error.log').read_text()}") from None
                time.sleep(0.05)
        if cpu is not None:
            for pid in [p.pid, *_children(p.pid)]:
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(pid, {cpu})
        yield p.pid
    finally:
        p.terminate()
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{pid}/children") as f:
        out = [int(x) for x in f.read().split()]
    return out


@dataclass
class WrkResult:
    rps: float
    requests: int
    errors: int
    p50_ms: float
    p99_ms: float


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def _latency(out: str, pct: str) -> float:
    m = re.search(rf"^\s*{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
    return float(m.group(1)) * _UNITS[m.group(2)] if m else float("nan")


def wrk(
    url: str,
    body: dict[str, Any],
    *,
    connections: int,
    seconds: float,
    workdir: Path,
    threads: int = 1,
    cpu: int | None = None,
    headers: dict[str, str] | None = None,
) -> WrkResult:
    """POST ``body`` to ``url`` for ``seconds`` over ``connections`` keep-alive connections; non-2xx
    answers and socket errors are counted as errors, never hidden."""
    script = workdir / "wrk-post.lua"
    payload = orjson.dumps(body).decode()
    script.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = {_lua_string(payload)}\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        + "".join(f"wrk.headers[{_lua_string(k)}] = {_lua_string(v)}\n" for k, v in (headers or {}).items())
    )
    cmd = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--latency",
        "-s",
        str(script),
        url,
    ]
    if cpu is not None:
        cmd = ["taskset", "-c", str(cpu), *cmd]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    m = re.search(r"(\d+) requests in ([\d.]+)(ms|s)", out)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not (m and rps):
        raise RuntimeError(f"could not read wrk output:\n{out}")
    errors = 0
    if e := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        errors += int(e.group(1))
    if e := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        errors += sum(int(x) for x in e.groups())
    return WrkResult(
        rps=float(rps.group(1)),
        requests=int(m.group(1)),
        errors=errors,
        p50_ms=_latency(out, "50"),
        p99_ms=_latency(out, "99"),
    )


def _lua_string(s: str) -> str:
    return "[==[" + s + "]==]"


# --- CPU caps (cgroup), to give proxy workers a fixed CPU budget on a machine too small for spare cores ---

_V1 = Path("/sys/fs/cgroup/cpu")
_V2 = Path("/sys/fs/cgroup")


def _cgroup_root() -> tuple[Path, int] | None:
    """(where to make cgroups, version) when this process may make a CPU-limited one, else None."""
    if (_V1 / "cpu.cfs_quota_us").exists() and os.access(_V1, os.W_OK):
        return _V1, 1
    controllers = _V2 / "cgroup.controllers"
    if controllers.exists() and "cpu" in controllers.read_text().split() and os.access(_V2, os.W_OK):
        return _V2, 2
    return None


def can_cap() -> bool:
    return _cgroup_root() is not None


@contextlib.contextmanager
def cpu_cap(name: str, cpus: float, pids: list[int]) -> Iterator[None]:
    """Run ``pids`` (whole processes) in a cgroup limited to ``cpus`` CPUs' worth of time (CFS quota over
    a 100 ms period) for the duration of the block; the cgroup is removed afterwards."""
    root = _cgroup_root()
    if root is None:
        raise RuntimeError("no writable cgroup CPU controller")
    base, version = root
    group = base / f"cascade-bench-{name}-{os.getpid()}"
    group.mkdir()
    period = 100_000
    try:
        if version == 1:
            (group / "cpu.cfs_period_us").write_text(str(period))
            (group / "cpu.cfs_quota_us").write_text(str(int(cpus * period)))
        else:
            (group / "cpu.max").write_text(f"{int(cpus * period)} {period}")
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, OSError):
                (group / "cgroup.procs").write_text(str(pid))
        yield
    finally:
        for left in (group / "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError, OSError):
                (base / "cgroup.procs").write_text(left)
        with contextlib.suppress(OSError):
            group.rmdir()
