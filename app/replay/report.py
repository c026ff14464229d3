"""What `cascade replay` prints: the progress bar (stderr), the human table, the learned-scorer timing."""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TextIO

from app.config import LearnedScorer as LearnedConfig
from app.replay.dataset import MAX_MISSING_SHARE, price_notes, savings_vs_best

if TYPE_CHECKING:
    from app.replay.configure import ReplayPlan
    from app.replay.runner import ReplayResult, RowOutcome


class ProgressBar:
    """``[#####.....]  120/380  31%  42 req/s`` on stderr; on a non-terminal one line per 10 %."""

    def __init__(self, label: str, stream: TextIO | None = None, width: int = 30) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.width = width
        self.tty = self.stream.isatty()
        self.t0 = time.perf_counter()
        self._last_decile = -1

    def __call__(self, done: int, total: int) -> None:
        if done == 0:
            self.t0 = time.perf_counter()
            return
        frac = done / total if total else 1.0
        rate = done / max(1e-9, time.perf_counter() - self.t0)
        fill = int(frac * self.width)
        line = (
            f"{self.label} [{'#' * fill}{'.' * (self.width - fill)}] {done}/{total} "
            f"{frac:4.0%} {rate:5.1f} req/s"
        )
        if self.tty:
            self.stream.write("\r" + line + ("\n" if done == total else ""))
            self.stream.flush()
        else:
            decile = int(frac * 10)
            if decile != self._last_decile:
                self._last_decile = decile
                self.stream.write(line + "\n")
                self.stream.flush()


def _pct(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]


def time_learned_scorers(plan: ReplayPlan, outcomes: Sequence[RowOutcome]) -> dict[str, float]:
    """Time every ``learned`` scorer on exactly the answers the replay scored (load once, then per call).

    Returns ms figures per scorer call and per request (all learned scorers of the stages it scored),
    after one warm-up call per scorer; empty when the cascade has no learned scorer.
    """
    from app.scoring.model import LogisticModel

    stages = plan.config.cascades[plan.cascade].stages
    learned = [
        [LogisticModel.load(sc.model) for sc in st.scorers if isinstance(sc, LearnedConfig)]
        for st in stages[:-1]
    ]
    if not any(learned):
        return {}
    for scorers in learned:  # the first call compiles regexes and fills caches, as a server's first request
        for scorer in scorers:
            scorer.score("warm up: what is 1 + 1?", "1 + 1 = 2. The answer is 2.", ["2"])
    calls: list[float] = []
    per_request: list[float] = []
    for o in outcomes:
        if o.error is not None:
            continue
        previous: list[str] = []
        total = 0.0
        for k in range(min(o.reached, len(stages) - 1)):
            answer = o.row.answers[plan.stages[k]].answer
            for scorer in learned[k]:
                t0 = time.perf_counter()
                scorer.score(o.row.prompt, answer, previous)
                dt = (time.perf_counter() - t0) * 1000
                calls.append(dt)
                total += dt
            previous.append(answer)
        per_request.append(total)
    if not calls:
        return {}
    return {
        "calls": float(len(calls)),
        "call_ms_mean": statistics.fmean(calls),
        "call_ms_p50": _pct(calls, 0.5),
        "call_ms_p99": _pct(calls, 0.99),
        "call_ms_max": max(calls),
        "request_ms_mean": statistics.fmean(per_request),
        "request_ms_p50": _pct(per_request, 0.5),
        "request_ms_p99": _pct(per_request, 0.99),
    }


def _usd(x: float) -> str:
    return f"{x:.3e}"


def _equal_cost(r: dict[str, Any]) -> str:
    """Whether a single model is at least as accurate for no more money (the cascade is dominated)."""
    cheaper = {m: v for m, v in r["single_models"].items() if v["cost_usd"] <= r["cost_usd"]}
    if not cheaper:
        return "at equal cost: every single model costs more than the cascade"
    m = max(cheaper, key=lambda k: (cheaper[k]["accuracy"], -cheaper[k]["cost_usd"]))
    v = cheaper[m]
    gap = r["accuracy"] - v["accuracy"]
    verdict = "dominated" if gap < 0 or (gap == 0 and v["cost_usd"] < r["cost_usd"]) else "not dominated"
    return (
        f"at equal cost: best single model costing no more is {m} ({v['accuracy']:.4f}); "
        f"cascade {gap:+.4f} -> {verdict}"
    )


_BASELINES = (
    ("agreement", "agreement rule (same chain)"),
    ("random", "random at the same reach"),
    ("oracle_chain", "oracle within the chain"),
    ("oracle_all", "oracle over every model"),
    ("learned_at_agreement_quality", "learned, swept to the rule's quality"),
)


def savings_text(x: float | None, width: int = 0) -> str:
    """A savings share, or "n/a" where there is none (the best model costs nothing: ``savings_vs_best``)."""
    return f"{'n/a':>{width}}" if x is None else f"{x:{width}.1%}"


def _baseline_lines(r: dict[str, Any]) -> list[str]:
    b = r.get("baselines")
    if not b:
        return []
    out = ["", f"  {'against':34}  {'x best acc':>10}  {'savings':>8}"]
    out.append(
        f"  {'CASCADE (learned)':34}  {r['quality_vs_best']:10.3f}  {savings_text(r['savings_vs_best'], 8)}"
    )
    for key, label in _BASELINES:
        v = b.get(key)
        if v is None:
            out.append(f"  {label:34}  {'n/a':>10}  {'n/a':>8}")
            continue
        extra = f"   ({' -> '.join(v['chain'])})" if key == "agreement" else ""
        out.append(
            f"  {label:34}  {v['quality_vs_best']:10.3f}  {savings_text(v['savings_vs_best'], 8)}{extra}"
        )
    return out


def _calibration_lines(r: dict[str, Any]) -> list[str]:
    cal = r.get("calibration")
    if not cal:
        return []
    out = ["", "learned scorers on the test rows (probability the answer is right, against right):"]
    for c in cal:
        if not c["n"]:
            continue
        out.append(
            f"  stage {c['stage']} {c['model']}: mean {c['mean_score']:.3f}, right {c['accuracy']:.3f}; "
            f"calibration error {c['ece']:.3f} (a calibrated score: {c['ece_if_calibrated']:.3f} by chance), "
            f"Brier {c['brier']:.3f}, AUC {c['auc']:.3f}"
        )
    return out


def _resplit_lines(r: dict[str, Any]) -> list[str]:
    splits = r.get("resplits") or []
    if len(splits) < 2:
        return []
    target = r.get("target_quality")
    out = [
        "",
        f"re-splits ({len(splits)}): quality vs best min {r['quality_vs_best_min']:.3f} "
        f"mean {r['quality_vs_best_mean']:.3f}; savings mean {savings_text(r['savings_vs_best_mean'])} "
        f"min {savings_text(r['savings_vs_best_min'])}"
        + (
            f"; target {target:g} (-{r['target_tolerance']:g}) met on {r['target_met_share']:.0%}"
            if target is not None and r.get("target_met_share") is not None
            else ""
        ),
    ]
    se, miss = r.get("quality_vs_best_se_mean"), r.get("test_noise_miss_chance")
    if se is not None and miss is not None and target is not None:
        out.append(
            f"  the test rows alone move a split's quality by {se:.3f} (standard error): a cascade exactly "
            f"on target lands under {target - r['target_tolerance']:g} on {miss:.0%} of splits by chance"
        )
        fit_se, both = r.get("fit_quality_vs_best_se_mean"), r.get("noise_miss_chance")
        if fit_se is not None and both is not None:
            out.append(
                f"  and the train rows' luck moves the fit's aim by {fit_se:.3f}: with both, {both:.0%} of "
                "splits by chance"
            )
    out += [
        f"  {'split':>7}  {'quality':>7}  {'(se)':>7}  {'savings':>8}  {'agreement q / sav':>18}  "
        f"{'random q / sav':>15}  chain",
    ]
    for e in splits:
        ag = e["baselines"].get("agreement")
        rd = e["baselines"].get("random")
        ag_s = f"{ag['quality_vs_best']:.3f} / {savings_text(ag['savings_vs_best'], 6)}" if ag else "n/a"
        rd_s = f"{rd['quality_vs_best']:.3f} / {savings_text(rd['savings_vs_best'], 6)}" if rd else "n/a"
        name = "dataset" if e["seed"] is None else f"seed {e['seed']}"
        se_s = "n/a" if e.get("quality_vs_best_se") is None else f"{e['quality_vs_best_se']:.3f}"
        out.append(
            f"  {name:>7}  {e['quality_vs_best']:7.3f}  {se_s:>7}  {savings_text(e['savings_vs_best'], 8)}  "
            f"{ag_s:>18}  {rd_s:>15}  " + " -> ".join(e["stages"])
        )
    return out


def format_table(result: ReplayResult) -> str:
    """The human report (several lines, no trailing newline)."""
    r: dict[str, Any] = result.report
    n = r["n_test"]
    bs = r["best_single"]
    lines = [
        f"cascade replay: {r['dataset']}  (fit on {r['n_train']} train rows, report on {n} test rows)",
        "cascade: "
        + " -> ".join(r["stages"])
        + (f"   thresholds {', '.join(f'{t:.4f}' for t in r['thresholds'])}" if r["thresholds"] else ""),
    ]
    if result.feasible is False:
        lines.append("note: no chain met the quality target on train; this is the most accurate one")
    lines += [f"note: {x}" for x in result.plan.notes]
    fit_se, tol = (r.get("fit") or {}).get("quality_vs_best_se"), r.get("target_tolerance")
    if fit_se is not None and tol and fit_se > 2 * tol:
        lines.append(
            f"note: the fit's own standard error ({fit_se:.3f}, from {r['n_train']} train rows) is more than "
            f"twice the tolerance ({tol:g}): the train rows' luck alone can put a split that far off the "
            "target; more labelled rows narrow it, or --margin-z 1 aims one standard error higher"
        )
    lines += [f"note: {x}" for x in price_notes(r.get("data", {}).get("prices") or {})]
    left_out = r.get("data", {}).get("models_left_out") or []
    if left_out:
        lines.append(f"note: left out (not recorded in every row): {', '.join(left_out)}")
    if r.get("data", {}).get("rows_left_out"):
        lines.append(
            f"note: {r['data']['rows_left_out']} rows left out: they lack a model that nearly every row "
            f"records (at most {MAX_MISSING_SHARE:.0%} of the rows; more, and the model is left out)"
        )
    w = max(24, *(len(m) for m in r["single_models"]))
    head = (
        f"  {'':{w}}  {'accuracy':>8}  {'$/request':>10}  {'total $':>10}  {'x best acc':>10}  {'savings':>8}"
    )
    lines += ["", head]

    def row(label: str, acc: float, cost: float) -> str:
        q = acc / bs["accuracy"] if bs["accuracy"] else 0.0
        sv = savings_vs_best(cost, bs["cost_usd"])
        return (
            f"  {label:{w}}  {acc:8.4f}  {_usd(cost):>10}  {cost * n:10.4f}  {q:10.3f}  {savings_text(sv, 8)}"
        )

    lines.append(row("CASCADE", r["accuracy"], r["cost_usd"]))
    lines.append(row("oracle (perfect router)", r["oracle"]["accuracy"], r["oracle"]["cost_usd"]))
    for m, v in sorted(r["single_models"].items(), key=lambda kv: kv[1]["cost_usd"]):
        mark = " *" if m == bs["model"] else ""
        lines.append(row(m + mark, v["accuracy"], v["cost_usd"]))
    lines += [
        f"  (* best single model: {bs['model']})",
        "",
        "reach per stage: "
        + "  ".join(f"{m} {x:.1%}" for m, x in zip(r["stages"], r["escalation_rate"], strict=True)),
        f"savings vs best single: {savings_text(r['savings_vs_best'])}   quality vs best single: "
        f"{r['quality_vs_best']:.3f}"
        + (
            f" (standard error {r['quality_vs_best_se']:.3f} from the test rows alone)"
            if r.get("quality_vs_best_se") is not None
            else ""
        ),
    ]
    fit = r.get("fit")
    if fit:
        lines.append(
            f"the fit on its {fit['n_train']} train rows: quality vs best {fit['quality_vs_best']:.3f}, "
            f"{fit['expected_quality_vs_best']:.3f} expected on new rows (less the search's optimism "
            f"{fit['optimism']:.3f})"
            + (
                f", standard error {fit['quality_vs_best_se']:.3f} from the train rows alone"
                if fit.get("quality_vs_best_se") is not None
                else ""
            )
        )
    lines.append(_equal_cost(r))
    rt = r.get("router")
    if rt:
        skipped = "  ".join(
            f"{m} {x:.1%}" for m, x in zip(r["stages"], rt.get("skipped_share", []), strict=False)
        )
        lines.append(
            f"router (route-then-cascade): {'chosen' if rt.get('chosen') else 'not chosen'}"
            + (f": {rt['reason']}" if rt.get("reason") else "")
            + (f"; skipped per stage: {skipped}" if rt.get("chosen") else "")
        )
    lines += _baseline_lines(r)
    lines += _calibration_lines(r)
    lines += _resplit_lines(r)
    ok = n - len(result.errors)
    rate = n / result.elapsed_s if result.elapsed_s > 0 else 0.0
    lines.append(
        f"requests: {ok} ok, {len(result.errors)} failed through the proxy in {result.elapsed_s:.1f} s "
        f"({rate:.0f} req/s); fit/calibrate {result.fit_s:.1f} s"
    )
    t = result.scorer_timing
    if t:
        lines.append(
            f"learned scorer: {t['call_ms_mean']:.3f} ms mean, p50 {t['call_ms_p50']:.3f}, "
            f"p99 {t['call_ms_p99']:.3f}, max {t['call_ms_max']:.3f} per call ({int(t['calls'])} calls); "
            f"per request p50 {t['request_ms_p50']:.3f} ms, p99 {t['request_ms_p99']:.3f} ms"
        )
    for e in result.errors[:5]:
        lines.append(f"failed: row {e.row.id}: {e.error}")
    return "\n".join(lines)
