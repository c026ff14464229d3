"""`cascade replay`: fit (or calibrate) on the train rows, then send every test row through the real proxy.

Over 400 lines on purpose: one replay's whole run, split by split, from the fit to the report.

``run_replay(options)`` does, in one event loop:

1. load the dataset; without a config fit the cascade on ``train`` (``fit_cascade``: which models, their
   order, at most ``max_stages``, thresholds, one learned scorer file per scored stage);
2. start the replay upstream (:mod:`app.replay.upstream`) under uvicorn on a free loopback port; with a
   user config, map its upstreams onto dataset models and, with ``target_quality``, calibrate its
   thresholds on ``train`` (:mod:`app.replay.configure`);
3. start the proxy (``app.main.create_app``) on another loopback port, pointed at the replay upstream,
   and POST every test row to ``/v1/chat/completions`` (non-stream, ``concurrency`` at a time);
4. read back, per row, the accepting upstream (``cascade.upstream``), the stages reached
   (``cascade.attempts``) and the cost (``cascade.cost_usd``); correctness comes from the dataset
   (row, accepted model). :func:`app.replay.simulate.report_object` builds the report.
"""

from __future__ import annotations

import asyncio
import logging
import math
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from app.config import Config
from app.learning.rows import Row
from app.learning.train import DEFAULT_MAX_STAGES, FittedCascade
from app.replay.baselines import baselines, learned_at_quality
from app.replay.calibration import calibration
from app.replay.configure import (
    ReplayError,
    ReplayPlan,
    calibrate_thresholds,
    fitted_config,
    mapped_config,
    request_body,
    stage_scores,
    train_curve,
)
from app.replay.dataset import Dataset, load_dataset, quality_vs_best_se
from app.replay.report import time_learned_scorers
from app.replay.simulate import report_object
from app.replay.upstream import ReplayUpstream

Progress = Callable[[int, int], None]


@dataclass
class ReplayOptions:
    dataset: str
    config: str | None = None
    cascade: str | None = None
    mapping: dict[str, str] = field(default_factory=dict)
    target_quality: float | None = None
    margin_z: float = 0.0
    max_stages: int = DEFAULT_MAX_STAGES
    limit: int | None = None
    concurrency: int = 8
    work_dir: str | None = None
    want_curve: bool = False
    resplits: int = 1  # the dataset's split, then resplits - 1 random stratified re-splits
    seed: int = 0
    pass_score: float | None = None  # graded datasets: a score at least this is correct
    tolerance: float = 0.01  # a split meets the target when quality_vs_best >= target - tolerance
    prices: dict[str, tuple[float, float]] | None = None  # --price: for rows without a recorded cost


@dataclass(frozen=True)
class RowOutcome:
    row: Row
    model: str | None  # dataset model that answered; None when the request failed
    stage: int
    reached: int  # stages tried (1 = answered by stage 0)
    cost_usd: float
    correct: bool
    error: str | None = None
    routed: bool = False  # the router sent it straight to the last stage


@dataclass
class ReplayResult:
    report: dict[str, Any]
    plan: ReplayPlan
    outcomes: list[RowOutcome]
    elapsed_s: float
    fit_s: float
    feasible: bool | None = None  # auto fit: whether the chain met the target on train
    scorer_files: list[str] = field(default_factory=list)
    scorer_timing: dict[str, float] = field(default_factory=dict)
    fitted: FittedCascade | None = None  # the cascade fit_cascade chose (no --config)
    split: Split | None = None
    splits: list[ReplayResult] = field(default_factory=list)  # every split, this one first

    @property
    def errors(self) -> list[RowOutcome]:
        return [o for o in self.outcomes if o.error is not None]


class _InProcessServer(uvicorn.Server):
    """A server inside a command that owns its signals. uvicorn's own handlers took SIGINT and SIGTERM
    to stop the server, then raised the signal again: Ctrl-C printed the client's connection errors as a
    traceback, and SIGTERM then killed the command where it stood, leaving its temporary directory."""

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@asynccontextmanager
async def serve_asgi(app: Any, host: str = "127.0.0.1") -> AsyncIterator[str]:
    """Run an ASGI app under uvicorn on this loop, on a free loopback port; yield its base URL."""
    config = uvicorn.Config(
        app, host=host, port=0, log_level="warning", log_config=None, access_log=False, lifespan="on"
    )
    server = _InProcessServer(config)
    task = asyncio.get_running_loop().create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("uvicorn exited before it started")
            await asyncio.sleep(0.005)
        bound = server.servers[0].sockets[0].getsockname()
        yield f"http://{bound[0]}:{bound[1]}"
    finally:
        server.should_exit = True
        await task


def _outcome(row: Row, status: int, body: Any, upstream_models: dict[str, str]) -> RowOutcome:
    ext = body.get("cascade") if isinstance(body, dict) else None
    if status != 200 or not isinstance(ext, dict):
        msg = body.get("error", {}).get("message") if isinstance(body, dict) else None
        return RowOutcome(row, None, -1, 0, 0.0, False, f"HTTP {status}: {str(msg)[:300]}")
    attempts = ext.get("attempts") or []
    reached = 1 + max((int(a.get("stage", 0)) for a in attempts), default=0)
    cost = float(ext.get("cost_usd") or 0.0)
    routed = bool(ext.get("routed"))
    model = upstream_models.get(str(ext.get("upstream")))
    if model is None:
        err = f"unknown upstream {ext.get('upstream')!r}"
        return RowOutcome(row, None, -1, reached, cost, False, err, routed)
    stage = int(ext.get("stage", 0))
    return RowOutcome(
        row, model, stage, reached, cost, row.answers[model].correct, failed_attempt(attempts), routed
    )


def failed_attempt(attempts: Sequence[Any]) -> str | None:
    """The first attempt the replay upstream failed, if any: the proxy escalated past it, so the row was
    answered, but not as the recorded answers and the scorers would have it: the figures are wrong."""
    for a in attempts:
        if isinstance(a, dict) and a.get("outcome") == "error":
            why = a.get("detail") or a.get("reason")
            return f"stage {a.get('stage')} ({a.get('upstream')}) failed: {str(why)[:300]}"
    return None


async def send_rows(
    proxy_url: str,
    cascade: str,
    rows: Sequence[Row],
    upstream_models: dict[str, str],
    concurrency: int = 8,
    progress: Progress | None = None,
) -> list[RowOutcome]:
    """POST every row through the proxy's HTTP path; one outcome per row, in order."""
    done = 0
    sem = asyncio.Semaphore(max(1, concurrency))
    limits = httpx.Limits(max_connections=max(1, concurrency), max_keepalive_connections=max(1, concurrency))
    async with httpx.AsyncClient(base_url=proxy_url, timeout=600.0, limits=limits, trust_env=False) as client:

        async def one(row: Row) -> RowOutcome:
            nonlocal done
            async with sem:
                try:
                    r = await client.post("/v1/chat/completions", json=request_body(cascade, row))
                    try:
                        body = r.json()
                    except ValueError:
                        body = None
                    out = _outcome(row, r.status_code, body, upstream_models)
                except httpx.HTTPError as exc:
                    out = RowOutcome(row, None, -1, 0, 0.0, False, f"{type(exc).__name__}")
            done += 1
            if progress is not None:
                progress(done, len(rows))
            return out

        if progress is not None:
            progress(0, len(rows))
        return list(await asyncio.gather(*(one(r) for r in rows)))


def summarise(outcomes: Sequence[RowOutcome], n_stages: int) -> tuple[float, float, list[float]]:
    """(accuracy, mean cost per request, share of requests reaching each stage)."""
    n = len(outcomes)
    if n == 0:
        return 0.0, 0.0, [0.0] * n_stages
    acc = sum(o.correct for o in outcomes) / n
    cost = sum(o.cost_usd for o in outcomes) / n
    reach = [
        sum(1 for o in outcomes if o.reached > k and (not o.routed or k == n_stages - 1)) / n
        for k in range(n_stages)
    ]
    return acc, cost, reach


def skipped_shares(outcomes: Sequence[RowOutcome], n_stages: int) -> list[float]:
    """Per stage, the share of requests the router sent past it (straight to the last stage)."""
    n = len(outcomes)
    routed = sum(1 for o in outcomes if o.routed) / n if n else 0.0
    return [routed if k < n_stages - 1 else 0.0 for k in range(n_stages)]


MIN_TRAIN_ROWS = 20  # below this a fit (5-fold cross-fitting, a bootstrap) means nothing
MIN_TEST_ROWS = 10


@dataclass(frozen=True)
class Split:
    index: int  # 0: the dataset's own split
    seed: int | None  # None for the dataset's own split
    train: list[Row]
    test: list[Row]


def make_splits(ds: Dataset, test: list[Row], resplits: int, seed: int) -> list[Split]:
    """The dataset's own split, then ``resplits - 1`` random re-splits of the same sizes, stratified by
    whether the best single model (on every row) was right and by how many models were (difficulty),
    so that train and test are alike in what decides a cascade's figures."""
    out = [Split(0, None, ds.train, test)]
    if resplits <= 1:
        return out
    from app.replay.dataset import best_single, model_summary, resplit

    rows = [*ds.train, *test]
    summ = model_summary(rows, ds.models)
    best = best_single(summ)
    strata = [(r.answers[best].correct, sum(r.answers[m].correct for m in ds.models)) for r in rows]
    for i in range(1, resplits):
        new = resplit(rows, len(test), seed + i, strata)
        out.append(
            Split(i, seed + i, [r for r in new if r.split == "train"], [r for r in new if r.split == "test"])
        )
    return out


async def _fit_plan(
    opts: ReplayOptions, ds: Dataset, split: Split, work_dir: str, replay_url: str, user_cfg: Config | None
) -> tuple[ReplayPlan, FittedCascade | None, list[str], float]:
    """The cascade this split replays: fitted on its train rows, or the user's (calibrated on them)."""
    from app.learning.train import fit_cascade

    t0 = time.perf_counter()
    if user_cfg is None:
        fitted = await asyncio.to_thread(
            fit_cascade,
            split.train,
            ds.models,
            target_quality=0.95 if opts.target_quality is None else opts.target_quality,
            max_stages=opts.max_stages,
            margin_z=opts.margin_z,
        )
        out = Path(work_dir) / (f"split{split.index}" if split.index else "")
        saved = fitted.save(out)
        paths = [saved[f"stage{k}"] for k in range(len(fitted.scorers))]
        plan = fitted_config(fitted, paths, replay_url, saved.get("router"))
        if opts.want_curve and split.index == 0:
            plan.curve = train_curve(fitted, split.train)
        return plan, fitted, paths, time.perf_counter() - t0
    plan = mapped_config(user_cfg, ds.models, replay_url, opts.cascade, opts.mapping)
    if opts.target_quality is not None:
        scores = await stage_scores(plan, split.train, opts.concurrency)
        plan = calibrate_thresholds(
            plan, split.train, scores, opts.target_quality, ds.models, margin_z=opts.margin_z
        )
    return plan, None, [], time.perf_counter() - t0


async def _run_split(
    opts: ReplayOptions,
    ds: Dataset,
    split: Split,
    work_dir: str,
    replay_url: str,
    user_cfg: Config | None,
    progress: Progress | None,
) -> ReplayResult:
    from app.main import create_app

    plan, fitted, paths, fit_s = await _fit_plan(opts, ds, split, work_dir, replay_url, user_cfg)
    # The proxy logs one line per request at info: keep a replay's output to the report.
    log = logging.getLogger("cascade")
    level = log.level
    log.setLevel(logging.WARNING)
    t0 = time.perf_counter()
    try:
        async with serve_asgi(create_app(plan.config)) as proxy_url:
            outcomes = await send_rows(
                proxy_url, plan.cascade, split.test, plan.upstream_models, opts.concurrency, progress
            )
    finally:
        log.setLevel(level)
    elapsed = time.perf_counter() - t0
    acc, cost, reach = summarise(outcomes, len(plan.stages))
    report = report_object(
        ds.name, len(split.train), split.test, ds.models, plan.stages, plan.thresholds, acc, cost, reach
    )
    best = report["best_single"]["model"]
    report["quality_vs_best_se"] = quality_vs_best_se(
        [o.correct for o in outcomes], [o.row.answers[best].correct for o in outcomes]
    )
    report["data"] = {
        "models_left_out": list(ds.partial_models),
        "rows_left_out": ds.n_dropped_incomplete,
        "cost_estimated": ds.cost_estimated,
        "split_from_hash": ds.split_from_hash,
        "scores_as_correct": ds.scores_as_correct,
        "prices": ds.prices,
    }
    skipped = skipped_shares(outcomes, len(plan.stages))
    report["router"] = {
        **(fitted.router_info if fitted is not None else {"chosen": plan.routed, "reason": "from --config"}),
        "skipped_share": skipped,
    }
    report["baselines"] = baselines(
        split.test,
        ds.models,
        plan.stages,
        reach,
        train=split.train,
        target_quality=0.95 if opts.target_quality is None else opts.target_quality,
        routed=skipped[0] if skipped else 0.0,
    )
    if fitted is not None:
        report["fit"] = fit_summary(fitted)
        report["calibration"] = scorer_calibration(fitted, split.test)
    agreement = report["baselines"].get("agreement")
    if fitted is not None and agreement is not None:
        chain = fitted.models
        scores = [
            [fitted.score(j, r.prompt, r.answers[chain[j]].answer, [r.answers[p].answer for p in chain[:j]])
             for j in range(len(chain) - 1)]
            for r in split.test
        ]  # fmt: skip
        report["baselines"]["learned_at_agreement_quality"] = learned_at_quality(
            split.test, ds.models, chain, scores, agreement["quality_vs_best"]
        )
    return ReplayResult(
        report,
        plan,
        outcomes,
        elapsed,
        fit_s,
        feasible=None if fitted is None else fitted.feasible,
        scorer_files=paths,
        scorer_timing=time_learned_scorers(plan, outcomes) if split.index == 0 else {},
        fitted=fitted,
        split=split,
    )


def fit_summary(fitted: FittedCascade) -> dict[str, Any]:
    """What the fit expected of itself, from its train rows alone: the quality relative to the best
    single model on them, less the search's measured optimism (what to expect on new rows), and the
    bootstrap standard error of that figure: how far the train rows' own luck can put it off."""
    t = fitted.train
    return {
        "n_train": t["n"],
        "quality_vs_best": t["quality_vs_best"],
        "expected_quality_vs_best": t["quality_vs_best_corrected"],
        "optimism": t["optimism"],
        "quality_vs_best_se": t.get("quality_vs_best_se"),
        "feasible": fitted.feasible,
    }


def scorer_calibration(fitted: FittedCascade, test: Sequence[Row]) -> list[dict[str, Any]]:
    """Each scored stage's learned probability against its model's correctness on every test row
    (``app.replay.calibration``)."""
    chain = fitted.models
    out = []
    for j in range(len(chain) - 1):
        probs = [
            fitted.probability(
                j, r.prompt, r.answers[chain[j]].answer, [r.answers[p].answer for p in chain[:j]]
            )
            for r in test
        ]
        right = [r.answers[chain[j]].correct for r in test]
        out.append({"stage": j, "model": chain[j], **calibration(probs, right)})
    return out


def _mean(xs: Sequence[float | None]) -> float | None:
    got = [x for x in xs if x is not None]
    return sum(got) / len(got) if got else None


def _aggregate(first: dict[str, Any], runs: Sequence[ReplayResult], target: float | None, tol: float) -> None:
    """Add the re-splits and their aggregates to the first split's report (in place)."""
    entries = []
    for run in runs:
        r = run.report
        met = None if target is None else bool(r["quality_vs_best"] >= target - tol)
        entries.append(
            {
                "seed": run.split.seed if run.split is not None else None,
                "split": "dataset" if run.split is None or run.split.index == 0 else "random",
                "quality_vs_best": r["quality_vs_best"],
                "quality_vs_best_se": r.get("quality_vs_best_se"),
                "savings_vs_best": r["savings_vs_best"],
                "target_met": met,
                "fit": r.get("fit"),
                "stages": r["stages"],
                "thresholds": r["thresholds"],
                "escalation_rate": r["escalation_rate"],
                "calibration": r.get("calibration"),
                "baselines": {
                    k: None
                    if v is None
                    else {"quality_vs_best": v["quality_vs_best"], "savings_vs_best": v["savings_vs_best"]}
                    for k, v in r["baselines"].items()
                },
            }
        )
    q = [e["quality_vs_best"] for e in entries]
    s = [e["savings_vs_best"] for e in entries if e["savings_vs_best"] is not None]  # (None: best costs 0)
    first["target_quality"] = target
    first["target_tolerance"] = tol
    first["resplits"] = entries
    first["quality_vs_best_min"] = min(q)
    first["quality_vs_best_mean"] = sum(q) / len(q)
    first["savings_vs_best_mean"] = sum(s) / len(s) if s else None
    first["savings_vs_best_min"] = min(s) if s else None
    shares = [bool(e["target_met"]) for e in entries if e["target_met"] is not None]
    first["target_met_share"] = (sum(shares) / len(shares)) if shares else None
    # What the test rows alone do to a split's figure: a policy whose expected quality is exactly the
    # target still lands under target - tolerance on this share of splits (normal approximation).
    ses = [e["quality_vs_best_se"] for e in entries if e["quality_vs_best_se"] is not None]
    se = sum(ses) / len(ses) if ses else None
    first["quality_vs_best_se_mean"] = se
    # (A standard error of 0, every split's cascade answering as the best model does: no miss by chance.)
    miss: float | None = None
    if target is not None and se is not None:
        miss = 0.5 * math.erfc(tol / (se * math.sqrt(2.0))) if se > 0 else 0.0
    first["test_noise_miss_chance"] = miss
    # The fit's own estimate carries its train rows' luck on top (a fitted cascade only: a --config one
    # calibrated on train has no bootstrap of its search): the chance of a miss from both draws.
    fit_ses = [e["fit"].get("quality_vs_best_se") for e in entries if e.get("fit")]
    known = [x for x in fit_ses if x is not None]
    fit_se = sum(known) / len(known) if known and len(known) == len(entries) else None
    first["fit_quality_vs_best_se_mean"] = fit_se
    both: float | None = None
    if target is not None and se is not None and fit_se is not None:
        spread = math.hypot(se, fit_se)
        both = 0.5 * math.erfc(tol / (spread * math.sqrt(2.0))) if spread > 0 else 0.0
    first["noise_miss_chance"] = both
    # A baseline can be missing from some splits (no agreement rule where the fit serves one model): its
    # mean is over the splits that have it, and so is the cascade's beside it, so the two compare (the
    # cascade's mean over every split next to the rule's over two of five read as the rule winning).
    means: dict[str, Any] = {}
    for name in dict.fromkeys(k for e in entries for k in e["baselines"]):
        have = [e for e in entries if e["baselines"].get(name) is not None]
        means[name] = (
            {
                "quality_vs_best": sum(e["baselines"][name]["quality_vs_best"] for e in have) / len(have),
                "savings_vs_best": _mean([e["baselines"][name]["savings_vs_best"] for e in have]),
                "splits": len(have),
                "cascade_quality_vs_best": sum(e["quality_vs_best"] for e in have) / len(have),
                "cascade_savings_vs_best": _mean([e["savings_vs_best"] for e in have]),
            }
            if have
            else None
        )
    first["baselines_mean"] = means


async def _run(
    opts: ReplayOptions, ds: Dataset, test: list[Row], work_dir: str, progress: Progress | None
) -> ReplayResult:
    user_cfg: Config | None = None
    if opts.config is not None:
        from app.config import load_config

        user_cfg = load_config(opts.config)
    splits = make_splits(ds, test, opts.resplits, opts.seed)
    for sp in splits:
        if len(sp.train) < MIN_TRAIN_ROWS or len(sp.test) < MIN_TEST_ROWS:
            raise ReplayError(
                f"{opts.dataset}: too few rows to replay: {len(sp.train)} train and {len(sp.test)} test rows "
                f"(at least {MIN_TRAIN_ROWS} and {MIN_TEST_ROWS} are needed)"
            )
    runs: list[ReplayResult] = []
    replay = ReplayUpstream(ds.rows)
    async with serve_asgi(replay) as replay_url:
        for sp in splits:
            runs.append(
                await _run_split(
                    opts, ds, sp, work_dir, replay_url, user_cfg, progress if sp.index == 0 else None
                )
            )
    first = runs[0]
    target = opts.target_quality if opts.target_quality is not None else (0.95 if user_cfg is None else None)
    _aggregate(first.report, runs, target, opts.tolerance)
    first.splits = runs
    return first


def run_replay(opts: ReplayOptions, progress: Progress | None = None) -> ReplayResult:
    """Load, fit or calibrate, replay the test rows through HTTP; raises ReplayError on bad input."""
    try:
        ds = load_dataset(opts.dataset, prices=opts.prices, pass_score=opts.pass_score)
    except (OSError, ValueError) as exc:
        raise ReplayError(f"{opts.dataset}: {exc}") from exc
    if not ds.train:
        raise ReplayError(f"{opts.dataset}: no train rows to fit on (rows need split 'train' or an id)")
    test = ds.test[: opts.limit] if opts.limit is not None else ds.test
    if not test:
        raise ReplayError(f"{opts.dataset}: no test rows to report on")
    if len(ds.models) < 1:
        raise ReplayError(f"{opts.dataset}: no model is recorded in every row")
    with tempfile.TemporaryDirectory(prefix="cascade-replay-") as tmp:
        return asyncio.run(_run(opts, ds, test, opts.work_dir or tmp, progress))
