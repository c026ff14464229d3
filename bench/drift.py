"""The online tuner's change test (``learning.drift_labels``): false alarms on steady streams and how many
labelled requests a real change takes to be seen, for the test in force and for a baseline in the same
run (the newest ``drift_labels`` alone at 3 standard errors: the test before December 6 2026, but for
the stage mix its standard error now counts).

The test runs at every fit, so what an operator running it for months sees is its false alarms per
labelled request, each one throwing the fit's history away. The streams (``sampled`` of
``tests/learning/learning_helpers.py``): two stages at a threshold of 0.5, half the requests accepted
at the first, 68 % of those right, a 10 % shadow rate (``--shadow-rate``); the test runs every
``--every`` labelled requests (the tuner's ``tune_every``) over a window of 8,000 (4 half-lives of
2,000), and an alarm forgets the labels before it, as the tuner does. A change: after 6,000 requests
the accepted answers are right ``--falls`` of the time.

    .venv/bin/python bench/drift.py [--streams 10] [--requests 20000] [--falls 0.2 0.4 0.5] [--every 20]
                                    [--shadow-rate 0.1]

Prints per rule: alarms per 10,000 labelled requests on the steady streams, and per fall the median
labelled requests from the change to its alarm and how many streams it was missed in (4,000 requests
after it). About 3.5 minutes per rule at 10 streams on one CPU.
"""

from __future__ import annotations

import argparse
import bisect
import random
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from operator import itemgetter
from pathlib import Path
from typing import Any

from app.config import LearningConfig
from app.learning import tuning
from app.learning.calibration import Entry

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.learning.learning_helpers import sampled

CFG = LearningConfig(drift_labels=200, half_life_labels=2000)
WINDOW = 8000


@contextmanager
def rule(name: str) -> Iterator[None]:
    saved = tuning.DRIFT_Z, tuning.DRIFT_SCALES
    if name == "baseline":
        tuning.DRIFT_Z, tuning.DRIFT_SCALES = 3.0, 1
    try:
        yield
    finally:
        tuning.DRIFT_Z, tuning.DRIFT_SCALES = saved


def scan(entries: list[Entry], population: list[tuple[int, int]], start: int, every: int) -> list[int]:
    """Labelled requests (counts into ``entries``) at which the test fired, testing every ``every`` from
    ``start`` on; an alarm forgets the labels before its cut."""
    alarms, since = [], 0
    for m in range(start, len(entries) + 1, every):
        upto = bisect.bisect_right(population, entries[m - 1].seq, key=itemgetter(0))
        got = tuning.changed(entries[max(since, m - WINDOW) : m], population[:upto], 2, [0.5], CFG)
        if got is not None:
            alarms.append(m)
            since = next(i for i, e in enumerate(entries) if e.seq == got.since_seq)
    return alarms


def stream(
    seed: int, n: int, good: float, fall: float | None = None, at: int = 6000, rate: float = 0.1
) -> tuple[Any, Any, int]:
    rng = random.Random(seed)
    shadowed = {i for i in range(n) if rng.random() < rate}
    if fall is None:
        e, p = sampled(random.Random(seed + 1000), 0, n, good=good, shadowed=shadowed, rate=rate)
        return e, p, 0
    a, pa = sampled(random.Random(seed + 1000), 0, at, good=good, shadowed=shadowed, rate=rate)
    b, pb = sampled(random.Random(seed + 2000), at, n - at, good=fall, shadowed=shadowed, rate=rate)
    return a + b, pa + pb, len(a)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=10)
    ap.add_argument("--requests", type=int, default=20000, help="per steady stream")
    ap.add_argument("--falls", type=float, nargs="*", default=[0.2, 0.4, 0.5])
    ap.add_argument("--every", type=int, default=20)
    ap.add_argument("--shadow-rate", type=float, default=0.1)
    args = ap.parse_args()
    for name in ("in force", "baseline"):
        t0 = time.perf_counter()
        with rule(name):
            labelled = alarms = 0
            for seed in range(args.streams):
                e, p, _ = stream(seed, args.requests, 0.68, rate=args.shadow_rate)
                labelled += len(e)
                alarms += len(scan(e, p, 2 * CFG.drift_labels, args.every))
            print(f"{name}: steady streams: {alarms} alarms in {labelled} labelled requests", end="")
            print(f" ({alarms / labelled * 1e4:.3f} per 10,000)", flush=True)
            for fall in args.falls:
                delays: list[int] = []
                for seed in range(args.streams):
                    e, p, k = stream(seed, 10000, 0.68, fall, rate=args.shadow_rate)
                    after = [m - k for m in scan(e, p, k - k % args.every + args.every, args.every)]
                    if after:
                        delays.append(after[0])
                median = statistics.median(delays) if delays else None
                print(
                    f"{name}: accepted answers 68 % -> {fall * 100:.0f} % right: seen after {median} "
                    f"labelled requests (median), missed in {args.streams - len(delays)} of {args.streams}",
                    flush=True,
                )
        print(f"  ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
