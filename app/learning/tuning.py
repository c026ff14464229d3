"""Online threshold tuning (``learning.auto_tune: true``), the same on every replica.

Every ``sync_every_s`` (and whenever labels were stored here) each cascade is synced with the store:

1. adopt the newest fit in the store when it is newer than the one in force (another replica made it);
2. read what is new in the store (``History``: new traces and labels only, never the whole history);
3. when ``tune_every`` labels arrived since that fit (or any label, while fewer than ``min_labels``
   requests were labelled at the last look) and at least ``min_labels`` requests are labelled,
   fit again from the newest ``window_labels`` labelled requests, weighted by decay
   (``half_life_labels``) and realised labelling rates (``calibration.fit``: deterministic, so replicas
   fitting the same labels agree; with ``optimism_correction`` the choice also pays the optimism of
   picking the cheapest of many threshold combinations, as offline fits do), move each threshold
   towards the fit by at most ``max_step`` (or up to ``max_step_up`` when the thresholds in force are
   estimated to miss the target: towards escalating, or the other way when escalating alone would still
   miss, ``next_thresholds``; a quality problem is fixed at once, saving money waits for evidence; a fix
   leaving almost nothing to the last stage does not leave a stage serving on a handful of its own
   labels, ``unproven_stages``, nor does any fit where the spend caps starve that stage; thresholds in
   force that meet the target stay when the fit's choice would cost more), within
   ``threshold_bounds``, and store it as version ``n + 1``. When another replica stored version
   ``n + 1`` first, the insert does nothing and that fit is adopted instead: one sequence of versions
   for the fleet, every replica ends on the newest.

Between fits, every sync also looks for a shift of the traffic under the thresholds in force (a stage
suddenly answering a far larger share of the requests, ``shifted_stages``): that stage escalates at once
and the fits start over from the shift, without waiting for labels; and for the first stage's scores
distributed unlike before (``first_scores_moved``): new traffic, which every scored stage escalates for.

Applying a fit changes ``Plan.thresholds`` in place (requests starting afterwards use it), sets the
``cascade_threshold`` gauge and logs before/after with the evidence. Fitting runs in a thread.
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import functools
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from operator import attrgetter, itemgetter
from typing import Any, NamedTuple

import numpy as np

from app.cascade.plan import Plan
from app.config import LearningConfig
from app.learning.calibration import ALWAYS, Calibration, Entry, Rows, fit, guard, weigh
from app.learning.history import History
from app.learning.store import Fit, Store, StoreError
from app.learning.thresholds import evaluate_cascade, served_stages

log = logging.getLogger("cascade.learning")


@dataclass(slots=True)
class PlanMeta:
    """What a record needs to know about the plan it ran on, captured when the request finished."""

    name: str
    plan: Plan
    fingerprint: str
    n_stages: int
    config_thresholds: tuple[float, ...]  # the scored stages' thresholds from config.yaml
    fit_version: int = 0
    compare: str = "auto"  # how its labels are decided (app.learning.labels)


DRIFT_Z = 4.0  # standard errors between the newest labels' quality and the older ones' that mean a change
DRIFT_MIN = 0.01  # ... and at least this much quality (tiny differences matter to no one)
DRIFT_SCALES = 4  # the newest drift_labels, then 2, 4 and 8 times as many, each against the ones before


@dataclass(slots=True)
class Change:
    since_seq: int
    evidence: dict[str, Any]


def changed(
    entries: Sequence[Entry],
    population: Sequence[tuple[int, int]],
    n_stages: int,
    thresholds: Sequence[float],
    cfg: LearningConfig,
) -> Change | None:
    """Whether the quality at ``thresholds`` on the newest labelled requests differs from the older
    ones' by ``DRIFT_Z`` standard errors and ``DRIFT_MIN`` (either way): an abrupt change (new traffic, a
    new model behind an upstream), which decay alone would take thousands of labels to follow. Then the
    fit starts over from the newest labels.

    The newest ``drift_labels`` labelled requests are compared with the ones before them, and so are
    the newest 2, 4 and 8 times as many (``DRIFT_SCALES``, while at least as many older ones are
    there); of the scales that find a change, the one with the largest ``z`` says where it began. The
    quality at the thresholds in force is seen through the labels of the answers they accept: shadow
    labels, a tenth of the accepted requests at a 10 % rate, so 200 labelled requests may hold only
    10-20 of them. The short scale sees a large change soon; the longer ones see smaller changes.

    The test runs at every fit (every ``tune_every`` labels), so its false alarms add up over a long
    run, and each one throws the history away. ``bench/drift.py`` (steady streams of ``sampled`` in
    ``tests/learning/learning_helpers.py``: half the requests accepted, 68 % of those right, a 10 %
    shadow rate, a test every 20 labelled requests; 10 streams, 110,000 labelled requests): the newest
    200 alone at 3 standard errors fired 7 times (the test before, whose standard error left out the
    stage mix, 9), often twice in a row, the second time the other way (the alarm's own lucky window
    had become the history); at 4 over the four scales, never (over 20 streams, once). Changes seen
    (median labelled requests after them, 10 streams each): quality 24 points down (the accepted
    answers 20 % right) after 328 (181 at 3, one scale); 14 points down (40 % right) after 638 (648, and
    missed in 2 of 10 within 4,000 requests); 9 points down, in 3 of 10 (4 at 3).

    The standard error is the one of "no change" (:func:`pooled_se`): each group of rows the thresholds
    serve from one stage has the label rate of both samples together. Each sample's own residuals
    would call 10 shadow labels that all happen to be right a certainty; at a 10 % shadow rate the
    newest 200 labelled requests hold about that many, and such false alarms threw a stationary
    stream's history away (GSM8K: 10 of 10 right against 0.68 before, z = 5.2; the refit on the
    newest labels alone settled 6 points under the target)."""
    n = cfg.drift_labels
    if not n or len(entries) < 2 * n or not thresholds:
        return None
    scales = [n << k for k in range(DRIFT_SCALES) if 2 * (n << k) <= len(entries)]
    # The older side of every scale is a run of the same rows: weighed once (decay is relative, so the
    # rows before each cut weigh as they would alone, up to a factor the comparison normalises away).
    span = entries[-(cfg.window + scales[-1]) :] if cfg.window else entries
    first = bisect.bisect_left(population, span[0].seq, key=itemgetter(0))
    every = weigh(span, n_stages, population[first:], half_life=cfg.half_life_labels)
    best: tuple[float, int, int, float, float] | None = None
    for m in scales:
        cut = entries[-m].seq
        at = bisect.bisect_left(population, cut, key=itemgetter(0))
        new = weigh(entries[-m:], n_stages, population[at:])
        lo = max(0, every.n - m - cfg.window) if cfg.window else 0  # the older ones: window's worth
        old = _slice(every, lo, every.n - m)
        since = bisect.bisect_left(population, span[lo].seq, key=itemgetter(0))
        q_new, q_old, se = pooled_se(new, old, thresholds, (len(population) - at, at - since))
        diff = q_new - q_old
        z = diff / se if se > 0 else 0.0
        if abs(z) >= DRIFT_Z and abs(diff) >= DRIFT_MIN and (best is None or abs(z) > abs(best[0])):
            best = (z, cut, m, q_new, q_old)
    if best is None:
        return None
    z, cut, m, q_new, q_old = best
    evidence = {
        "quality_newest": round(q_new, 4),
        "quality_before": round(q_old, 4),
        "z": round(z, 2),
        "labelled_newest": m,
    }
    return Change(cut, evidence)


def _slice(rows: Rows, lo: int, hi: int) -> Rows:
    return dataclasses.replace(
        rows,
        scores=rows.scores[lo:hi],
        correct=rows.correct[lo:hi],
        cost=rows.cost[lo:hi],
        weights=rows.weights[lo:hi],
    )


def _served(rows: Rows, thresholds: Sequence[float]) -> tuple[Any, Any, Any]:
    """Per row: the label of the answer ``thresholds`` serve, the stage serving it, the row's weight
    (normalised to sum 1). The earliest stage whose score reaches its threshold serves."""
    n = rows.correct.shape[0]
    stage = served_stages(rows.scores, thresholds)
    total = float(rows.weights.sum())
    w = rows.weights / total if total > 0 else np.zeros(n)
    return rows.correct[np.arange(n), stage], stage, w


def pooled_se(
    a: Rows, b: Rows, thresholds: Sequence[float], requests: tuple[int, int] = (0, 0)
) -> tuple[float, float, float]:
    """Quality of ``a`` and ``b`` at ``thresholds`` and the standard error of their difference if
    nothing changed. Two parts: the labels (per serving stage, the label rate of both samples pooled,
    p (1 - p) per row; a stage seen on few labels has its rate drawn towards the pooled quality by one
    label's worth, so that 2 labels both right are not a certainty) and the mix (which stage serves a
    request is chance too: each sample's share of a stage comes from the ``requests`` it spans,
    labelled or not, 0: its rows, and the stages' rates differ). Without the mix, an early stage's
    answers that were all wrong and seen in the newest 200 only made a "change" with a standard error
    of 0 (z = -50,834,157 in a WinoGrande -> GSM8K online run)."""
    ga, sa, wa = _served(a, thresholds)
    gb, sb, wb = _served(b, thresholds)
    stages = []
    for k in set(sa.tolist()) | set(sb.tolist()):
        ma, mb = sa == k, sb == k
        den = float(wa[ma].sum() + wb[mb].sum())
        if den <= 0:
            continue
        w2 = float((wa[ma] ** 2).sum()) + float((wb[mb] ** 2).sum())
        stages.append((den / 2, w2, float(wa[ma] @ ga[ma] + wb[mb] @ gb[mb]) / den, den * den / w2))
    q = sum(share * p for share, _, p, _ in stages)
    var = 0.0
    for _, w2, p, n_eff in stages:
        shrunk = (n_eff * p + q) / (n_eff + 1.0)
        var += w2 * max(0.0, shrunk * (1.0 - shrunk))
    between = sum(share * (p - q) ** 2 for share, _, p, _ in stages)
    var += between * sum(1.0 / (n or rows.n) for n, rows in zip(requests, (a, b), strict=True) if n or rows.n)
    return float(wa @ ga), float(wb @ gb), math.sqrt(var)


SHIFT_REQUESTS = 50  # the newest requests whose accept shares are compared with the ones before them
SHIFT_SCALES = 3  # ... the newest 50, then 100 and 200 (a smaller rise shows on more requests)
SHIFT_BEFORE = 100  # ... labelled requests before them, at least
SHIFT_P = 1e-5  # ... a rise this unlikely at the share before (binomial tail, the share one SE higher)
SHIFT_MIN = 0.2  # ... and of at least this share of the requests
HEADING_DOWN = 0.02  # a fit choosing a threshold this much lower is tested there too (``changed``)


def shifted_stages(
    population: Sequence[tuple[int, int]],
    thresholds: Sequence[float],
    cfg: LearningConfig,
    entries: Callable[[], Sequence[Entry]],
    n_stages: int,
    since: int = 0,
) -> dict[str, list[float]]:
    """The first scored stage through which a much larger share of the newest ``SHIFT_REQUESTS``
    requests (or 2 or 4 times as many, ``SHIFT_SCALES``) was answered (accepted by it or an earlier
    stage) than ``thresholds`` answer there of the requests before them: {stage: [share before, share
    now, newest requests]}, or {}. The share before is estimated from the labelled requests before them
    (up to 40 times ``SHIFT_REQUESTS``, weighted by their realised labelling rates, as fits weigh them)
    at ``thresholds``, whatever thresholds served them then: the fits move thresholds all the time, and
    where scores are packed (WinoGrande's middle stage: 15 % of the requests within 0.008) a small move
    changes the share more than any shift. ``entries`` is called only when the newest requests' share is
    well above the one the requests before were served at. Only when ``thresholds`` served all of the
    newest (put in force before the request after ``since``): a fit that has just raised a stage would
    otherwise read the requests served before it as a shift.

    No label of the newest requests is needed: the traffic changed under the thresholds (new kinds of
    prompts, a new model behind an upstream) so that a cheap stage suddenly takes what it used to pass
    on, and labels of what it now accepts come slowly (shadow labels only). Without this a WinoGrande ->
    GSM8K stream served 100 requests at 76 % of the best model, the middle stage taking all of them
    against ~70 % before, until the next fit ~150 requests later. That stage escalates
    (``max_step_up``): the requests it passes on label its answers for free at once. And the fits start
    over from the shift, as after a change of label quality (``changed``): escalating alone, the fits,
    mostly older labels, walked the stage back down within ~100 requests into answers now wrong (that
    run then took 648 labelled requests after the switch to be back on target, against 472 without the
    escalation and 193 with the new start). A shift the other way (fewer answered early) costs money,
    not quality: left to the fits.

    The longer scales see what 50 requests cannot: an MBPP -> WinoGrande stream (``cascade replay
    mbpp.jsonl --online --drift winogrande.jsonl --passes 3``) had its first stage, estimated at 75 % of
    the requests before, take 50 of the newest 50 (a chance of 3e-5 at the share one standard error
    higher, over ``SHIFT_P``), then every one of the 3,800 requests after the switch at 0.6-0.7 of the
    best model: the spend caps let 6 shadow calls through, and the fits trusted the labels from before.
    100 of 100 at that share is a chance of 1e-9."""
    upper = cfg.threshold_bounds[1]
    labelled: Sequence[Entry] | None = None
    for m in (SHIFT_REQUESTS << j for j in range(SHIFT_SCALES)):
        if len(population) < m + SHIFT_BEFORE or population[-m][0] <= since:
            break
        new, served = population[-m:], population[-(m + 40 * SHIFT_REQUESTS) : -m]
        now = [sum(1 for _, s in new if s <= k) for k in range(len(thresholds))]
        was = [sum(1 for _, s in served if s <= k) / len(served) for k in range(len(thresholds))]
        wanted = [k for k, t in enumerate(thresholds) if t < upper and now[k] / m - was[k] >= SHIFT_MIN / 2]
        if not wanted:
            continue
        if labelled is None:
            labelled = entries()
        cut = bisect.bisect_left(labelled, new[0][0], key=attrgetter("seq"))
        old = labelled[max(0, cut - 40 * SHIFT_REQUESTS) : cut]
        if len(old) < SHIFT_BEFORE:
            continue
        lo = bisect.bisect_left(population, old[0].seq, key=itemgetter(0))
        rows = weigh(old, n_stages, population[lo : len(population) - m])
        stage = served_stages(rows.scores, thresholds)
        w = rows.weights
        total = float(w.sum())
        if total <= 0:
            continue
        n_eff = total * total / float((w * w).sum())
        for k in wanted:
            b = float(w[stage <= k].sum()) / total
            x = now[k]
            if x / m - b < SHIFT_MIN:
                continue
            # The chance of x or more of m at the share before, taken one standard error higher (its own
            # estimate is noisy; at least one label's worth). Exact: at the edge (50 of 50 against 70 %
            # of 100 before, a real shift) the normal approximation says 4.3 standard errors.
            hi = min(1.0, max(b + math.sqrt(b * (1.0 - b) / n_eff), 1.0 / n_eff))
            tail = sum(math.comb(m, j) * hi**j * (1.0 - hi) ** (m - j) for j in range(x, m + 1))
            if tail <= SHIFT_P:
                return {str(k): [round(b, 3), round(x / m, 3), m]}
    return {}


SCORE_SCALES = (50, 100, 200)  # the newest first-stage scores compared with the ones before them
SCORE_BEFORE = 500  # ... at least this many before them (up to 1,000)
SCORE_P = 1e-6  # ... a difference this unlikely (two-sample Kolmogorov-Smirnov)
SCORE_MIN_D = 0.25  # ... and at least this large (the largest gap between the two distributions)


def ks_2samp(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """The two-sample Kolmogorov-Smirnov statistic of ``a`` and ``b`` and its asymptotic p-value
    (Stephens' small-sample correction; ties, as scores have, make it conservative)."""
    x, y = np.sort(np.asarray(a, float)), np.sort(np.asarray(b, float))
    both = np.concatenate([x, y])
    d = float(
        np.max(
            np.abs(np.searchsorted(x, both, "right") / len(x) - np.searchsorted(y, both, "right") / len(y))
        )
    )
    n = len(x) * len(y) / (len(x) + len(y))
    lam = (math.sqrt(n) + 0.12 + 0.11 / math.sqrt(n)) * d
    if lam < 0.3:  # the series does not converge there; the tail is 1 to five decimals
        return d, 1.0
    p = 2.0 * sum((-1) ** (k - 1) * math.exp(-2.0 * k * k * lam * lam) for k in range(1, 101))
    return d, min(1.0, max(0.0, p))


def first_scores_moved(first: Sequence[tuple[int, float]]) -> dict[str, float] | None:
    """Whether the first stage's scores of the newest 50, 100 or 200 answered requests (``SCORE_SCALES``)
    are distributed unlike the up to 1,000 before them: {"requests", "since_seq", "d", "p",
    "mean_before", "mean_now"} of the first scale that shows it, else None.

    Every request reaches the first stage (unless a router skips it), and its scores do not depend on the
    thresholds, so no label and no fit is needed to see the traffic change under it. The accept-share
    test (``shifted_stages``) cannot see a change that leaves a stage answering what it answered before:
    MBPP -> WinoGrande (``bench/online.py --sets --drift mbpp:winogrande``) had its first stage answer
    96-98 % of the requests before the switch and all of them after, at 0.6-0.7 of the best model, and
    the spend caps let a label call through every ~1,000 requests: the fits held on MBPP's labels for
    1,500-4,100 requests. Its first scores moved from a mean of 0.64 to 0.94: p < 1e-5 20-50 requests
    after the switch, where the lowest p over the stretches before and after it was 0.02-0.10."""
    for m in SCORE_SCALES:
        if len(first) < m + SCORE_BEFORE:
            break
        now = [s for _, s in first[-m:]]
        before = [s for _, s in first[-(m + 1000) : -m]]
        d, p = ks_2samp(now, before)
        if d >= SCORE_MIN_D and p <= SCORE_P:
            return {
                "requests": m,
                "since_seq": first[-m][0],
                "d": round(d, 3),
                "p": float(f"{p:.2g}"),
                "mean_before": round(float(np.mean(before)), 3),
                "mean_now": round(float(np.mean(now)), 3),
            }
    return None


STALE_LABELS = 20  # labels expected (at shadow_rate) over the stretch a stage's evidence is judged on
STALE_SHARE = 0.1  # stale when fewer than this share of the label calls let through brought a label
STALE_MIN_CALLS = 5  # ... of at least this many


def _recent(population: Sequence[tuple[int, int]], cfg: LearningConfig) -> tuple[Any, int] | None:
    """(the newest ``2 * limit`` requests, ``limit``), where ``limit`` is ``STALE_LABELS / shadow_rate``;
    None without shadow calls or requests."""
    if cfg.shadow_rate <= 0 or not population:
        return None
    limit = math.ceil(STALE_LABELS / cfg.shadow_rate)
    return population[-2 * limit :], limit


def _per_stage(recent: Sequence[tuple[int, int]], seqs: Sequence[int] | None = None) -> dict[int, int]:
    """How many of the ``recent`` requests (of those among ``seqs``, when given) each stage accepted."""
    wanted = None if seqs is None else set(seqs)
    out: dict[int, int] = {}
    for seq, k in recent:
        if wanted is None or seq in wanted:
            out[k] = out.get(k, 0) + 1
    return out


class _Counts(NamedTuple):
    start: int  # seq of the oldest request judged
    limit: int  # STALE_LABELS / shadow_rate
    accepted: dict[int, int]  # per stage: requests it accepted
    calls: dict[int, int]  # ... whose shadow call was drawn
    capped: dict[int, int]  # ... and ruled out by the spend caps


def _counts(
    population: Sequence[tuple[int, int]],
    cfg: LearningConfig,
    budget_skipped: Sequence[int],
    drawn: Sequence[int],
) -> _Counts | None:
    """Per stage, over the newest ``2 * limit`` requests (``_recent``): accepted, drawn, capped."""
    window = _recent(population, cfg)
    if window is None:
        return None
    recent, limit = window
    return _Counts(
        recent[0][0], limit, _per_stage(recent), _per_stage(recent, drawn), _per_stage(recent, budget_skipped)
    )


def stale_stages(
    labelled: Sequence[tuple[int, int]],
    population: Sequence[tuple[int, int]],
    n_scored: int,
    cfg: LearningConfig,
    budget_skipped: Sequence[int] = (),
    drawn: Sequence[int] = (),
) -> list[int]:
    """Scored stages that accepted ``STALE_LABELS / shadow_rate`` or more of the newest twice that many
    requests, whose label calls were let through (``STALE_MIN_CALLS`` or more: drawn, ``drawn``, and
    not ruled out by the spend caps, ``budget_skipped``) and brought a label for fewer than
    ``STALE_SHARE`` of them: the last stage failing, its circuit open, too busy. Such a stage escalates
    until labels flow again. The calls counted are the ones actually drawn, not ``shadow_rate`` of the
    requests: where the caps rule out nearly every draw, chance decides how many were drawn, and
    expecting their nominal number read a stretch with fewer draws as stale evidence (on MBPP it raised
    the first stage to the upper bound every few hundred requests, each time undoing the savings of the
    fits before). Calls the spend caps rule out are the operator's choice, not staleness:
    ``starved_stages``. None when shadow_rate is 0 (labels then come from users, at their own pace). A
    stage pushed up by this accepts little, and so is not stale next time. ``labelled``: (seq, accepted
    stage) of the requests accepted before the last stage that got a label (shadow or user)."""
    c = _counts(population, cfg, budget_skipped, drawn)
    if c is None:
        return []
    got: dict[int, int] = {}
    for seq, k in labelled:
        if seq >= c.start:
            got[k] = got.get(k, 0) + 1
    out = []
    for k, n in c.accepted.items():
        through = c.calls.get(k, 0) - c.capped.get(k, 0)
        if (
            k < n_scored
            and n >= c.limit
            and through >= STALE_MIN_CALLS
            and got.get(k, 0) < STALE_SHARE * through
        ):
            out.append(k)
    return sorted(out)


STARVED_SHARE = 0.5  # starved below this share of ``min_labels`` effective labels (lowering needs all)


def short_of_labels(
    population: Sequence[tuple[int, int]],
    n_scored: int,
    cfg: LearningConfig,
    budget_skipped: Sequence[int],
    drawn: Sequence[int],
    share: float = 0.5,
) -> list[int]:
    """Scored stages that accepted ``share`` of the newest ``2 * STALE_LABELS / shadow_rate`` requests or
    more (by default half: ``STALE_LABELS / shadow_rate``) while the spend caps ruled out most of the
    shadow calls drawn for them."""
    c = _counts(population, cfg, budget_skipped, drawn)
    if c is None:
        return []
    return [
        k
        for k in range(n_scored)
        if c.accepted.get(k, 0) >= share * 2 * c.limit and 2 * c.capped.get(k, 0) > c.calls.get(k, 0)
    ]


def starved_stages(
    rows: Rows, thresholds: Sequence[float], short: Sequence[int], cfg: LearningConfig
) -> dict[str, float]:
    """Of the stages ``short`` of labels (``short_of_labels``), those the spend caps starve of evidence:
    stage -> the effective number of labels of the answers ``thresholds`` serve there, where that is
    under ``STARVED_SHARE`` x ``min_labels`` (``effective_labels``; any label counts, those of requests
    that went further too). Such a stage escalates (``max_step_up``): the requests it passes on reach
    the last stage and label its answers for free, and the fits bring it down again on that evidence,
    which must then weigh ``min_labels`` (the gap between the two keeps a stage near the bar from going
    up and down). Without it a loose start under tight caps served everything from the first stage, 6
    points under the target, every label call ruled out and nothing to show for it (generated world 3).
    Not before the first label: where none comes at all (free-form answers and no judge, caps at zero)
    escalating buys nothing. A stage already at the upper bound is not listed."""
    if rows.n == 0:
        return {}
    out: dict[str, float] = {}
    for k in short:
        if thresholds[k] >= cfg.threshold_bounds[1]:  # escalating all it can already
            continue
        n = effective_labels(rows, thresholds, k)
        if n < STARVED_SHARE * cfg.min_labels:
            out[str(k)] = round(n, 1)
    return out


def starved_towards(
    rows: Rows, choice: Sequence[float], new: Sequence[float], short: Sequence[int], cfg: LearningConfig
) -> dict[str, float]:
    """``starved_stages`` judged where a fit heads (its ``choice``), for the stages whose threshold put in
    force (``new``) is below the upper bound. Not at the step towards the choice: walking down from the
    upper bound passes thresholds above which few labelled answers lie, and judging those raised the
    stage straight back, for as long as the newest requests still showed it accepting most (a loose start
    escalated for evidence stayed there ~400 requests although the fits had the evidence to come down)."""
    starved = starved_stages(rows, choice, short, cfg)
    return {k: n for k, n in starved.items() if new[int(k)] < cfg.threshold_bounds[1]}


class Step(NamedTuple):
    thresholds: tuple[float, ...]  # what the fit puts in force
    missing: bool  # the thresholds in force were estimated to miss the target
    held: dict[str, float]  # stage -> effective labels, where a move down waits for evidence
    unproven: dict[str, float]  # stage -> labels of its own answers, where escalated past for want of them
    kept: bool = False  # the thresholds in force met the target and the fit's choice would cost more


def next_thresholds(old: Sequence[float], cal: Calibration, cfg: LearningConfig, rows: Rows) -> Step:
    """The thresholds a fit puts in force, whether those in force missed the target, and the stages
    whose move down was held for want of evidence.

    The thresholds in force missing the target (less the margin) is corrected at once: each threshold
    may rise up to ``max_step_up`` towards the fit (escalating more). Every other move, down or up, is
    at most ``max_step`` per fit: saving money waits for evidence. One exception: when escalating that
    way is still estimated to miss and the fit's own choice is estimated better, thresholds may also
    fall up to ``max_step_up``: a later stage can be worse than an earlier one on this traffic (a
    middle model weaker than the first), and then accepting more early is what restores quality.

    With a miss, ``unproven_stages`` then escalates past the stages the fix would leave serving on too
    few labels of their own answers while almost nothing reaches the last stage.

    Without a miss, a fit whose choice would cost more than the thresholds in force keeps them (``kept``):
    spending more needs a quality reason. The choice pays the optimism of picking the cheapest of many
    combinations on these labels, the thresholds in force are judged as they stand, and between the two
    a fit walked ``max_step`` towards a dearer choice although nothing missed, the next fit back again:
    on WinoGrande from the strict start (seed 0) the middle stage's threshold flipped between accepting
    and accepting nothing every few fits, and the run kept 20 % of the offline thresholds' savings at 2.7
    points over the target (with the rule 69 %, 0.6 points over). A fit trading one stage against
    another (one up, one down) for a cheaper choice still moves.

    Without a miss, a threshold comes down only on evidence: the labelled requests the fit's choice
    serves at that stage must weigh as much as ``min_labels`` equally weighted labels (their effective
    number, ``effective_labels``). Where the spend caps let few label calls through, a stage's accepted
    answers are known from a handful of shadow labels weighing hundreds each; a few lucky ones read as
    quality to spare, each fit accepted more, fewer requests reached the last stage, its spend (and with
    it the label budget) shrank, and on a generated world a loose start settled 6 points under the
    target while every fit estimated it above."""
    missing = cal.current is not None and (
        cal.current.quality - cfg.margin_z * cal.current.quality_se < cfg.target_quality
    )
    up = cfg.max_step_up if missing else cfg.max_step
    new = guard(old, cal.thresholds, cfg.max_step, cfg.threshold_bounds, up=up)
    if missing and new != tuple(cal.thresholds):
        at = evaluate_cascade(rows.scores, rows.correct, rows.cost, new, rows.weights)
        # (the choice met the target up to float noise: 0.8999999999999997 is 0.9 summed another way)
        if at.quality - cfg.margin_z * at.quality_se < cfg.target_quality - 1e-9 <= cal.chosen.quality:
            new = guard(old, cal.thresholds, cfg.max_step_up, cfg.threshold_bounds, up=up)
    held: dict[str, float] = {}
    if not missing and cal.current is not None and cal.chosen.cost >= cal.current.cost:
        return Step(tuple(float(t) for t in old), False, held, {}, kept=True)
    if not missing:
        out = list(new)
        for k in range(len(out)):
            if out[k] < old[k]:
                n = effective_labels(rows, cal.thresholds, k)
                if n < cfg.min_labels:
                    out[k] = float(old[k])
                    held[str(k)] = round(n, 1)
        new = tuple(out)
    unproven: dict[str, float] = {}
    if missing:
        new, unproven = unproven_stages(rows, old, new, cfg)
    return Step(new, missing, held, unproven)


SERVED_SHARE = 0.1  # after a fit correcting a miss, a stage serving this share must show its own labels


def unproven_stages(
    rows: Rows,
    old: Sequence[float],
    new: Sequence[float],
    cfg: LearningConfig,
    only: Sequence[int] | None = None,
) -> tuple[tuple[float, ...], dict[str, float]]:
    """After a fit correcting a miss that would leave fewer than ``SERVED_SHARE`` of the requests to
    reach the last stage: the thresholds with every scored stage that would serve ``SERVED_SHARE`` or
    more of them on fewer than ``min_labels`` effective labels of its own answers (requests that reached
    it: ``effective_labels(..., reached=True)``) sent to the upper bound, and those stages -> that
    number.

    A miss is corrected at once, upwards, and raising a threshold reads as the safe direction. But a fit
    on the first labels of a loose start (20 shadow labels, the first stage accepting everything) can
    raise the first stage just enough to keep it serving most requests on the answers the labels happened
    to find good, and hand the rest to a middle stage that accepts all of it. Then nothing reaches the
    last stage, so no request labels itself, and the spend caps let almost no shadow call through (the
    cheap stages serve everything: there is little spend to set them against): the thin evidence stands
    for thousands of requests. On a generated world (`bench/synthetic.py --write 13`, seed 0) the first
    fit certified Yi-34B on 17 effective labels, all good, and handed the rest to GPT-3.5: the run sat at
    0.88-0.92 of the best model for 2,800 requests on 4 new labels; on WinoGrande at `--shadow-rate 0.3`
    (seed 0) the middle model took ~70 % of the requests on its 20 warm-up labels: 1,800 requests at
    0.85-0.88. Such a stage goes to the upper bound instead: what it passes on reaches the last stage and
    labels its answers for free, and the next fits bring it down on that evidence (``min_labels``, as any
    move down). Where a tenth of the requests or more still reach the last stage, labels flow and the
    fit stands (measured: escalating on thin evidence there too changed most loose starts' paths, for
    fewer runs holding the floor). Not a stage the fit lowers (accepting more early to restore quality
    when a middle model is weaker, ``next_thresholds``): escalating it would undo the fix. Stages are
    judged from the first on, each after the ones before are settled; ``only``: just these stages, and
    every stage after the first one sent up (it gets their requests, on as few labels of its own).

    Without a miss the same test applies to the stages the spend caps starve (``short_of_labels``;
    ``Tuner._fit``): a fit on 20 warm-up labels, 19 of them right, found the first stage serving
    everything on target (generated world 23, seed 0, 0.85 of the best model in truth) and walked a
    ``max_step`` towards its choice; the warm-up had spent the label budget, nothing reached the last
    stage, and no fit came again for 2,800 requests. Each fit's evidence lists the stages the test would
    send up, were they starved (``unproven_if_short``), so that the tuner fits again once the caps bite.
    Where labels come (shadow calls let through), thin evidence is refreshed and the fit stands.

    Once the labels have stopped (no fit for ``2 * STALE_LABELS / shadow_rate`` requests: ``Tuner._quiet``)
    the test also applies at the thresholds put in force (``old`` = ``new``: a stage the fit lowered is
    not spared) to every stage serving ``SERVED_SHARE`` whose shadow calls the caps mostly rule out; each
    fit's evidence lists those stages (``unproven_in_force``) and the tuner fits again without new labels.
    The world-3 stall (generated world 3, offline start, seed 0): a fit correcting a miss on 41 labelled
    requests lowered both stages (the first then served 44 % of the requests on 6.9 effective labels,
    the middle one 54 % on 16.5), nearly nothing reached the last stage, the caps let almost no shadow
    call through, no fit came, and 1,300 requests were served at 0.90 of the best model (target 0.95)
    on 45 labels. The price: where such a fit was right (MBPP's strict start, whose middle model is the
    weaker one), the stages go up and walk down again, and two runs of 84 kept 56 % and 15 % of the
    offline thresholds' savings instead of 103 % (README, Online learning)."""
    top = cfg.threshold_bounds[1]
    out: dict[str, float] = {}
    cur = list(new)
    if evaluate_cascade(rows.scores, rows.correct, rows.cost, cur, rows.weights).reach[-1] >= SERVED_SHARE:
        return tuple(cur), out  # enough requests reach the last stage to label what comes before
    for k in range(len(cur)):
        if cur[k] >= top or cur[k] < old[k] or (only is not None and k not in only and not out):
            continue
        share = evaluate_cascade(rows.scores, rows.correct, rows.cost, cur, rows.weights).accept[k]
        if share < SERVED_SHARE:
            continue
        n = effective_labels(rows, cur, k, reached=True)
        if n < cfg.min_labels:
            out[str(k)] = round(n, 1)
            cur[k] = top
    return tuple(cur), out


def effective_labels(rows: Rows, thresholds: Sequence[float], stage: int, *, reached: bool = False) -> float:
    """The effective number of labelled requests (``(sum w)^2 / sum w^2``) that ``thresholds`` serve at
    ``stage``: how many equally weighted labels the estimate of those answers' quality rests on.
    ``reached``: only requests that reached the stage (not those an earlier stage accepted, whose
    answer there is a guess: ``calibration`` fills it in)."""
    if rows.n == 0:
        return 0.0
    take = served_stages(rows.scores, thresholds) == stage
    if reached:
        take &= rows.scores[:, stage] < ALWAYS
    w = rows.weights[take]
    sq = float(np.square(w).sum())
    return float(w.sum()) ** 2 / sq if sq > 0 else 0.0


def _raise(t: float, step: float, bounds: tuple[float, float]) -> float:
    return round(min(bounds[1], max(bounds[0], t + step)), 6)


def _escalate(
    thresholds: Sequence[float], stale: Sequence[int], starved: dict[str, float], cfg: LearningConfig
) -> tuple[float, ...]:
    """``thresholds`` with the stale and the starved stages raised by ``max_step_up``."""
    up = set(stale) | {int(k) for k in starved}
    return tuple(
        _raise(t, cfg.max_step_up, cfg.threshold_bounds) if k in up else float(t)
        for k, t in enumerate(thresholds)
    )


def _log_escalation(cascade: str, stale: Sequence[int], starved: dict[str, float]) -> None:
    if stale:
        log.warning(
            "no recent labels for early answers: escalating until there are",
            extra={"cascade": cascade, "stages": list(stale)},
        )
    if starved:
        log.warning(
            "the spend caps leave too little evidence for what early stages accept: escalating",
            extra={"cascade": cascade, "effective_labels": starved},
        )


class Tuner:
    """Keeps the thresholds of ``plans()`` tuned; ``apply(fit)`` puts a fit into force."""

    def __init__(
        self,
        cfg: LearningConfig,
        store: Store,
        plans: Callable[[], list[PlanMeta]],
        apply: Callable[[Fit], bool],
        labels_added: asyncio.Event,
        clock: Callable[[], float],
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.plans = plans
        self.apply = apply
        self.labels_added = labels_added
        self.clock = clock
        self._checked: dict[tuple[str, str], int] = {}  # last label id looked at without fitting
        # Cascades whose last look found fewer than ``min_labels`` labelled requests: the next label
        # may be the one that completes them (``tune_every`` counts labels, several per request).
        self._short: set[tuple[str, str]] = set()
        self._task: asyncio.Task[None] | None = None
        self._histories: dict[tuple[str, str], History] = {}
        self._lock = asyncio.Lock()
        self._out_of_reach: set[tuple[str, str]] = set()  # cascades whose last fit found no way to the target
        self._applied_at: dict[tuple[str, str], int] = {}  # the newest request seen when a fit was applied
        self._watching: dict[tuple[str, str], int] = {}  # ... and when this process first read the history
        # Fits this replica stored that started over on a change (``changed``): cascade and evidence.
        self.changes: list[dict[str, Any]] = []

    def history(self, meta: PlanMeta) -> History:
        key = (meta.name, meta.fingerprint)
        h = self._histories.get(key)
        if h is None:
            h = self._histories[key] = History(meta.name, meta.fingerprint, meta.n_stages, self.cfg.window)
        return h

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="cascade-tuner")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _loop(self) -> None:
        event = self.labels_added
        while True:
            try:
                async with asyncio.timeout(self.cfg.sync_every_s):
                    await event.wait()
            except TimeoutError:
                pass
            event.clear()
            try:
                await self.sync()
            except StoreError as exc:
                log.warning("threshold sync failed", extra={"error": str(exc)})

    async def sync(self, *, refit: bool = True) -> None:
        async with self._lock:  # the loop and an explicit call (``Learning.settle``) never overlap
            for meta in self.plans():
                await self._sync_one(meta, refit)

    async def _sync_one(self, meta: PlanMeta, refit: bool) -> None:
        store = self.store
        latest = await store.latest_fit(meta.name, meta.fingerprint)
        key = (meta.name, meta.fingerprint)
        history = self.history(meta)
        if latest is not None and latest.version > meta.fit_version:
            self.apply(latest)
            self._applied_at[key] = history.last_seq
        if not refit:
            return
        await history.update(store)
        self._watching.setdefault(key, history.last_seq)  # a restarted replica counts quiet from here
        if latest is not None:  # a change found by any replica: every one forgets what came before
            history.forget_before(int(latest.evidence.get("since_seq", 0)))
        since = max(latest.last_label_id if latest else 0, self._checked.get(key, 0))
        top = history.last_label_id
        fresh = history.labels_after(since)
        due = fresh >= self.cfg.tune_every or (key in self._short and fresh > 0)
        if (
            not due
            and not self._stale(meta, latest, history)
            and first_scores_moved(history.first_scores) is None
            and not await self._shifted(meta, latest, history)
        ):
            return
        proposal = await self._fit(meta, latest, history)
        if proposal is None:  # too few labelled requests yet
            self._checked[key] = top
            self._short.add(key)
            return
        self._short.discard(key)
        if await store.save_fit(proposal):
            self.apply(proposal)
            self._applied_at[key] = history.last_seq
            if (change := proposal.evidence.get("change")) is not None:
                self.changes.append({"cascade": meta.name, "fit": proposal.version, **change})
            return
        winner = await store.latest_fit(meta.name, meta.fingerprint)  # another replica was first
        if winner is not None:
            self.apply(winner)
            self._applied_at[key] = history.last_seq

    def _stale_stages(self, history: History, n_scored: int) -> list[int]:
        return stale_stages(
            history.early_labelled(),
            history.population,
            n_scored,
            self.cfg,
            history.budget_skipped,
            history.drawn,
        )

    def _short_of_labels(self, history: History, n_scored: int, share: float = 0.5) -> list[int]:
        return short_of_labels(
            history.population, n_scored, self.cfg, history.budget_skipped, history.drawn, share
        )

    def _quiet(self, meta: PlanMeta, history: History) -> bool:
        """No fit put in force over the newest ``2 * STALE_LABELS / shadow_rate`` requests: the labels
        have all but stopped (a fit comes every ``tune_every`` of them)."""
        window = _recent(history.population, self.cfg)
        if window is None:
            return False
        recent, limit = window
        key = (meta.name, meta.fingerprint)
        since = max(self._applied_at.get(key, 0), self._watching.get(key, 0))
        return len(recent) >= 2 * limit and recent[0][0] > since

    def _serving_unproven(self, meta: PlanMeta, history: History, n_scored: int) -> list[int]:
        """While the labels have stopped (``_quiet``): the stages serving ``SERVED_SHARE`` of the newest
        requests or more whose shadow calls the spend caps mostly rule out (``unproven_stages`` judges
        them at the thresholds in force)."""
        if not self._quiet(meta, history):
            return []
        return self._short_of_labels(history, n_scored, SERVED_SHARE)

    async def _shifted(self, meta: PlanMeta, latest: Fit | None, history: History) -> dict[str, list[float]]:
        """``shifted_stages`` at the thresholds in force (in a thread: it may weigh thousands of labels)."""
        thresholds = latest.thresholds if latest is not None else meta.config_thresholds
        return await asyncio.to_thread(
            shifted_stages,
            history.population,
            thresholds,
            self.cfg,
            functools.partial(history.entries, self.cfg.user_pass_score),
            meta.n_stages,
            self._applied_at.get((meta.name, meta.fingerprint), 0),
        )

    def _stale(self, meta: PlanMeta, latest: Fit | None, history: History) -> bool:
        """A stage's evidence went stale, or the spend caps may starve it, and raising it would change
        something: fit now, even without new labels (starved of labels, the tuner would otherwise never
        fit again). Whether a stage short of labels is starved is read from the last fit's evidence (its
        ``effective_labels``; labels that came since bring the next fit by ``tune_every``): at the
        thresholds put in force, so a stage walking back down from an escalation (few labelled answers
        above its threshold, enough where the fit heads) is refitted at every sync, a ``max_step`` each,
        not every ``tune_every`` labels. Reading it at the fit's choice instead, as the fit judges
        starvation, was measured: one GSM8K loose-start run (seed 2) fell from 100 % to 80 % of the
        offline savings, walking down slower; the other WinoGrande and GSM8K runs were unchanged. Also
        when the last fit found a stage now short of labels serving on too few labels of its own answers
        (its evidence's ``unproven_if_short``)."""
        old = latest.thresholds if latest is not None else meta.config_thresholds
        top = self.cfg.threshold_bounds[1]
        if any(old[k] < top for k in self._stale_stages(history, len(old))):
            return True
        unproven_now = latest.evidence.get("unproven_in_force") if latest is not None else None
        if isinstance(unproven_now, dict) and any(
            str(k) in unproven_now and old[k] < top for k in self._serving_unproven(meta, history, len(old))
        ):
            return True
        short = [k for k in self._short_of_labels(history, len(old)) if old[k] < top]
        if not short:
            return False
        known = latest.evidence.get("effective_labels") if latest is not None else None
        if not isinstance(known, dict):  # no fit yet (or an older one): the fit finds out
            return True
        unproven = latest.evidence.get("unproven_if_short") if latest is not None else None
        if isinstance(unproven, dict) and any(str(k) in unproven for k in short):
            return True
        return any(float(known.get(str(k), 0.0)) < STARVED_SHARE * self.cfg.min_labels for k in short)

    def _say_out_of_reach(
        self, meta: PlanMeta, cal: Calibration, quality: float, new: Sequence[float]
    ) -> None:
        """Log (once, until it changes) when no thresholds within ``threshold_bounds`` reach the target on
        the labels: e.g. a stage whose scorers give 1.0 to every answer (``heuristic`` on letters) keeps
        accepting at the upper bound, and the tuner, at the bound, can do nothing more about it."""
        key = (meta.name, meta.fingerprint)
        # The fit's choice within the bounds (the search's own may lie beyond them). Its quality against
        # the target itself: the search already kept its margin, in bootstrap standard errors; judging
        # again with the analytic one warned of fits that had just reached the target.
        reach = cal.search.feasible and cal.chosen.quality >= self.cfg.target_quality - 1e-9
        if not reach and key not in self._out_of_reach:
            self._out_of_reach.add(key)
            log.warning(
                "auto_tune: no thresholds within threshold_bounds reach target_quality on the labels; "
                "the most accurate are in force (a stage whose scorers score every answer alike cannot be "
                "made to escalate: check its scorers, threshold_bounds and target_quality)",
                extra={
                    "cascade": meta.name,
                    "target_quality": self.cfg.target_quality,
                    "est_quality": round(quality, 4),
                    "thresholds": list(new),
                },
            )
        elif reach and key in self._out_of_reach:
            self._out_of_reach.discard(key)
            log.info("auto_tune: the target is within reach again", extra={"cascade": meta.name})

    async def _changed(self, meta: PlanMeta, history: History, thresholds: Sequence[float]) -> Change | None:
        """``changed`` at ``thresholds``; when it finds a change, the history before it is forgotten."""
        cfg = self.cfg
        change = await asyncio.to_thread(
            changed, history.entries(cfg.user_pass_score), history.population, meta.n_stages, thresholds, cfg
        )
        if change is not None:
            history.forget_before(change.since_seq)
            log.warning(
                "label quality changed: thresholds are fitted from the newest labels only",
                extra={"cascade": meta.name, **change.evidence},
            )
        return change

    def _escalation(
        self,
        meta: PlanMeta,
        latest: Fit | None,
        history: History,
        rows: Rows,
        raised: tuple[float, ...],
        since: int,
        why: dict[str, Any],
    ) -> Fit:
        """A fit that only raises stages (``why`` says which and why), before the next full fit."""
        evidence = {
            "rows": rows.n,
            **why,
            "effective_labels": {
                str(k): round(effective_labels(rows, raised, k), 1) for k in range(len(raised))
            },
            "last_label_id": history.last_label_id,
            "since_seq": since,
        }
        version = (latest.version if latest is not None else 0) + 1
        return Fit(
            meta.name,
            meta.fingerprint,
            version,
            raised,
            history.last_label_id,
            rows.n,
            None,
            None,
            False,
            evidence,
            self.clock(),
        )

    def _too_few(
        self,
        meta: PlanMeta,
        latest: Fit | None,
        history: History,
        rows: Rows,
        old: Sequence[float],
        since: int,
    ) -> Fit | None:
        """Fewer than ``min_labels`` labelled requests: no fit, but stale or starved stages escalate."""
        cfg = self.cfg
        stale = self._stale_stages(history, len(old))
        starved = starved_stages(rows, old, self._short_of_labels(history, len(old)), cfg)
        if stale or starved:  # no evidence for what early stages accept: escalate, fit later
            raised = _escalate(old, stale, starved, cfg)
            if raised != tuple(old):
                _log_escalation(meta.name, stale, starved)
                why = {"stale_stages": stale, "starved_stages": starved}
                return self._escalation(meta, latest, history, rows, raised, since, why)
        log.info(
            "not enough labelled requests to tune",
            extra={"cascade": meta.name, "rows": rows.n, "min_labels": cfg.min_labels},
        )
        return None

    def _calibrate(self, rows: Rows, old: Sequence[float]) -> Calibration:
        cfg = self.cfg
        return fit(
            rows,
            cfg.target_quality,
            margin_z=cfg.margin_z,
            bounds=cfg.threshold_bounds,
            current=old,
            honest=cfg.optimism_correction,
        )

    async def _fit(self, meta: PlanMeta, latest: Fit | None, history: History) -> Fit | None:
        cfg = self.cfg
        old = latest.thresholds if latest is not None else meta.config_thresholds
        top = history.last_label_id
        read = functools.partial(
            history.rows, half_life=cfg.half_life_labels, window=cfg.window, pass_score=cfg.user_pass_score
        )
        rows = await asyncio.to_thread(read)
        since = int(latest.evidence.get("since_seq", 0)) if latest is not None else 0
        change = await self._changed(meta, history, old)
        if change is not None:
            since, rows = change.since_seq, await asyncio.to_thread(read)
        if moved := first_scores_moved(history.first_scores):
            since = int(moved["since_seq"])
            history.forget_before(since)
            rows = await asyncio.to_thread(read)
            raised = _escalate(old, [], {str(k): 0.0 for k in range(len(old))}, cfg)
            log.warning(
                "the first stage's scores changed: the traffic is not what the labels saw; escalating "
                "every stage and fitting from the newest labels only",
                extra={"cascade": meta.name, **moved},
            )
            why = {"first_scores": moved, "change": {"first_scores": moved}}
            return self._escalation(meta, latest, history, rows, raised, since, why)
        if shifted := await self._shifted(meta, latest, history):
            (_before, _now, newest), *_ = shifted.values()  # the shift began within the newest requests
            since = history.population[-int(newest)][0]
            history.forget_before(since)
            rows = await asyncio.to_thread(read)
            raised = _escalate(old, [], {k: 0.0 for k in shifted}, cfg)
            log.warning(
                "a stage answers a far larger share of the traffic than it did at these thresholds: "
                "escalating it and fitting from the newest labels only",
                extra={"cascade": meta.name, "shares": shifted, "since_seq": since},
            )
            why = {"shifted_stages": shifted, "change": {"shifted_stages": shifted}}
            return self._escalation(meta, latest, history, rows, raised, since, why)
        if rows.n < cfg.min_labels:
            return self._too_few(meta, latest, history, rows, old, since)
        cal = await asyncio.to_thread(self._calibrate, rows, old)
        if change is None and any(c < t - HEADING_DOWN for c, t in zip(cal.thresholds, old, strict=True)):
            # The same test where the fit heads when it would accept more: thresholds in force that
            # escalate much see little of what the early stages' answers below them are now worth,
            # and the fit, mostly older labels, would lower them into it.
            change = await self._changed(meta, history, cal.thresholds)
            if change is not None:
                since, rows = change.since_seq, await asyncio.to_thread(read)
                if rows.n < cfg.min_labels:
                    return self._too_few(meta, latest, history, rows, old, since)
                cal = await asyncio.to_thread(self._calibrate, rows, old)
        new, missing, held, unproven, kept = next_thresholds(old, cal, cfg, rows)
        # No recent label for the answers a stage accepts although label calls were let through (the
        # last stage failing, its circuit open, too busy): its evidence is stale, so it escalates until
        # labels flow again. Savings wait for evidence; quality does not. A stage the spend caps starve
        # (most of its shadow calls ruled out) escalates only when what it accepts rests on fewer than
        # ``STARVED_SHARE`` x ``min_labels`` effective labels (``starved_stages``): then the requests it
        # passes on label its answers for free; so does one serving a tenth or more on fewer than
        # ``min_labels`` labels of its own answers while almost nothing reaches the last stage
        # (``unproven_stages``, which a miss applies to every stage).
        stale = self._stale_stages(history, len(old))
        short = self._short_of_labels(history, len(old))
        starved = starved_towards(rows, cal.thresholds, new, short, cfg)
        if stale or starved:
            new = _escalate(new, stale, starved, cfg)
            _log_escalation(meta.name, stale, starved)
        if not missing and short:
            new, more = unproven_stages(rows, old, new, cfg, only=short)
            unproven.update(more)
        if serving := self._serving_unproven(meta, history, len(old)):
            new, more = unproven_stages(rows, new, new, cfg, only=serving)  # lowered or not
            unproven.update(more)
        at_new = evaluate_cascade(rows.scores, rows.correct, rows.cost, new, rows.weights)
        self._say_out_of_reach(meta, cal, at_new.quality, new)
        evidence = {
            "rows": rows.n,
            "rows_by_reference": dict(sorted(rows.kinds.items())),
            "labels_by_source": dict(sorted(rows.labels.items())),
            "label_rates": {str(k): round(v, 4) for k, v in rows.rates.items()},
            "last_label_id": top,
            "target_quality": cfg.target_quality,
            "proposed": list(cal.thresholds),
            "missing_target": missing,
            "stale_stages": stale,
            "starved_stages": starved,  # stage -> effective labels, where the caps starved it: escalated
            # of the answers each scored stage accepts under the thresholds put in force
            "effective_labels": {str(k): round(effective_labels(rows, new, k), 1) for k in range(len(new))},
            "held_for_evidence": held,  # stage -> effective labels, where the fit wanted to accept more
            "kept_for_cost": kept,  # the thresholds in force met the target; the fit's choice cost more
            "unproven_stages": unproven,  # stage -> labels of its own answers, where it was sent to the top
            # ... and the stages that would be, were the spend caps to starve them (``_stale`` reads it)
            "unproven_if_short": unproven_stages(rows, old, new, cfg)[1],
            # ... and those it would send up at the thresholds put in force, should the labels stop
            "unproven_in_force": unproven_stages(rows, new, new, cfg)[1],
            "feasible": cal.search.feasible,
            "proposed_quality": round(cal.chosen.quality, 6),
            "optimism": round(cal.optimism, 6),
            "est_quality": round(at_new.quality, 6),
            "est_cost_usd": at_new.cost,
            "est_quality_before": None if cal.current is None else round(cal.current.quality, 6),
            "est_cost_usd_before": None if cal.current is None else cal.current.cost,
            "since_seq": since,
            "change": None if change is None else change.evidence,
        }
        return Fit(
            meta.name,
            meta.fingerprint,
            (latest.version if latest is not None else 0) + 1,
            new,
            top,
            rows.n,
            at_new.quality,
            at_new.cost,
            cal.search.feasible,
            evidence,
            self.clock(),
        )
