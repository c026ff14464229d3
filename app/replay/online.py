"""``cascade replay DATASET --online``: a recorded dataset as a live request stream, with thresholds
learned online (``learning.auto_tune``) from labels that arrive as they would in production.

Over 400 lines on purpose: one live run (servers, stream, labels, windows) reads best in one module.

``run_online(options)``, in one event loop:

1. the cascade: without ``--config`` the offline fit on the dataset's train rows (``online_fit``: chain
   and learned scorers, less the stages its thresholds never reach); with ``--config`` that config's
   cascade mapped onto the dataset's models. Its
   thresholds start at ``--start-threshold`` (every scored stage) or where the fit / config put them;
2. the stream: every row of the dataset (train and test), shuffled by ``--seed``, ``--passes`` times;
   with ``--drift OTHER.jsonl`` the first half of that, then OTHER's rows (shuffled). OTHER's models are
   mapped onto the cascade's stages by their place in the cost order (cheapest to cheapest, dearest to
   dearest, the ones between by relative rank; with fewer models than stages, neighbours share one);
3. the proxy (``create_app``) on loopback, pointed at the replay upstream plus the replay judge
   (``app.replay.judge``: an oracle ``learning.judge`` for free-form answers), with ``auto_tune: true``
   and a temporary SQLite store (or ``--store``); with ``--replicas N``, N proxies share that store and
   request i goes to replica i mod N (a fleet: every replica ends on the newest fit). Requests go one
   at a time; after each one the runner waits until its
   label calls are done and stored, and every ``--sync-every`` requests it runs the tuner's sync
   itself (the background loop is off): so the same ``--seed`` gives the same run. Labels come as in
   production: free labels, shadow labels at ``--shadow-rate`` (within ``shadow_max_share``), user
   feedback at ``--feedback-rate`` (``POST /v1/feedback``: 1.0 when the served answer is correct);
4. the same stream again through a proxy with the offline thresholds and no learning: the reference.

The tuner's target: the replay's ``--target-quality`` is relative to the best single model's accuracy;
``learning.target_quality`` is the share of answers as good as the last stage's, a stricter measure (an
early answer that differs from a wrong last answer counts as worse). The runner translates one into
the other on the train rows (``tuner_target``): the labels' quality at the thresholds an offline fit
chooses there (cheapest whose accuracy, less ``--margin-z`` standard errors, reaches the target): the
online tuner is asked for the quality the offline fit delivers, in its own terms. Where the labels
track correctness poorly, the tuner's own choice at that label quality can serve far less, so the
target is raised to the lowest label quality at which the cheapest thresholds reaching it serve the
target on the train rows (``label_floor``). The report (``app.replay.online_report``) is in windows of
100 requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from app.config import Config, ConfigError, LearningConfig, parse_config
from app.learning.store import Store, StoreError
from app.replay.configure import (
    ReplayError,
    ReplayPlan,
    fitted_config,
    mapped_config,
    request_body,
    stage_scores,
    with_thresholds,
)
from app.replay.dataset import Dataset, load_dataset, name_missing_texts, unused_prices
from app.replay.judge import JUDGE_MODEL, JudgedReplay, OracleJudge, usd_per_token
from app.replay.online_report import Served, summarise
from app.replay.online_stream import Item, Stream, build_stream, train_scores, tuner_target
from app.replay.runner import MIN_TRAIN_ROWS, failed_attempt, serve_asgi
from app.replay.upstream import ReplayUpstream

Progress = Callable[[int, int], None]
JUDGE_UPSTREAM = "replay-judge"
TUNER_MARGIN_Z = 0.5


@dataclass
class OnlineOptions:
    dataset: str
    config: str | None = None
    cascade: str | None = None
    mapping: dict[str, str] = field(default_factory=dict)
    target_quality: float = 0.95
    margin_z: float = 0.0  # of the offline fit (as `cascade replay --margin-z`)
    max_stages: int = 3
    seed: int = 0
    start_threshold: float | None = None
    shadow_rate: float = 0.1
    feedback_rate: float = 0.0
    drift: str | None = None
    passes: int = 1
    sync_every: int = 10
    judge: bool = True
    judge_model: str | None = None
    limit: int | None = None
    work_dir: str | None = None
    replicas: int = 1  # proxies sharing the store; request i goes to replica i mod n
    store: str | None = None  # learning.store of the online run (default: a new SQLite file)
    pass_score: float | None = None  # graded datasets (and --drift's): a score at least this is correct
    prices: dict[str, tuple[float, float]] | None = None  # --price: for rows without a recorded cost
    # Python API only (bench/online.py): a cascade fitted before (the same fit_cascade result, reused
    # across runs on one dataset), and learning settings over the defaults / the config's.
    fitted: Any = None
    learning: dict[str, Any] = field(default_factory=dict)


@dataclass
class OnlineResult:
    report: dict[str, Any]
    online: list[Served]
    offline: list[Served]
    errors: int


def online_fit(
    ds: Dataset,
    target_quality: float = 0.95,
    max_stages: int = 3,
    margin_z: float = 0.0,
    chain: Sequence[str] | None = None,
) -> tuple[Any, str | None]:
    """The offline fit an online run tunes (``fit_cascade`` on the train rows), and the single model the
    fit would serve alone, if any.

    A chain whose last model alone reaches the target on the train rows (``last_min_quality``: when the
    cheapest chain's last model misses it, the chain is chosen again among those whose last model
    does): the tuner's labels say whether an answer is as good as the last stage's, so a last stage
    below the target makes a target relative to the best model unlearnable online. (On a generated
    world the fit's cheapest chain ended at GPT-3.5, 0.90 of GPT-4, reaching 0.956 by the agreement of
    three mid-size models; thresholds the tuner found with the same label quality served 0.886.) When
    one model alone meets the target there is nothing to tune on a one-stage cascade: the run tunes
    the cheapest cascade of two or more models instead (its offline thresholds are the reference), and
    the report names the single model. ``chain``: fit that chain (``fit-scorer --chain``), as it is.

    Without the agreement blend (``fit_cascade(agreement=False)``): its score is bimodal (agreeing
    answers at 0.5 and up, the others under 0.5), which the tuner's bounded steps and quantile candidates
    handle badly; on the generated worlds where the offline fit chose it, the online runs kept far less of
    the offline savings (world 0 seed 0: 96 % -> -16 %, world 1: 97 -> 74 %)."""
    from app.learning.train import fit_cascade

    fit = functools.partial(
        fit_cascade,
        ds.train,
        ds.models,
        target_quality=target_quality,
        max_stages=max_stages,
        margin_z=margin_z,
        chain=chain,
        last_min_quality=target_quality,
        agreement=False,  # the tuner's steps are on the learned score's scale (docstring)
    )
    fitted = fit()
    if chain is None and len(fitted.models) < 2 <= min(len(ds.models), max_stages):
        return served_stages(fit(min_stages=2), target_quality), fitted.models[0]
    return served_stages(fitted, target_quality), None


def served_stages(fitted: Any, target_quality: float) -> Any:
    """The fit without the stages its thresholds never reach: where a middle stage accepts every answer
    (threshold 0) and its model alone meets the target, the stages after it only define the labels
    (as good as the last stage's answer) and cost the label calls, so the online run tunes the cascade
    the offline thresholds serve. (On a generated world the fit served Mistral-7B -> Mixtral and kept
    Yi-34B behind them; "as good as Yi's answer" was a loose proxy for correct there, "as good as
    Mixtral's", the model that answers, is the one the tuner needs.) Not with a router (it sends
    requests to the last stage)."""
    if fitted.router is not None:
        return fitted
    best = max(v["accuracy"] for v in fitted.single_models.values())
    for k, t in enumerate(fitted.thresholds):
        if t > 0.0:
            continue
        # Stage k accepts every answer: the later stages are never reached. (At stage 0 the fit serves
        # one model: nothing to tune either way.)
        if k >= 1 and fitted.single_models[fitted.models[k]]["accuracy"] >= target_quality * best - 1e-12:
            train = dict(fitted.train)
            for key in ("reach", "skipped_share"):
                if isinstance(train.get(key), list):
                    train[key] = train[key][: k + 1]
            return dataclasses.replace(
                fitted,
                models=fitted.models[: k + 1],
                thresholds=fitted.thresholds[:k],
                scorers=fitted.scorers[:k],
                oof_scores=fitted.oof_scores[:k],
                scoring=fitted.scoring[:k],
                train=train,
            )
        break
    return fitted


# --- the config -------------------------------------------------------------------------------------------


def online_config(
    plan: ReplayPlan,
    url: str,
    store: str,
    opts: OnlineOptions,
    target: float,
    learning: LearningConfig | None,
) -> Config:
    """The plan's config with a judge upstream and the learning section of the online run."""
    raw = plan.config.model_dump(mode="json", by_alias=True)
    # The target is the offline fit's operating point, which carries the offline margin already: the
    # tuner adds half a standard error of its own (a config's learning section says otherwise).
    lrn: dict[str, Any] = (
        learning.model_dump(mode="json") if learning is not None else {"margin_z": TUNER_MARGIN_Z}
    )
    lrn.update(opts.learning)
    if opts.judge:
        raw["upstreams"][JUDGE_UPSTREAM] = {
            "base_url": f"{url}/v1",
            "model": JUDGE_MODEL,
            "price": {"reported": True},
            "max_retries": 0,
            "circuit": False,
            "logprobs": False,
        }
    lrn.update(
        store=store,
        auto_tune=True,
        target_quality=target,
        shadow_rate=opts.shadow_rate,
        judge=JUDGE_UPSTREAM if opts.judge else None,
        sync_every_s=3600.0,  # the runner syncs the tuner itself (fixed cadence)
        retention_days=0,
        shadow_budget_usd_per_hour=lrn.get("shadow_budget_usd_per_hour", 1e9) if learning else 1e9,
    )
    raw["learning"] = lrn
    return parse_config(raw, env={})


# --- one pass of the stream through a proxy ---------------------------------------------------------------


async def _pass(
    config: Config,
    plan: ReplayPlan,
    stream: Stream,
    opts: OnlineOptions,
    progress: Progress | None,
    offset: int,
    total: int,
    replicas: int = 1,
) -> tuple[list[Served], dict[str, Any]]:
    """The stream through ``replicas`` proxies (request i to replica i mod n), all on ``config``; with
    a learning section they share its store and sync their tuners at the fixed cadence."""
    from app.main import create_app

    apps = [create_app(config) for _ in range(replicas)]
    learnings = [a.state.cascade.learning for a in apps]
    plans = [a.state.cascade.runtime.plans.get(plan.cascade) for a in apps]
    models = plan.upstream_models
    out: list[Served] = []
    extra: dict[str, Any] = {}
    feedback = random.Random(opts.seed + 1)
    changes: list[dict[str, Any]] = []  # fits that started over on a change of label quality, in order
    seen: dict[int, int] = {}
    async with contextlib.AsyncExitStack() as stack:
        clients = []
        for k, app in enumerate(apps):
            url = await stack.enter_async_context(serve_asgi(app))
            learning = learnings[k]
            if learning is not None:
                assert learning.tuner is not None
                await learning.tuner.stop()  # the runner syncs it itself, at a fixed cadence
                learning.shadow.rng = random.Random(opts.seed + 2 + k).random
            client = httpx.AsyncClient(base_url=url, timeout=600.0, trust_env=False)
            clients.append(await stack.enter_async_context(client))
        for i, item in enumerate(stream.items):
            k = i % replicas
            client, learning, cplan = clients[k], learnings[k], plans[k]
            assert cplan is not None
            r = await client.post("/v1/chat/completions", json=request_body(plan.cascade, item.row))
            served = _served(i, item, r, models, stream)
            if learning is not None:
                if served.completion_id and feedback.random() < opts.feedback_rate:
                    fb = {"id": served.completion_id, "score": 1.0 if served.correct else 0.0}
                    await client.post("/v1/feedback", json=fb)
                await learning.settle(tune=False)
                if (i + 1) % opts.sync_every == 0:
                    for each in learnings:
                        assert each is not None
                        await each.settle()
                        changes.extend(_new_changes(each, i + 1, seen))
            served.thresholds = [float(t) for t in cplan.thresholds[:-1] if t is not None]
            out.append(served)
            if progress is not None:
                progress(offset + i + 1, total)
        if learnings[0] is not None:
            for each in learnings:
                assert each is not None
                await each.settle()  # every replica ends on the newest fit in the store
                changes.extend(_new_changes(each, len(out), seen))
            extra = await _labels_of(learnings[0].store, out, apps)
            extra["changes"] = changes
            extra["thresholds_by_replica"] = [
                [float(t) for t in p.thresholds[:-1] if t is not None] for p in plans if p is not None
            ]
    return out, extra


def _new_changes(learning: Any, requests: int, seen: dict[int, int]) -> list[dict[str, Any]]:
    """The changes of label quality ``learning``'s tuner stored since the last look, at ``requests``."""
    got = learning.tuner.changes[seen.get(id(learning), 0) :]
    seen[id(learning)] = len(learning.tuner.changes)
    return [{"requests": requests, **c} for c in got]


def _served(i: int, item: Item, r: httpx.Response, models: dict[str, str], stream: Stream) -> Served:
    best = stream.best[item.source]
    rec = item.native.answers[best]
    s = Served(i, item.source, item.native.id, False, 0.0, rec.correct, rec.cost_usd)
    try:
        body = r.json()
    except ValueError:
        body = None
    ext = body.get("cascade") if isinstance(body, dict) else None
    if r.status_code != 200 or not isinstance(ext, dict):
        s.error = f"HTTP {r.status_code}"
        return s
    model = models.get(str(ext.get("upstream")))
    s.completion_id = str(body.get("id", ""))
    s.stage = int(ext.get("stage", 0))
    s.cost = float(ext.get("cost_usd") or 0.0)
    s.correct = model is not None and item.row.answers[model].correct
    s.error = failed_attempt(ext.get("attempts") or [])
    return s


async def _empty_store(url: str) -> None:
    """A ``--store`` must hold no traces: a run on one an earlier run filled would start from that run's
    fit and labels while reporting its own start, and count the earlier labels as its own."""
    store = Store(url)
    try:
        await store.open()
        n = (await store.counts())["traces"]
    except StoreError as exc:
        raise ReplayError(f"--store: {exc}") from exc
    finally:
        await store.close()
    if n:
        raise ReplayError(
            f"--store already holds {n} traces (an earlier run's?): an online run starts from an "
            "empty store, so that its figures are its own; give a new SQLite file or an empty database"
        )


async def _labels_of(store: Store, served: list[Served], apps: list[Any]) -> dict[str, Any]:
    """Label spend per request and labelled requests so far, from the store; label spend in total,
    from the replicas' metrics (it includes calls that gave no label)."""
    summary = await store.label_summary()
    # Each request's labels are stored before the next request is sent (feedback on it included):
    # labelled requests so far is a running count in stream order.
    seen = 0
    for s in served:
        got = summary.by_trace.get(s.completion_id)
        s.label_cost = got[1] if got is not None else 0.0
        s.labelled = got is not None
        seen += s.labelled
        s.labels = seen
    total = 0.0
    skipped: dict[str, int] = {}
    for app in apps:
        for metric in app.state.cascade.metrics.registry.collect():
            for sample in metric.samples:
                if sample.name == "cascade_cost_usd_total" and sample.labels.get("purpose") == "shadow":
                    total += sample.value
                if sample.name == "cascade_labels_skipped_total":
                    reason = sample.labels["reason"]
                    skipped[reason] = skipped.get(reason, 0) + int(sample.value)
    return {
        "label_cost_usd": total,
        "labels_by_source": summary.by_source,
        "labels_by_comparator": summary.by_detail,
        "labels_skipped": skipped,
    }


# --- the run ----------------------------------------------------------------------------------------------


async def _run(
    opts: OnlineOptions, ds: Dataset, other: Dataset | None, work: str, progress: Progress | None
) -> OnlineResult:
    t0 = time.perf_counter()
    fitted = None
    single: str | None = None  # the one model the offline fit chose, when it chose one
    user_cfg: Config | None = None
    if opts.fitted is not None:
        fitted = opts.fitted
        saved = fitted.save(Path(work) / "scorers")
        paths = [saved[f"stage{k}"] for k in range(len(fitted.scorers))]
    elif opts.config is None:
        fitted, single = online_fit(ds, opts.target_quality, opts.max_stages, opts.margin_z)
        saved = fitted.save(Path(work) / "scorers")
        paths = [saved[f"stage{k}"] for k in range(len(fitted.scorers))]
    else:
        from app.config import load_config

        user_cfg = load_config(opts.config)
    fit_s = time.perf_counter() - t0
    # The stream (and the replay's rows) need the chain, which needs a plan: make one on a dummy URL.
    if fitted is not None:
        chain = list(fitted.models)
    else:
        assert user_cfg is not None
        chain = mapped_config(user_cfg, ds.models, "http://127.0.0.1:9", opts.cascade, opts.mapping).stages
    if len(chain) < 2:
        raise ReplayError(f"{opts.dataset}: the cascade has one stage ({chain[0]}): there is nothing to tune")
    stream = build_stream(ds, chain, other, opts.seed, opts.passes, opts.limit)
    rows = {it.row.id: it.row for it in stream.items}
    judge_model = opts.judge_model or chain[0]
    if judge_model not in ds.models:
        raise ReplayError(
            f"--judge-model: '{judge_model}' is not a model of {opts.dataset} "
            f"(models: {', '.join(ds.models)})"
        )
    judge = OracleJudge(list(rows.values()), usd_per_token(ds.rows, judge_model))
    log = logging.getLogger("cascade")
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        async with serve_asgi(JudgedReplay(ReplayUpstream(list(rows.values())), judge)) as url:
            if fitted is not None:
                plan = fitted_config(fitted, paths, url)
                scores = train_scores(fitted, ds.train)
                at: list[float] | None = list(plan.thresholds)
            else:
                assert user_cfg is not None
                plan = mapped_config(user_cfg, ds.models, url, opts.cascade, opts.mapping)
                scores = await stage_scores(plan, ds.train)
                at = None
            aim = tuner_target(ds.train, ds.models, chain, scores, opts.target_quality, opts.margin_z, at=at)
            target = aim.quality
            offline_thresholds = list(plan.thresholds)
            if opts.start_threshold is not None:
                plan = with_thresholds(plan, [opts.start_threshold] * (len(plan.stages) - 1))
            start = list(plan.thresholds)
            learning = user_cfg.learning if user_cfg is not None else None
            if opts.store is None:
                db = Path(work) / "traces.db"
                for stale in (db, db.with_name("traces.db-wal"), db.with_name("traces.db-shm")):
                    stale.unlink(missing_ok=True)
            else:
                await _empty_store(opts.store)
            store = opts.store or f"sqlite:///{db}"
            try:
                cfg = online_config(plan, url, store, opts, target, learning)
            except ConfigError as exc:
                raise ReplayError("; ".join(exc.problems)) from exc
            n = len(stream.items)
            t1 = time.perf_counter()
            online, extra = await _pass(cfg, plan, stream, opts, progress, 0, 2 * n, opts.replicas)
            online_s = time.perf_counter() - t1
            ref = with_thresholds(plan, offline_thresholds)
            offline, _ = await _pass(ref.config, ref, stream, opts, progress, n, 2 * n)
    finally:
        log.setLevel(level)
    assert cfg.learning is not None
    report = summarise(online, offline, target=opts.target_quality, drift_at=stream.drift_at)
    report.update(
        dataset=ds.name,
        drift=other.name if other is not None else None,
        drift_at=stream.drift_at,
        drift_map=stream.drift_map or None,
        seed=opts.seed,
        stages=chain,
        offline_single_model=single,
        start_thresholds=start,
        offline_thresholds=offline_thresholds,
        tuner_target_quality=target,
        tuner_label_quality_at_offline=aim.at_offline,
        tuner_label_floor=aim.floor,
        shadow_rate=opts.shadow_rate,
        feedback_rate=opts.feedback_rate,
        judge=opts.judge,
        label_cost_usd=extra.get("label_cost_usd", 0.0),
        labels_by_source=extra.get("labels_by_source", {}),
        labels_by_comparator=extra.get("labels_by_comparator", {}),
        labels_skipped=extra.get("labels_skipped", {}),
        replicas=opts.replicas,
        thresholds_by_replica=extra.get("thresholds_by_replica", []),
        changes=extra.get("changes", []),
        learning={
            k: getattr(cfg.learning, k)
            for k in (
                "tune_every",
                "min_labels",
                "max_step",
                "max_step_up",
                "margin_z",
                "optimism_correction",
                "half_life_labels",
                "window_labels",
                "shadow_max_share",
            )
        },
        fit_s=round(fit_s, 2),
        online_s=round(online_s, 2),
        prices={**(other.prices if other is not None else {}), **ds.prices},
    )
    total = sum(s.cost + s.label_cost for s in online)
    if total > 0:
        # every label call's spend (the metric), over everything the run spent
        answers = sum(s.cost for s in online)
        report["shadow_cost_share"] = report["label_cost_usd"] / (answers + report["label_cost_usd"])
    return OnlineResult(report, online, offline, sum(1 for s in online if s.error))


def run_online(opts: OnlineOptions, progress: Progress | None = None) -> OnlineResult:
    """Load, fit, stream; raises ReplayError on bad input."""
    ds = _load(opts.dataset, opts.pass_score, opts.prices, check=not opts.drift)
    if not ds.train:
        raise ReplayError(f"{opts.dataset}: no train rows to fit on (rows need split 'train' or an id)")
    if len(ds.train) < MIN_TRAIN_ROWS:  # the fit and the tuner's target are made on them, as offline
        raise ReplayError(
            f"{opts.dataset}: too few rows to fit on: {len(ds.train)} train rows "
            f"(at least {MIN_TRAIN_ROWS} are needed)"
        )
    other = _load(opts.drift, opts.pass_score, opts.prices, check=False) if opts.drift else None
    # each --price must price a model of one of the two datasets
    if other is not None and opts.prices and (unused := unused_prices(opts.prices, ds.prices, other.prices)):
        raise ReplayError(
            f"--price {unused[0]}: prices no model without a recorded cost in {opts.dataset} or "
            f"{opts.drift} (models: {', '.join(sorted({*ds.models, *other.models}))})"
        )
    if other is not None and len(other.models) < 2:
        raise ReplayError(f"--drift: {opts.drift} records fewer than two models in every row")
    with tempfile.TemporaryDirectory(prefix="cascade-online-") as tmp:
        work = opts.work_dir or tmp
        Path(work).mkdir(parents=True, exist_ok=True)
        return asyncio.run(_run(opts, ds, other, work, progress))


def _load(
    path: str, pass_score: float | None, prices: dict[str, tuple[float, float]] | None, *, check: bool
) -> Dataset:
    """A dataset of the run; ``check``: each ``--price`` must price one of its models (with a drift
    dataset, one of either's: checked on both)."""
    try:
        return name_missing_texts(
            load_dataset(path, prices=prices, pass_score=pass_score, check_prices=check)
        )
    except (OSError, ValueError) as exc:
        raise ReplayError(f"{path}: {exc}") from exc
