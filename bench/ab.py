"""Before/after for a hot-path change: the proxy's cost per request at this checkout versus a git revision.

Both versions run at once (one ``cascade serve`` worker each) behind the same nginx canned upstream. The
base revision is checked out as a git worktree under ``.cache/ab/`` (kept for the next run; ``git
worktree remove .cache/ab/SHA`` drops one). Needs nginx, and wrk for ``cpu``
(``apt-get install -y wrk nginx-light``); valgrind for ``instructions``.

    .venv/bin/python bench/ab.py --base HEAD                     # uncommitted change vs HEAD, CPU time
    .venv/bin/python bench/ab.py --base HEAD --mode instructions # the same, counted by callgrind
    .venv/bin/python bench/ab.py --base A --new B                # two revisions, neither checked out
    .venv/bin/python bench/ab.py --log-level info                # with the per-request log line on
    .venv/bin/python bench/ab.py --base main --mode instructions --stream --model words16
                                                                 # a 16-chunk pass-through stream
    .venv/bin/python bench/ab.py --base main --knobs             # issue 17's knobs and budgets, see below

``cpu`` (default): both workers pinned to CPU 0; wrk (with nginx on CPU 1) loads one at a time,
alternating, and the median CPU microseconds per request and requests/s are printed. On a shared
virtual machine that drifts by 10-15 % between runs of the same code, so small changes need ``instructions``.

``--knobs``: every request carries a proxy key and a ``cascade: {"max_stage": 1}`` field. The new
version knows the key as a named key with a daily budget and a highest stage (``auth.keys``: key
lookup, budget check, stage window, spend attribution); the base knows it as a plain ``api_keys``
key (and passes the field through). The difference is what those knobs cost per request.

``instructions``: each version runs under valgrind's callgrind (with ``--stream``, behind the Python fake
upstream, which streams, one chunk a word for ``words16``/``words256``) and the user-space instructions it
executes per request (``--requests`` one at a time, ``--reps`` times, median) are counted. The count
does not depend on what else the machine is doing: repeats agree within a few percent, so a change of
a few percent is visible. Slow (a proxy under callgrind serves ~90 requests/s) but needs no quiet box.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import native  # noqa: E402
from bench.loadgen import run_load  # noqa: E402
from bench.overhead import body_for, cpu_seconds, free_port, pin, process, proxy_config  # noqa: E402


def worktree(rev: str) -> Path:
    sha = subprocess.run(
        ["git", "rev-parse", "--verify", f"{rev}^{{commit}}"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    path = ROOT / ".cache" / "ab" / sha[:12]
    if not path.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(path), sha], cwd=ROOT, check=True)
    return path


def _callgrind_total(out_dir: Path, name: str, pid: int, seen: set[Path]) -> int:
    """Dump the counters of the callgrind run ``pid`` and return the instructions since the last zero."""
    subprocess.run(["callgrind_control", "-d", str(pid)], check=True, capture_output=True)
    for _ in range(200):
        new = sorted(set(out_dir.glob(f"cg-{name}.{pid}.out.*")) - seen)
        if new and new[-1].stat().st_size > 0:
            seen.add(new[-1])
            for line in new[-1].read_text(errors="replace").splitlines():
                if line.startswith("summary:"):
                    return int(line.split()[1])
        time.sleep(0.05)
    raise RuntimeError(f"no callgrind dump from {name}")


KNOB_KEY = "bench-knobs-key-0123456789"
KNOB_HEADERS = {"authorization": f"Bearer {KNOB_KEY}"}


def config_for(up: str, port: int, log_level: str, knobs: str | None = None) -> dict[str, Any]:
    """``knobs``: None (the default config), "base" (a plain api key) or "new" (a named key)."""
    cfg = proxy_config(up, port)
    cfg["server"]["log_level"] = log_level
    if knobs == "base":
        cfg["auth"] = {"api_keys": [KNOB_KEY]}
    elif knobs == "new":
        cfg["auth"] = {
            "keys": [{"name": "bench", "key": KNOB_KEY, "budget_usd_per_day": 1e9, "max_stage": 1}]
        }
    return cfg


def _fake_upstream(port: int) -> contextlib.AbstractContextManager[Any]:
    """The Python fake upstream (it streams; nginx's canned reply does not). Its CPU is not counted."""
    return process(
        [sys.executable, "-m", "tests.fake_upstream", "--port", str(port)],
        f"http://127.0.0.1:{port}/v1/models",
        cpu=1,
    )


def instructions(
    trees: dict[str, Path], body: dict[str, Any], n: int, reps: int, log_level: str, knobs: bool
) -> None:
    headers = KNOB_HEADERS if knobs else None
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        up_port = free_port()
        stream = body.get("stream") is True
        upstream = _fake_upstream(up_port) if stream else native.nginx_upstream(tmp, up_port, "ok", cpu=1)
        with upstream:
            up = f"http://127.0.0.1:{up_port}/v1"
            procs, ports = {}, {}
            for name, tree in trees.items():
                ports[name] = free_port()
                cfg = tmp / f"{name}.yaml"
                cfg.write_text(
                    yaml.safe_dump(config_for(up, ports[name], log_level, name if knobs else None))
                )
                cmd = [
                    "valgrind", "--tool=callgrind", "--quiet", f"--callgrind-out-file={tmp}/cg-{name}.%p.out",
                    sys.executable, "-m", "app.cli", "serve", "--config", str(cfg),
                ]  # fmt: skip
                procs[name] = process(
                    cmd,
                    f"http://127.0.0.1:{ports[name]}/readyz",
                    cpu=None,
                    cwd=tree,
                    ready_timeout=900,  # python under callgrind on a busy 2-CPU box starts in minutes
                    env={"PYTHONHASHSEED": "0"},  # the same dict and set layouts in both
                )
            per_req: dict[str, list[float]] = {"base": [], "new": []}
            with procs["base"] as base, procs["new"] as new:
                pids = {"base": base.pid, "new": new.pid}  # valgrind runs python in its own PID
                seen: set[Path] = set()
                for name in trees:  # warm: imports, pools, caches
                    url = f"http://127.0.0.1:{ports[name]}/v1/chat/completions"
                    asyncio.run(run_load(url, body, concurrency=8, total=200, timeout_s=120, headers=headers))
                print(f"{'rep':>3}  {'version':>7}  {'instructions/request':>20}  errors")
                for r in range(1, reps + 1):
                    for name in trees:
                        url = f"http://127.0.0.1:{ports[name]}/v1/chat/completions"
                        subprocess.run(
                            ["callgrind_control", "-z", str(pids[name])], check=True, capture_output=True
                        )
                        res = asyncio.run(
                            run_load(url, body, concurrency=1, total=n, timeout_s=120, headers=headers)
                        )
                        total = _callgrind_total(tmp, name, pids[name], seen)
                        per_req[name].append(total / n)
                        print(f"{r:>3}  {name:>7}  {total / n:>20,.0f}  {res.errors}")
    med = {k: statistics.median(v) for k, v in per_req.items()}
    print(
        f"median instructions per request: base {med['base']:,.0f}, new {med['new']:,.0f} "
        f"(new/base {med['new'] / med['base']:.3f})"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="HEAD", help="git revision to compare against (default HEAD)")
    ap.add_argument("--new", help="git revision to measure (default: this working tree)")
    ap.add_argument(
        "--log-level",
        default="warning",
        help="the proxies' server.log_level (default warning: no per-request log line; info: one each)",
    )
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument(
        "--model",
        default="two",
        help="two (cascade accepted at stage 0), fast (pass-through), words16 / words256 (pass-through of "
        "16- / 256-word answers; with --stream, one chunk a word)",
    )
    ap.add_argument("--mode", choices=("cpu", "instructions"), default="cpu")
    ap.add_argument(
        "--stream",
        action="store_true",
        help="instructions mode: streamed requests (against the Python fake upstream, which streams)",
    )
    ap.add_argument("--requests", type=int, default=1000, help="instructions mode: requests per repeat")
    ap.add_argument("--reps", type=int, default=3, help="instructions mode: repeats")
    ap.add_argument("--knobs", action="store_true", help="a named key with a budget + a stage window (new)")
    args = ap.parse_args()
    if not native.available():
        sys.exit(f"bench/ab.py needs wrk and nginx: {native.INSTALL_HINT}")
    if args.stream and args.mode == "cpu":
        sys.exit("--stream needs --mode instructions (wrk does not read SSE)")
    if args.mode == "instructions" and not shutil.which("valgrind"):
        sys.exit("--mode instructions needs valgrind (apt-get install -y valgrind)")
    trees = {"base": worktree(args.base), "new": worktree(args.new) if args.new else ROOT}
    for name, tree in trees.items():
        where = subprocess.run(
            [sys.executable, "-c", "import app; print(app.__file__)"],
            cwd=tree,
            capture_output=True,
            text=True,
        ).stdout.strip()
        if not where.startswith(str(tree)):
            sys.exit(f"{name}: `import app` in {tree} loads {where}")
    pin(os.getpid(), 1)
    body = body_for(args.model, args.stream)
    headers = None
    if args.knobs:
        body["cascade"] = {"max_stage": 1}
        headers = KNOB_HEADERS
    if args.mode == "instructions":
        instructions(trees, body, args.requests, args.reps, args.log_level, args.knobs)
        return
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        up_port = free_port()
        with native.nginx_upstream(tmp, up_port, "ok", cpu=1):
            up = f"http://127.0.0.1:{up_port}/v1"
            procs = {}
            ports = {}
            for name, tree in trees.items():
                ports[name] = free_port()
                cfg = tmp / f"{name}.yaml"
                knobs = name if args.knobs else None
                cfg.write_text(yaml.safe_dump(config_for(up, ports[name], args.log_level, knobs)))
                procs[name] = process(
                    [sys.executable, "-m", "app.cli", "serve", "--config", str(cfg)],
                    f"http://127.0.0.1:{ports[name]}/readyz",
                    cpu=0,
                    cwd=tree,
                )
            with procs["base"] as base, procs["new"] as new:
                pids = {"base": base.pid, "new": new.pid}
                cpu_us: dict[str, list[float]] = {"base": [], "new": []}
                rps: dict[str, list[float]] = {"base": [], "new": []}
                for name in trees:  # warm both
                    url = f"http://127.0.0.1:{ports[name]}/v1/chat/completions"
                    native.wrk(
                        url,
                        body,
                        connections=args.concurrency,
                        seconds=3,
                        workdir=tmp,
                        cpu=1,
                        headers=headers,
                    )
                print(f"{'round':>5}  {'version':>7}  {'req/s':>6}  {'CPU us/req':>10}  errors")
                for r in range(1, args.rounds + 1):
                    order = ("base", "new") if r % 2 else ("new", "base")
                    for name in order:
                        url = f"http://127.0.0.1:{ports[name]}/v1/chat/completions"
                        before = cpu_seconds([pids[name]])
                        res = native.wrk(
                            url,
                            body,
                            connections=args.concurrency,
                            seconds=args.seconds,
                            workdir=tmp,
                            cpu=1,
                            headers=headers,
                        )
                        us = (cpu_seconds([pids[name]]) - before) / max(1, res.requests) * 1e6
                        cpu_us[name].append(us)
                        rps[name].append(res.rps)
                        print(f"{r:>5}  {name:>7}  {res.rps:>6,.0f}  {us:>10.0f}  {res.errors}")
    med = {k: statistics.median(v) for k, v in cpu_us.items()}
    mrps = {k: statistics.median(v) for k, v in rps.items()}
    print(
        f"median CPU per request: base {med['base']:.0f} us, new {med['new']:.0f} us "
        f"(new/base {med['new'] / med['base']:.3f}); req/s: base {mrps['base']:,.0f}, new {mrps['new']:,.0f} "
        f"(new/base {mrps['new'] / mrps['base']:.3f})"
    )


if __name__ == "__main__":
    main()
