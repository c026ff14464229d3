"""``cascade calibrate``: fit per-stage thresholds from the labelled traces in the configured store.

For every cascade of two stages or more (or the one ``--cascade`` names): the cost/quality table of
candidate thresholds (the Pareto frontier), the current and the chosen setting. ``--write`` puts the
chosen thresholds into the config file in place: only the numbers change, every comment, quote and
indent stays (the values are located with ruamel.yaml's round-trip parser, then edited as text).
``--plot FILE.png`` draws the frontier with the current and chosen points (needs matplotlib: the
``plot`` extra). Exit codes: 0 done, 1 not enough labels, 2 config or usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.config import Config, ConfigError, LearningConfig
from app.errors import CascadeBaseError
from app.learning.calibration import Calibration, Rows, assemble, fit, to_unit
from app.learning.records import plan_fingerprint
from app.learning.store import Store, StoreError

EXIT_OK, EXIT_LABELS, EXIT_CONFIG = 0, 1, 2
MAX_TABLE_ROWS = 30
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


class CalibrateError(CascadeBaseError):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Result:
    cascade: str
    upstreams: list[str]
    rows: Rows
    calibration: Calibration | None  # None: not enough labels
    fit_version: int | None = None  # the current thresholds are auto_tune's fit of this version


def add_commands(sub: Any) -> None:
    """Register the learning subcommands on the ``cascade`` parser."""
    c = sub.add_parser(
        "calibrate",
        help="fit stage thresholds from the labelled traces in the trace store",
        description="Choose per-stage thresholds that minimise expected cost subject to quality >= target "
        "(quality = share of answers as good as the last stage's), from labelled traces.",
    )
    c.add_argument("--config", help="config file (default: $CASCADE_CONFIG or ./config.yaml)")
    c.add_argument("--target-quality", type=float, help="default: learning.target_quality")
    c.add_argument("--cascade", help="only this cascade")
    c.add_argument("--min-labels", type=int, help="labelled requests needed (default: learning.min_labels)")
    c.add_argument("--write", action="store_true", help="write the chosen thresholds into the config file")
    c.add_argument("--plot", metavar="FILE.png", help="draw the cost/quality curve with the chosen point")
    c.set_defaults(func=cmd_calibrate)


def cmd_calibrate(args: argparse.Namespace) -> int:
    try:
        return _calibrate(args)
    except CalibrateError as exc:
        print(f"calibrate: {exc}", file=sys.stderr)
        return exc.code
    except ConfigError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return EXIT_CONFIG


def _calibrate(args: argparse.Namespace) -> int:
    from app.settings import load_effective

    path, cfg = load_effective(args.config, {})
    lcfg = cfg.learning
    if lcfg is None:
        raise CalibrateError(
            f"{path}: no 'learning' section, so there is no trace store to read", EXIT_CONFIG
        )
    target = args.target_quality if args.target_quality is not None else lcfg.target_quality
    if not 0 < target <= 1:
        raise CalibrateError("--target-quality must be in (0, 1]", EXIT_CONFIG)
    names = [n for n, c in cfg.cascades.items() if len(c.stages) > 1]
    if args.cascade is not None:
        if args.cascade not in names:
            raise CalibrateError(
                f"--cascade: no cascade '{args.cascade}' with two stages or more", EXIT_CONFIG
            )
        names = [args.cascade]
    if not names:
        raise CalibrateError(f"{path}: no cascade has a scored stage; nothing to calibrate", EXIT_CONFIG)
    if args.plot:
        _check_matplotlib(args.plot)
    min_rows = args.min_labels if args.min_labels is not None else lcfg.min_labels
    db = lcfg.store.removeprefix("sqlite:///")
    if lcfg.store.startswith("sqlite:///") and not Path(db).exists():
        raise CalibrateError(
            f"no trace store at {db}: serve with 'learning' enabled first, so requests and labels are "
            "recorded",
            EXIT_LABELS,
        )
    results = asyncio.run(_collect(cfg, lcfg, names, target, min_rows))
    short = [r for r in results if r.calibration is None]
    for r in results:
        _report(r, target, lcfg.margin_z, min_rows)
    fitted = [r for r in results if r.calibration is not None]
    if args.plot and fitted:
        _plot(fitted[0], args.plot, target)
        print(f"plot: {args.plot}")
    if args.write and fitted:
        write_thresholds(path, {r.cascade: r.calibration.thresholds for r in fitted if r.calibration})
        print(f"wrote the chosen thresholds to {path}")
    if short:
        print(
            f"calibrate: not enough labelled requests for {', '.join(r.cascade for r in short)} "
            f"(need {min_rows}; collect more with learning.shadow_rate, or POST /v1/feedback)",
            file=sys.stderr,
        )
        return EXIT_LABELS
    return EXIT_OK


async def _collect(
    cfg: Config, lcfg: LearningConfig, names: Sequence[str], target: float, min_rows: int
) -> list[Result]:
    store = Store(lcfg.store)
    out = []
    try:
        await store.open()
        for name in names:
            cc = cfg.cascades[name]
            data = await store.labelled(name, plan_fingerprint(cfg, cc))
            rows = assemble(data, len(cc.stages), pass_score=lcfg.user_pass_score)
            current = [s.threshold for s in cc.stages[:-1] if s.threshold is not None]
            latest = await store.latest_fit(name, plan_fingerprint(cfg, cc)) if lcfg.auto_tune else None
            if latest is not None and len(latest.thresholds) == len(current):
                current = list(latest.thresholds)  # what serves now: auto_tune's newest fit, not the file
            cal = None
            if rows.n >= min_rows and rows.n > 0:
                cal = fit(
                    rows,
                    target,
                    margin_z=lcfg.margin_z,
                    bounds=lcfg.threshold_bounds,
                    current=current,
                    honest=True,
                )
            version = latest.version if latest is not None and list(latest.thresholds) == current else None
            out.append(Result(name, [s.upstream for s in cc.stages], rows, cal, version))
    except StoreError as exc:
        raise CalibrateError(str(exc), EXIT_LABELS) from exc
    finally:
        await store.close()
    return out


def _fmt_t(ts: Sequence[float]) -> str:
    return " ".join(f"{t:.4f}" for t in ts)


def _report(r: Result, target: float, margin_z: float, min_rows: int) -> None:
    rows = r.rows
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(rows.kinds.items())) or "none"
    print(f"cascade '{r.cascade}': {' -> '.join(r.upstreams)}")
    print(f"  labelled requests: {rows.n} ({kinds}); need {min_rows}")
    cal = r.calibration
    if cal is None:
        return
    print(
        f"  target quality {target:.3f} (share of answers as good as the last stage's; "
        f"margin {margin_z:g} SE, plus the search's measured optimism {cal.optimism:.4f})"
    )
    table = list(cal.search.table)

    def shown(e: Any) -> tuple[Any, ...]:  # what a line of the table says
        return (_fmt_t(to_unit(e.thresholds, rows, (0.0, 1.0))), f"{e.quality:.4f}", f"{e.cost:.8f}")

    best = next((e for e in table if shown(e) == shown(cal.search.best)), cal.search.best)
    if best not in table:  # the honest choice may sit off the frontier of the rows alone
        table = sorted([*table, best], key=lambda e: (e.cost, -e.quality))
    if len(table) > MAX_TABLE_ROWS:
        step = (len(table) - 1) / (MAX_TABLE_ROWS - 1)
        keep = {round(i * step) for i in range(MAX_TABLE_ROWS)}
        table = [e for i, e in enumerate(table) if i in keep or e == best]
    width = max(10, 7 * len(cal.thresholds))
    print(f"  {'thresholds':<{width}}  quality  +-se     $/request     reach per stage")
    for e in table:
        mark = " <- chosen" if e == best else ""
        unit = to_unit(e.thresholds, rows, (0.0, 1.0))  # the chosen one is then held within the bounds
        reach = " ".join(f"{x:.3f}" for x in e.reach)
        print(
            f"  {_fmt_t(unit):<{width}}  {e.quality:.4f}   {e.quality_se:.4f}   {e.cost:.8f}    {reach}{mark}"
        )
    if cal.current is not None:
        c = cal.current
        src = f" (auto_tune's fit v{r.fit_version}; the file says otherwise)" if r.fit_version else ""
        print(f"  current   {_fmt_t(c.thresholds)}: quality {c.quality:.4f}, ${c.cost:.8f}/request{src}")
    ch = cal.chosen
    print(f"  chosen    {_fmt_t(cal.thresholds)}: quality {ch.quality:.4f}, ${ch.cost:.8f}/request")
    if not cal.search.feasible:
        print("  warning: no setting reaches the target on these labels; the most accurate one is chosen")


def _check_matplotlib(path: str) -> None:
    from app.plotting import plot_problem

    if (problem := plot_problem(path)) is not None:
        raise CalibrateError(problem, EXIT_CONFIG)


def _plot(r: Result, path: str, target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cal = r.calibration
    assert cal is not None
    table = cal.search.table
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([e.cost for e in table], [e.quality for e in table], "o-", ms=3, label="candidate thresholds")
    ax.axhline(target, ls="--", color="grey", lw=1, label=f"target {target:.2f}")
    if cal.current is not None:
        ax.plot([cal.current.cost], [cal.current.quality], "s", color="black", label="current")
    ax.plot([cal.chosen.cost], [cal.chosen.quality], "*", ms=14, color="red", label="chosen")
    ax.set_xlabel("expected cost per request (USD)")
    ax.set_ylabel("quality (share as good as the last stage)")
    ax.set_title(f"cascade '{r.cascade}': {' -> '.join(r.upstreams)} ({r.rows.n} labelled requests)")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_thresholds(path: str, updates: dict[str, tuple[float, ...]]) -> None:
    """Replace ``cascades.NAME.stages[k].threshold`` values in the YAML file, touching nothing else."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    text = Path(path).read_bytes().decode("utf-8")  # line endings as they are (CRLF stays CRLF)
    try:
        data = YAML(typ="rt").load(text)
    except YAMLError as exc:
        raise CalibrateError(f"{path}: cannot parse it to write thresholds", EXIT_CONFIG) from exc
    lines = text.splitlines(keepends=True)
    edits: list[tuple[int, int, str, str]] = []
    for name, thresholds in updates.items():
        stages = data["cascades"][name]["stages"]
        for k, t in enumerate(thresholds):
            where = f"cascades.{name}.stages[{k}].threshold"
            stage = stages[k]
            if "threshold" not in stage:
                raise CalibrateError(f"{where}: not in {path}; nothing written", EXIT_CONFIG)
            shared = _aliased(data["cascades"], name, stage)
            if shared is not None:
                raise CalibrateError(
                    f"{where}: the stage is shared with cascades.{shared} through a YAML anchor; writing it "
                    f"would change both; nothing written",
                    EXIT_CONFIG,
                )
            line, col = stage.lc.value("threshold")
            edits.append((line, col, f"{t:.4f}".rstrip("0").rstrip(".") or "0", where))
    for line, col, value, where in sorted(edits, reverse=True):
        m = _NUMBER.match(lines[line], col)
        if m is None:
            raise CalibrateError(f"{where}: not a plain number in {path}; nothing written", EXIT_CONFIG)
        lines[line] = lines[line][:col] + value + lines[line][m.end() :]
    _replace(path, "".join(lines))


def _aliased(cascades: Any, name: str, stage: Any) -> str | None:
    """Another cascade whose stages hold this very stage (a YAML alias of it, or of their list)."""
    for other, c in cascades.items():
        if other != name and any(s is stage for s in c.get("stages") or ()):
            return str(other)
    return None


def _replace(path: str, text: str) -> None:
    """Write atomically, keeping the file's mode; through a symlink, the file it points to (a
    Kubernetes ConfigMap mount, a dotfile link) is replaced, not the link."""
    p = Path(path).resolve()
    mode = p.stat().st_mode & 0o7777
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
