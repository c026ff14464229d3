"""Hedged escalation, measured: end-to-end latency and cost with and without ``hedge_after_s``, in the
same run, against the fake upstream (``tests/fake_upstream.py``: the model name sets each stage's
latency), everything on 127.0.0.1 under uvicorn.

1. ``slow-first``: a first stage that takes 3 s, ``hedge_after_s: 0.3``, a fast second stage (0.2 s).
   Target: end-to-end p95 <= the second stage's own p95 (measured alone, same run) + 0.5 s, for plain
   and streaming clients. And with a fast first stage (50 ms): no second-stage call at all.
2. ``mix``: a realistic mix. First stage 0.3 s with a latency tail (6 % of its calls take 4 s more, a
   busy cheap provider), accepted for 70 % of prompts (a per-prompt score decides); second stage 1.2 s
   at ~16x the price. The same seeded request sequence with no hedging and with ``hedge_after_s: 1.0``.
   Target: p95 cut >= 30 % at <= 15 % extra cost (the sum of every answer's ``cascade.cost_usd``).

    .venv/bin/python bench/hedging.py              # both, ~1-2 minutes
    .venv/bin/python bench/hedging.py --quick      # fewer requests
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import random
import statistics
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.config import parse_config  # noqa: E402
from app.main import create_app  # noqa: E402
from tests.fake_upstream import (  # noqa: E402
    FakeUpstream,
    create_fake_upstream,
    prompt_draw,
    serve_in_background,
)

SCORE = {"type": "python", "class": "tests.learning.learning_helpers:PromptScore"}  # score= in the prompt
CHEAP = {"input": 0.15, "output": 0.6}
DEAR = {"input": 2.5, "output": 10.0}


def config(fake_url: str, first: str, last: str, hedge: float | str | None) -> dict[str, Any]:
    up = {"base_url": fake_url + "/v1", "timeout_s": 30, "max_retries": 0, "circuit": False}
    stage0: dict[str, Any] = {"upstream": "small", "threshold": 0.5, "scorers": [SCORE]}
    if hedge is not None:
        stage0["hedge_after_s"] = hedge
    return {
        "server": {"log_level": "warning"},
        "upstreams": {
            "small": {**up, "model": first, "price": CHEAP},
            "large": {**up, "model": last, "price": DEAR},
        },
        "cascades": {"default": {"stages": [stage0, {"upstream": "large"}], "deadline_s": 60}},
    }


@asynccontextmanager
async def proxy_for(cfg: dict[str, Any]) -> AsyncIterator[str]:
    app = create_app(parse_config(cfg, env={}))
    async with serve_in_background(app) as url:
        yield url + "/v1"


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


async def one(c: httpx.AsyncClient, body: dict[str, Any]) -> tuple[float, float, dict[str, Any]]:
    """(seconds through the last byte, cost_usd, the cascade object)."""
    t0 = time.perf_counter()
    if body.get("stream"):
        ext: dict[str, Any] = {}
        async with c.stream("POST", "/chat/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    chunk = orjson.loads(line[6:])
                    ext = chunk.get("cascade") or ext
        took = time.perf_counter() - t0
    else:
        r = await c.post("/chat/completions", json=body)
        r.raise_for_status()
        took = time.perf_counter() - t0
        ext = r.json().get("cascade") or {}
    return took, float(ext.get("cost_usd") or 0.0), ext


async def load(
    url: str, bodies: list[dict[str, Any]], concurrency: int
) -> list[tuple[float, float, dict[str, Any]]]:
    out: list[tuple[float, float, dict[str, Any]]] = [(0.0, 0.0, {})] * len(bodies)
    queue = list(enumerate(bodies))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as c:

        async def worker() -> None:
            while queue:
                i, b = queue.pop(0)
                out[i] = await one(c, b)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out


def chat(content: str, model: str = "default", stream: bool = False) -> dict[str, Any]:
    b: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": content}]}
    if stream:
        b["stream"] = True
    return b


def row(name: str, res: list[tuple[float, float, dict[str, Any]]]) -> dict[str, float]:
    lat = [r[0] for r in res]
    cost = sum(r[1] for r in res)
    hedged = sum(1 for r in res if r[2].get("hedged"))
    out = {"p50": pct(lat, 50), "p95": pct(lat, 95), "mean": statistics.fmean(lat), "cost": cost}
    print(
        f"  {name:<28} p50 {out['p50']:6.3f}s  p95 {out['p95']:6.3f}s  mean {out['mean']:6.3f}s  "
        f"cost ${cost:.6f}  hedged {hedged}/{len(res)}"
    )
    return out


async def slow_first(fake: FakeUpstream, fake_url: str, n: int, conc: int) -> bool:
    print(
        f"\n1. slow-first: stage 0 takes 3 s, hedge_after_s 0.3, stage 1 takes 0.2 s ({n} requests, c={conc})"
    )
    first, last = "slow-3000+answer-small", "slow-200+answer-large"
    ok = True
    async with proxy_for(config(fake_url, first, last, 0.3)) as url:
        alone = row(
            "stage 1 alone (pass-through)", await load(url, [chat("hi score=0.9", "large")] * n, conc)
        )
        for stream in (False, True):
            label = "hedged, " + ("streaming" if stream else "non-stream")
            got = row(label, await load(url, [chat("hi score=0.9", stream=stream)] * n, conc))
            bound = alone["p95"] + 0.5
            verdict = "PASS" if got["p95"] <= bound else "FAIL"
            ok &= got["p95"] <= bound
            print(f"    p95 {got['p95']:.3f}s <= stage 1 p95 + 0.5 s = {bound:.3f}s: {verdict}")
    fake.reset()
    fast = "slow-50+answer-small"
    async with proxy_for(config(fake_url, fast, last, 0.3)) as url:
        row("fast stage 0, hedge 0.3", await load(url, [chat("hi score=0.9")] * n, conc))
    calls = fake.counts.get(last, 0)
    print(f"    second-stage calls with a fast first stage: {calls}: {'PASS' if calls == 0 else 'FAIL'}")
    return ok and calls == 0


TAIL_SHARE = 0.06  # the mix's latency tail: exactly this share of the prompts


def tail_bodies(n: int, share: float, rng: random.Random, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` prompts, exactly ``round(n * share)`` of them in the fake's latency tail and 70 % of each group
    accepted at stage 0 (``score=0.9``): the mix as stated, not one draw of it (a draw of 24 tail prompts
    can hold 22 that stage 0 would have answered, which adds a third to what hedging costs). The fake
    draws the tail per prompt (``prompt_draw``, its ``seed``), so the prompts are chosen for their draw,
    and both runs (with and without hedging) meet the same tail."""
    k = round(n * share)
    slots = [(True, a < round(0.7 * k)) for a in range(k)]
    slots += [(False, a < round(0.7 * (n - k))) for a in range(n - k)]
    rng.shuffle(slots)
    out = []
    for i, (tail, accepted) in enumerate(slots):
        score = "0.9" if accepted else "0.2"
        for j in itertools.count():
            body = chat(f"question {i}.{j} score={score}")
            if (prompt_draw(seed, body) < share) == tail:
                out.append(body)
                break
    return out


async def mix(fake: FakeUpstream, fake_url: str, n: int, conc: int, hedge: float) -> bool:
    print(
        f"\n2. mix: stage 0 0.3 s (+4 s for 6 % of calls), accepted for 70 % of prompts; stage 1 1.2 s, "
        f"~16x the price ({n} requests, c={conc})"
    )
    first, last = "slow-300+tail-4000-6+answer-small_answer", "slow-1200+answer-large_answer"
    bodies = tail_bodies(n, TAIL_SHARE, random.Random(17))
    rows = {}
    for name, h in (("no hedging", None), (f"hedge_after_s {hedge:g}", hedge)):
        async with proxy_for(config(fake_url, first, last, h)) as url:
            rows[name] = row(name, await load(url, bodies, conc))
    base, hed = rows["no hedging"], rows[f"hedge_after_s {hedge:g}"]
    cut = 1 - hed["p95"] / base["p95"]
    extra = hed["cost"] / base["cost"] - 1
    ok = cut >= 0.30 and extra <= 0.15
    print(
        f"    p95 cut {cut:.1%} (target >= 30%), extra cost {extra:+.1%} (target <= 15%): "
        + ("PASS" if ok else "FAIL")
    )
    return ok


async def main_async(args: argparse.Namespace) -> int:
    fake = create_fake_upstream()
    async with serve_in_background(fake) as fake_url:
        ok = await slow_first(fake, fake_url, args.slow_requests, args.concurrency)
        ok &= await mix(fake, fake_url, args.requests, args.concurrency, args.hedge_after)
    print("\nall targets met" if ok else "\nsome target missed")
    return 0 if ok else 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=400, help="mix: requests per run")
    ap.add_argument("--slow-requests", type=int, default=40, help="slow-first: requests per case")
    ap.add_argument("--concurrency", type=int, default=20)
    ap.add_argument("--hedge-after", type=float, default=1.0, help="mix: hedge_after_s")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.requests, args.slow_requests = 150, 20
    sys.exit(asyncio.run(main_async(args)))


if __name__ == "__main__":
    main()
