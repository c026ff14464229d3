"""``cascade replay`` and ``cascade fit-scorer``: recorded datasets through the real HTTP path.

``cascade replay DATASET.jsonl [--config PATH] [--target-quality Q] [--json] [--plot FILE.png]
[--limit N] [--concurrency C]`` (CONTRACT section 3). Exit 0 on a complete run, 1 when some requests
failed, 2 on bad input (dataset, config, unmapped model, missing extra).

``cascade fit-scorer DATASET.jsonl --out DIR`` fits the learned scorers (one file per scored stage) and
thresholds on the dataset's train rows and writes ``DIR/stage{k}.json``, ``DIR/cascade.json`` and a config
snippet ``DIR/cascade.yaml`` using them (``{type: learned, model: DIR/stage{k}.json}``, and
``{type: agreement}`` beside it on a stage the fit scores by the blend of the two).
``cascade fit-scorer --from-store [--config PATH] [--cascade NAME] --out DIR`` writes the same files from
the labelled traces in the trace store (``app.learning.fit_scorer``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path
from typing import Any

EXIT_FAILED_REQUESTS = 1
EXIT_BAD_INPUT = 2


def _mapping(values: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for v in values or []:
        if "=" not in v:
            raise argparse.ArgumentTypeError(f"--map wants UPSTREAM=MODEL, got {v!r}")
        k, m = v.split("=", 1)
        out[k.strip()] = m.strip()
    return out


MAX_PRICE = 1e6  # USD per 1M tokens: a million dollars a million tokens is no price


def _price(v: str) -> tuple[str, tuple[float, float]]:
    """``--price MODEL=INPUT[,OUTPUT]`` (USD per 1M tokens; OUTPUT defaults to INPUT)."""
    model, eq, values = v.rpartition("=")
    parts = values.split(",")
    want = f"wants MODEL=INPUT[,OUTPUT] in USD per 1M tokens, e.g. gpt-4o=2.5,10; got {v!r}"
    if not eq or not model.strip() or not 1 <= len(parts) <= 2:
        raise argparse.ArgumentTypeError(want)
    try:
        nums = [float(x) for x in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(want) from None
    if not all(math.isfinite(x) and 0.0 <= x <= MAX_PRICE for x in nums):
        raise argparse.ArgumentTypeError(
            f"{model.strip()}: prices must be in [0, {MAX_PRICE:g}] USD per 1M tokens, got {values}"
        )
    return model.strip(), (nums[0], nums[-1])


def prices_of(values: list[tuple[str, tuple[float, float]]] | None) -> dict[str, tuple[float, float]] | None:
    """The ``--price`` options as a table (the last of a model's wins); None without any."""
    return dict(values) if values else None


def _quality(v: str) -> float:
    q = float(v)
    if not 0.0 < q <= 1.0:
        raise argparse.ArgumentTypeError("must be in (0, 1]")
    return q


def _positive(v: str) -> int:
    n = int(v)
    if n < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return n


def _number(v: str) -> float:
    try:
        x = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {v!r}") from None
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {v}")
    return x


def _margin(v: str) -> float:
    z = _number(v)
    if not 0.0 <= z <= 5.0:  # as learning.margin_z
        raise argparse.ArgumentTypeError(f"must be in [0, 5] (standard errors), got {v}")
    return z


def _tolerance(v: str) -> float:
    t = _number(v)
    if not 0.0 <= t < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {v}")
    return t


def _unit(v: str) -> float:
    try:
        x = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {v!r}") from None
    if not 0.0 <= x <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {v}")
    return x


def cmd_replay(args: argparse.Namespace) -> int:
    if args.work_dir and Path(args.work_dir).exists() and not Path(args.work_dir).is_dir():
        print(f"cascade replay: --work-dir: {args.work_dir} exists and is not a directory", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.online:
        from app.replay.online_cli import cmd_online

        return cmd_online(args)
    from app.replay.online_cli import offline_misuse

    if (problem := offline_misuse(args)) is not None:
        print(f"cascade replay: {problem}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from app.config import ConfigError
    from app.learning.train import DEFAULT_MAX_STAGES
    from app.replay.configure import ReplayError
    from app.replay.report import ProgressBar, format_table
    from app.replay.runner import ReplayOptions, run_replay

    try:
        if args.plot:
            from app.replay.plot import require_matplotlib

            require_matplotlib(args.plot)
        opts = ReplayOptions(
            dataset=args.dataset,
            config=args.config,
            cascade=args.cascade,
            mapping=_mapping(args.map),
            target_quality=args.target_quality,
            margin_z=args.margin_z,
            max_stages=args.max_stages if args.max_stages is not None else DEFAULT_MAX_STAGES,
            limit=args.limit,
            concurrency=args.concurrency,
            work_dir=args.work_dir,
            want_curve=bool(args.plot),
            resplits=args.resplits,
            seed=args.seed,
            pass_score=args.pass_score,
            tolerance=args.tolerance,
            prices=prices_of(args.price),
        )
        bar = None if args.quiet else ProgressBar("replay")
        result = run_replay(opts, bar)
    except ConfigError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return EXIT_BAD_INPUT
    except (ReplayError, argparse.ArgumentTypeError) as exc:
        print(f"cascade replay: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(format_table(result))
    if args.plot:
        from app.replay.plot import plot_report

        plot_report(result.report, result.plan.curve, args.plot)
        print(f"plot: {args.plot}")
    if args.work_dir and result.scorer_files:
        print(f"learned scorers: {', '.join(result.scorer_files)}")
    if args.json:
        print(json.dumps(result.report, sort_keys=False))
    return EXIT_FAILED_REQUESTS if result.errors else 0


def _snippet(
    models: list[str],
    thresholds: list[float],
    scorers: list[list[dict[str, Any]]],
    router: tuple[str, float] | None = None,
    tune_to: float | None = None,
    prices: dict[str, tuple[float, float]] | None = None,
) -> str:
    from app.replay.configure import upstream_names
    from app.replay.dataset import PRICE_GIVEN, PRICE_LISTED, price_for

    names = upstream_names(models)
    lines = [
        "# Generated by `cascade fit-scorer`: point base_url/api_key at your endpoints; check the prices.",
        "upstreams:",
    ]
    said = {
        PRICE_GIVEN: "from --price",
        PRICE_LISTED: "a list price of early 2024: check yours",
    }
    for m in models:
        (pin, pout), source = price_for(m, prices)
        lines += [
            f"  {names[m]}:",
            "    base_url: http://127.0.0.1:8081/v1",
            f"    model: {json.dumps(m)}",
            f"    price: {{input: {pin!r}, output: {pout!r}}}  # USD per 1M tokens, "
            + said.get(source, "no price known: set yours"),
        ]
    lines += ["cascades:", "  default:"]
    if router is not None:
        lines.append(f"    router: {{model: {json.dumps(router[0])}, threshold: {router[1]!r}}}")
    lines.append("    stages:")
    for k, m in enumerate(models):
        lines.append(f"      - upstream: {names[m]}")
        if k < len(models) - 1:
            lines.append(f"        threshold: {thresholds[k]!r}")
            lines.append(f"        scorers: {json.dumps(scorers[k])}")  # JSON is YAML
    if tune_to is not None:
        lines += [
            "learning:",
            "  auto_tune: true",
            f"  target_quality: {tune_to!r}  # as good as the last stage's",
        ]
    return "\n".join(lines) + "\n"


def _fit_usage(args: argparse.Namespace) -> str | None:
    """What is wrong with the mix of fit-scorer arguments, if anything."""
    if args.from_store:
        if args.dataset is not None:
            return "give DATASET.jsonl or --from-store, not both"
        dataset_only = (
            ("--chain", args.chain),
            ("--max-stages", args.max_stages),
            ("--pass-score", args.pass_score),
            ("--price", args.price),
        )
        wrong = [o for o, v in dataset_only if v is not None] + (
            ["--for-auto-tune"] if args.for_auto_tune else []
        )
        return f"{', '.join(wrong)}: only with DATASET.jsonl" if wrong else None
    if args.dataset is None:
        return "give DATASET.jsonl (a replay dataset's train rows) or --from-store (labelled traces)"
    only = (("--config", args.config), ("--cascade", args.cascade), ("--min-labels", args.min_labels))
    wrong = [o for o, v in only if v is not None]
    return f"{', '.join(wrong)}: only with --from-store" if wrong else None


def cmd_fit_scorer(args: argparse.Namespace) -> int:
    problem = _fit_usage(args)
    if problem is not None:
        print(f"cascade fit-scorer: {problem}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.from_store:
        from app.learning.fit_scorer import cmd_fit_from_store

        return cmd_fit_from_store(args)
    return _fit_from_dataset(args)


def _fit_from_dataset(args: argparse.Namespace) -> int:
    from app.learning.train import DEFAULT_MAX_STAGES, fit_cascade
    from app.replay.dataset import load_dataset, price_notes

    try:
        ds = load_dataset(args.dataset, prices=prices_of(args.price), pass_score=args.pass_score)
    except (OSError, ValueError) as exc:
        print(f"cascade fit-scorer: {args.dataset}: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from app.replay.runner import MIN_TRAIN_ROWS

    chain = [c.strip() for c in args.chain.split(",") if c.strip()] if args.chain is not None else None
    max_stages = args.max_stages if args.max_stages is not None else DEFAULT_MAX_STAGES
    if (why := _chain_problem(chain, ds.models, max_stages, args.for_auto_tune)) is not None:
        print(f"cascade fit-scorer: --chain: {why} (models: {', '.join(ds.models)})", file=sys.stderr)
        return EXIT_BAD_INPUT
    if len(ds.train) < MIN_TRAIN_ROWS:  # as replay: a 5-fold cross-fit and a bootstrap need rows
        print(
            f"cascade fit-scorer: {args.dataset}: {len(ds.train)} train rows, at least {MIN_TRAIN_ROWS} are "
            "needed (rows need split 'train' or an id)",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    if args.for_auto_tune and max_stages < 2:
        print(
            "cascade fit-scorer: --for-auto-tune with --max-stages 1: auto_tune needs two stages or more",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        print(f"cascade fit-scorer: --out: {out} exists and is not a directory", file=sys.stderr)
        return EXIT_BAD_INPUT
    target = args.target_quality if args.target_quality is not None else 0.95
    margin_z = args.margin_z if args.margin_z is not None else 0.0
    single = None
    if args.for_auto_tune:
        # the fit the online run tunes: a chain whose last model meets the target, and where one model
        # alone does, the cheapest cascade of two or more (a one-stage cascade has nothing to tune)
        from app.replay.online import online_fit

        fitted, single = online_fit(ds, target, max_stages, margin_z, chain=chain)
        acc = {m: v["accuracy"] for m, v in fitted.single_models.items()}
        if single is not None and acc[fitted.models[-1]] < target * max(acc.values()) - 1e-12:
            # e.g. the best model is also the cheapest: every cascade of two or more starts with it and
            # ends at a weaker one, whose labels cannot hold the target (the online run tunes it anyway,
            # and its report names the single model)
            print(
                f"cascade fit-scorer: --for-auto-tune: {single} alone meets the target on the train rows, "
                "and no cascade of two or more models (cheapest first) ends at a model that does: serve "
                f"{single} alone (a plain fit-scorer writes that); there is nothing to tune",
                file=sys.stderr,
            )
            return EXIT_BAD_INPUT
    else:
        fitted = fit_cascade(
            ds.train, ds.models, target_quality=target, max_stages=max_stages, margin_z=margin_z, chain=chain
        )
    saved = fitted.save(out)
    files = [str(Path(saved[f"stage{k}"]).resolve()) for k in range(len(fitted.scorers))]
    router = (
        (str(Path(saved["router"]).resolve()), fitted.router_threshold)
        if "router" in saved and fitted.router_threshold is not None
        else None
    )
    aim = _tuner_target(ds, fitted, target) if args.for_auto_tune else None
    (out / "cascade.yaml").write_text(
        _snippet(
            fitted.models,
            fitted.thresholds,
            [fitted.stage_scorers(k, f) for k, f in enumerate(files)],
            router,
            aim.quality if aim else None,
            prices_of(args.price),
        ),
        encoding="utf-8",
    )
    tr: dict[str, Any] = fitted.train
    print(
        f"chain: {' -> '.join(fitted.models)}  thresholds: {', '.join(f'{t:.4f}' for t in fitted.thresholds)}"
    )
    aim_note = (
        f", aim {tr['aim']:.4f} x best with the search's optimism {tr['optimism']:.4f}"
        if tr.get("optimism")
        else ""
    )
    print(
        f"train ({tr['n']} rows): accuracy {tr['quality']:.4f} "
        f"(target {fitted.target_quality:.4f}{aim_note}, {'met' if fitted.feasible else 'NOT met'}), "
        f"${tr['cost_usd']:.3e}/request, "
        f"reach {', '.join(f'{x:.1%}' for x in tr['reach'])}"
    )
    for note in price_notes(ds.prices):
        print(f"note: {note}")
    costs = [fitted.single_models[m]["cost_usd"] for m in fitted.models]
    if chain is not None and any(b < a for a, b in itertools.pairwise(costs)):
        print(
            "note: --chain is not cheapest first on the train rows "
            f"({', '.join(f'{m} ${c:.3e}' for m, c in zip(fitted.models, costs, strict=True))}): "
            "a later stage costs less than an earlier one"
        )
    for k, f in enumerate(files):
        print(f"stage{k}: {f}")
    info = fitted.router_info
    print(f"router: {'chosen' if info.get('chosen') else 'not chosen'}: {info.get('reason', '')}")
    print(f"config snippet: {out / 'cascade.yaml'}")
    if single is not None:
        print(
            f"note: {single} alone meets the target on the train rows (a plain fit serves it alone); "
            "auto_tune needs two stages or more, so this is the cheapest cascade of two or more models"
        )
    if aim is not None:
        print(
            f"learning.target_quality: {aim.quality:.4f} (share of answers as good as {fitted.models[-1]}'s "
            f"that serves the target on the train rows; {aim.at_offline:.4f} at the fitted thresholds)"
        )
        if aim.quality > aim.at_offline:
            print(
                "note: on the train rows the cheapest thresholds with the fitted thresholds' label quality "
                "miss the target (the labels track correctness loosely here): auto_tune will escalate "
                "more than the fitted thresholds do"
            )
        elif aim.quality < aim.at_offline and aim.quality == aim.floor:
            print(
                "note: the fitted thresholds serve the first stage alone, and nothing is cheaper: the target "
                "is the label floor, under their label quality, so that auto_tune does not escalate on noise"
            )
    single = fitted.single_models
    last, best = fitted.models[-1], max(v["accuracy"] for v in single.values())
    if len(fitted.models) > 1 and single[last]["accuracy"] < target * best:
        print(
            f"note: the last stage ({last}) alone reaches {single[last]['accuracy'] / best:.3f} of the best "
            f"model on the train rows, under the target: with learning.auto_tune the tuner's labels (as good "
            f"as {last}'s answer) cannot hold it; --for-auto-tune fits a chain whose last model can"
        )
    return 0


def _chain_problem(
    chain: list[str] | None, models: list[str], max_stages: int, for_auto_tune: bool
) -> str | None:
    """What is wrong with ``--chain`` (None: nothing, or no --chain)."""
    if chain is None:
        return None
    if not chain:
        return "names no model"
    if missing := [m for m in chain if m not in models]:
        return f"not models of this dataset: {', '.join(missing)}"
    if twice := sorted({m for m in chain if chain.count(m) > 1}):
        return f"names {', '.join(twice)} more than once"
    if len(chain) > max_stages:
        return f"{len(chain)} models, more than --max-stages {max_stages} (at most 4)"
    if for_auto_tune and len(chain) < 2:
        return "one model: auto_tune needs two stages or more"
    return None


def _tuner_target(ds: Any, fitted: Any, target: float) -> Any:
    """What ``learning.target_quality`` (labels' terms) serves ``target`` (relative to the best single
    model) with this fit, on its train rows (``app.replay.online_stream.tuner_target``); None for one
    model."""
    from app.replay.online_stream import train_scores, tuner_target

    if len(fitted.models) < 2:
        return None
    scores = train_scores(fitted, ds.train)
    return tuner_target(ds.train, ds.models, fitted.models, scores, target, at=fitted.thresholds)


def _add_price(parser: Any) -> None:
    parser.add_argument(
        "--price",
        type=_price,
        action="append",
        metavar="MODEL=IN[,OUT]",
        help="USD per 1M input (and output) tokens of MODEL, for rows that record no cost_usd (their "
        "cost is estimated from the text lengths; default: a list price, else $1/$2); repeatable",
    )


def add_commands(sub: Any) -> None:
    """Register ``replay`` and ``fit-scorer`` on the ``cascade`` parser."""
    r = sub.add_parser(
        "replay",
        help="run a recorded dataset through the proxy's HTTP path and report accuracy vs cost",
        description="Fit (or calibrate) on the dataset's train rows, replay its test rows through the "
        "real proxy against a replay upstream serving the recorded answers and costs, and report.",
    )
    r.add_argument("dataset", help="JSONL in the format of shared/data/README.md")
    r.add_argument("--config", help="replay this config's cascade instead of fitting one")
    r.add_argument("--cascade", help="with --config: which cascade (default: 'default', else the first)")
    r.add_argument(
        "--map",
        action="append",
        metavar="UPSTREAM=MODEL",
        help="with --config: map an upstream to a dataset model",
    )
    r.add_argument(
        "--target-quality",
        type=_quality,
        help="accuracy target relative to the best single model on train (default 0.95 when fitting; "
        "with --config: calibrate the config's thresholds to it)",
    )
    r.add_argument(
        "--margin-z",
        type=_margin,
        default=0.0,
        help="keep Z bootstrap standard errors of quality above the target, on top of the search's measured "
        "optimism (default 0: the expected quality on new rows is the target)",
    )
    r.add_argument(
        "--max-stages",
        type=int,
        choices=(1, 2, 3, 4),
        help="most stages a fitted cascade may have (default 3; 4: chains of four too, a slower fit)",
    )
    r.add_argument("--json", action="store_true", help="print the report object as the last line of stdout")
    r.add_argument(
        "--plot", metavar="FILE.png", help="draw the cost/accuracy picture (needs the 'plot' extra)"
    )
    r.add_argument(
        "--resplits",
        type=_positive,
        default=1,
        metavar="K",
        help="fit and replay K splits: the dataset's own, then K-1 random stratified re-splits of the same "
        "sizes; report each and their spread (default 1)",
    )
    r.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the random re-splits; with --online, of the stream's order, shadow draws and feedback "
        "(default 0)",
    )
    r.add_argument(
        "--tolerance",
        type=_tolerance,
        default=0.01,
        help="a split meets the target when quality_vs_best >= target - tolerance (default 0.01)",
    )
    r.add_argument(
        "--pass-score",
        type=_number,
        metavar="X",
        help="graded datasets (a 'score' per answer, no 'correct'): an answer scoring at least X is correct",
    )
    _add_price(r)
    r.add_argument("--limit", type=_positive, help="replay only the first N test rows")
    r.add_argument("--concurrency", type=_positive, default=8, help="requests in flight (default 8)")
    r.add_argument("--work-dir", help="keep the fitted scorer files here (default: a temporary directory)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    o = r.add_argument_group(
        "online learning (--online)",
        "Stream the dataset's rows through a live proxy with learning.auto_tune: true and report how "
        "the thresholds converge (windows of 100 requests); see README, Learning.",
    )
    o.add_argument("--online", action="store_true", help="learn the thresholds online from a request stream")
    o.add_argument(
        "--start-threshold", type=_unit, help="every scored stage starts here (default: the fit's)"
    )
    o.add_argument("--shadow-rate", type=_unit, help="learning.shadow_rate (default 0.1)")
    o.add_argument("--feedback-rate", type=_unit, help="share of answers a user rates (default 0)")
    o.add_argument("--drift", metavar="OTHER.jsonl", help="switch to this dataset's rows half-way")
    o.add_argument("--passes", type=_positive, help="stream the dataset this many times (default 1)")
    o.add_argument("--sync-every", type=_positive, help="requests between tuner syncs (default 10)")
    o.add_argument(
        "--no-judge", action="store_true", help="no learning.judge: free-form answers get no label"
    )
    o.add_argument(
        "--replicas", type=_positive, help="proxies sharing one store, the stream split (default 1)"
    )
    o.add_argument(
        "--store", help="learning.store of the run, e.g. postgresql://... (default: a new SQLite file)"
    )
    o.add_argument(
        "--judge-model", help="dataset model whose price the replay judge charges (default: stage 0's)"
    )
    r.set_defaults(func=cmd_replay)

    f = sub.add_parser(
        "fit-scorer",
        help="fit learned scorer files (and thresholds) from a replay dataset's train rows, or from "
        "the labelled traces in the trace store (--from-store)",
        description="Fit one learned scorer per scored stage, and thresholds for them; writes the scorer "
        "files and a config snippet. From DATASET.jsonl: on its train rows, choosing the chain (or using "
        "--chain). With --from-store: on the labelled traces of a configured cascade, recorded with "
        "learning.store_text: true.",
    )
    f.add_argument("dataset", nargs="?", help="JSONL in the format of shared/data/README.md")
    f.add_argument("--out", required=True, help="directory for stage{k}.json, cascade.json, cascade.yaml")
    f.add_argument(
        "--from-store",
        action="store_true",
        help="fit from the labelled traces (with texts) in the configured learning.store",
    )
    f.add_argument(
        "--config", help="with --from-store: config file (default: $CASCADE_CONFIG or ./config.yaml)"
    )
    f.add_argument("--cascade", help="with --from-store: which cascade (default: 'default', else the first)")
    f.add_argument(
        "--min-labels",
        type=_positive,
        help="with --from-store: labelled answers each stage needs (default: learning.min_labels)",
    )
    f.add_argument("--chain", help="comma-separated dataset models, cheapest first (default: searched)")
    f.add_argument(
        "--target-quality",
        type=_quality,
        help="DATASET: relative to the best single model (default 0.95); --from-store: share of answers "
        "as good as the last stage's (default: learning.target_quality)",
    )
    f.add_argument("--margin-z", type=_margin, help="default 0 (--from-store: learning.margin_z)")
    f.add_argument("--max-stages", type=int, choices=(1, 2, 3, 4), help="default 3")
    f.add_argument(
        "--for-auto-tune",
        action="store_true",
        help="DATASET: a chain whose last model alone reaches the target on the train rows and that its "
        "thresholds reach (what learning.auto_tune can hold: its labels are 'as good as the last stage's "
        "answer'), and a learning section with the target_quality that serves the target",
    )
    f.add_argument(
        "--pass-score",
        type=_number,
        metavar="X",
        help="DATASET: graded answers (a 'score', no 'correct') scoring at least X are correct",
    )
    _add_price(f)
    f.set_defaults(func=cmd_fit_scorer)
