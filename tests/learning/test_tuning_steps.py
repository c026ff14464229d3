"""How far one online fit moves the thresholds in force (``tuning.next_thresholds``)."""

from __future__ import annotations

import numpy as np
import pytest

from app.config import LearningConfig
from app.learning.calibration import Rows, fit
from app.learning.tuning import next_thresholds, unproven_stages


def _rows(n: int = 600, seed: int = 0) -> Rows:
    """Three stages; the first is right 95 % of the time when its score is high, the middle one (a weaker
    model) 70 % whatever its score, the last is the reference."""
    rng = np.random.default_rng(seed)
    s0 = rng.random(n)
    s1 = rng.random(n)
    c0 = (rng.random(n) < np.where(s0 > 0.3, 0.95, 0.5)).astype(float)
    c1 = (rng.random(n) < 0.7).astype(float)
    scores = np.stack([s0, s1, np.zeros(n)], axis=1)
    correct = np.stack([c0, c1, np.ones(n)], axis=1)
    cost = np.tile([1.0, 2.0, 20.0], (n, 1))
    return Rows(scores, correct, cost, np.ones(n), [s0, s1])


def test_a_missed_target_is_fixed_at_once_even_by_accepting_more_early() -> None:
    cfg = LearningConfig(target_quality=0.9, max_step=0.05, max_step_up=1.0, margin_z=0.0)
    old = (0.99, 0.05)  # the first stage sends everything on; the weaker middle one accepts it all
    rows = _rows()
    cal = fit(rows, cfg.target_quality, margin_z=0.0, bounds=(0.0, 0.99), current=old)
    assert cal.current is not None and cal.current.quality < 0.8 < cal.chosen.quality
    assert cal.thresholds[0] < old[0] - 0.3  # the fit accepts the first stage's good answers again
    new, missing, *_ = next_thresholds(old, cal, cfg, rows)
    assert missing
    assert new[0] == pytest.approx(cal.thresholds[0])  # all the way, not max_step
    assert new[1] == pytest.approx(min(cal.thresholds[1], old[1] + cfg.max_step_up))


def test_without_a_miss_every_move_is_at_most_max_step() -> None:
    cfg = LearningConfig(target_quality=0.5, max_step=0.05, max_step_up=1.0, margin_z=0.0)
    old = (0.99, 0.99)  # everything escalates: quality is the last stage's, far above a 0.5 target
    rows = _rows()
    cal = fit(rows, cfg.target_quality, margin_z=0.0, bounds=(0.0, 0.99), current=old)
    new, missing, *_ = next_thresholds(old, cal, cfg, rows)
    assert not missing
    assert all(abs(a - b) <= cfg.max_step + 1e-9 for a, b in zip(new, old, strict=True))
    assert new != old  # it does move towards the cheaper fit


def test_a_miss_is_fixed_upwards_at_once() -> None:
    cfg = LearningConfig(target_quality=0.99, max_step=0.05, max_step_up=1.0, margin_z=0.0)
    old = (0.5, 0.5)
    rows = _rows()
    cal = fit(rows, cfg.target_quality, margin_z=0.0, bounds=(0.0, 0.99), current=old)
    new, missing, *_ = next_thresholds(old, cal, cfg, rows)
    assert missing and all(p > o + cfg.max_step for p, o in zip(cal.thresholds, old, strict=True))
    assert new == pytest.approx(cal.thresholds)


def test_a_miss_escalating_fixes_does_not_hurry_the_other_thresholds_down() -> None:
    # The fit raises the first stage and lowers the (weak) middle one; raising the first alone already
    # meets the target, so the middle one still comes down by max_step only.
    cfg = LearningConfig(target_quality=0.9, max_step=0.05, max_step_up=1.0, margin_z=0.0)
    rows = _rows()
    old = (0.0, 0.6)
    cal = fit(rows, cfg.target_quality, margin_z=0.0, bounds=(0.0, 0.99), current=old)
    assert cal.current is not None and cal.current.quality < cfg.target_quality
    assert cal.thresholds[0] > old[0] + cfg.max_step
    new, missing, *_ = next_thresholds(old, cal, cfg, rows)
    assert missing and new[0] == pytest.approx(cal.thresholds[0])
    assert cal.thresholds[1] < old[1] - cfg.max_step
    assert new[1] == pytest.approx(old[1] - cfg.max_step)


def test_without_a_miss_a_dearer_choice_keeps_the_thresholds_in_force() -> None:
    """The cheapest thresholds meeting the target on these labels, in force: the honest fit pays the
    optimism of its choice among many and picks dearer ones; nothing missed, so nothing moves (without
    the rule the middle stage would rise a max_step towards the dearer choice)."""
    cfg = LearningConfig(target_quality=0.9, max_step=0.05, max_step_up=1.0, margin_z=0.0)
    rows = _rows(150, 0)
    old = fit(rows, cfg.target_quality, margin_z=0.0, bounds=(0.0, 0.99)).thresholds
    cal = fit(rows, cfg.target_quality, margin_z=0.0, bounds=(0.0, 0.99), current=old, honest=True)
    assert cal.optimism > 0 and cal.current is not None
    assert cal.current.quality >= cfg.target_quality  # in force: on target
    assert cal.chosen.cost > cal.current.cost and cal.thresholds[1] > old[1] + cfg.max_step
    step = next_thresholds(old, cal, cfg, rows)
    assert not step.missing and step.kept
    assert step.thresholds == pytest.approx(old)
    cheaper = fit(
        rows, cfg.target_quality, margin_z=0.0, bounds=(0.0, 0.99), current=(0.99, 0.99), honest=True
    )
    moved = next_thresholds((0.99, 0.99), cheaper, cfg, rows)  # a cheaper choice still moves
    assert not moved.kept and moved.thresholds != (0.99, 0.99)


def _thin(n_shadow: int, weight: float, n: int = 200, seed: int = 1) -> Rows:
    """Two stages at a threshold of 0.6: the answers the first stage accepts are known from
    ``n_shadow`` shadow labels (all right) weighing ``weight`` each; the escalated ones have free labels
    (weight 1), right 95 % of the time above a score of 0.4."""
    rng = np.random.default_rng(seed)
    s_acc = 0.6 + 0.4 * rng.random(n_shadow)
    s_esc = 0.6 * rng.random(n)
    s0 = np.concatenate([s_acc, s_esc])
    c0 = np.concatenate([np.ones(n_shadow), (rng.random(n) < np.where(s_esc > 0.4, 0.95, 0.5)).astype(float)])
    w = np.concatenate([np.full(n_shadow, weight), np.ones(n)])
    m = s0.shape[0]
    return Rows(
        np.stack([s0, np.zeros(m)], axis=1),
        np.stack([c0, np.ones(m)], axis=1),
        np.tile([1.0, 20.0], (m, 1)),
        w,
        [s0],
    )


@pytest.mark.parametrize(("n_shadow", "weight", "moves"), [(5, 100.0, False), (50, 10.0, True)])
def test_a_threshold_comes_down_only_on_enough_effective_labels(
    n_shadow: int, weight: float, moves: bool
) -> None:
    """Five lucky shadow labels weighing 100 each are not evidence that the first stage may accept more
    (their effective number with the band below is ~7, under min_labels); fifty weighing 10 are."""
    from app.learning.tuning import effective_labels

    cfg = LearningConfig(target_quality=0.9, max_step=0.05, max_step_up=1.0, margin_z=0.0, min_labels=20)
    old = (0.6,)
    rows = _thin(n_shadow, weight)
    cal = fit(rows, cfg.target_quality, margin_z=0.0, bounds=(0.0, 0.99), current=old)
    assert cal.thresholds[0] < old[0] - cfg.max_step  # the fit would accept more
    assert (effective_labels(rows, cal.thresholds, 0) >= cfg.min_labels) == moves
    new, missing, held, *_ = next_thresholds(old, cal, cfg, rows)
    assert not missing
    assert new == (pytest.approx((old[0] - cfg.max_step,)) if moves else old)
    assert (held == {}) == moves


def test_a_stage_the_spend_caps_starve_of_evidence_escalates() -> None:
    """A stage that accepts most requests, whose shadow calls the spend caps rule out, and whose accepted
    answers rest on fewer than STARVED_SHARE x min_labels effective labels is starved (it escalates, so
    the requests it passes on label its answers for free). Not when the caps let its calls through (then
    staleness is the question), not with enough evidence, and not before the first label."""
    from app.learning.tuning import STARVED_SHARE, short_of_labels, starved_stages

    cfg = LearningConfig(shadow_rate=0.1, min_labels=20)  # judged on the newest 400 requests
    population = [(i, 0) for i in range(400)]
    drawn = list(range(0, 400, 10))  # 40 drawn
    assert short_of_labels(population, 1, cfg, drawn[:30], drawn) == [0]  # 30 of 40 ruled out
    assert short_of_labels(population, 1, cfg, drawn[:20], drawn) == []  # half let through
    escalating = [(i, 0 if i % 4 == 0 else 1) for i in range(400)]  # it accepts a quarter
    assert short_of_labels(escalating, 1, cfg, drawn, drawn) == []
    assert short_of_labels(population, 1, LearningConfig(shadow_rate=0.0), drawn, drawn) == []

    rows = _thin(5, 100.0)  # what it accepts above 0.6: five shadow labels weighing 100 each
    starved = starved_stages(rows, (0.6,), [0], cfg)
    assert list(starved) == ["0"] and starved["0"] < STARVED_SHARE * cfg.min_labels
    assert starved_stages(rows, (0.6,), [], cfg) == {}
    assert starved_stages(_thin(50, 10.0), (0.6,), [0], cfg) == {}  # fifty equal ones are evidence
    # Between the two bars it neither escalates nor comes down (test above): no see-saw at the bar.
    assert starved_stages(_thin(12, 10.0), (0.6,), [0], cfg) == {}
    empty = Rows(np.zeros((0, 2)), np.zeros((0, 2)), np.zeros((0, 2)), np.zeros(0), [np.zeros(0)])
    assert starved_stages(empty, (0.6,), [0], cfg) == {}


def test_starvation_is_judged_where_the_fit_heads() -> None:
    """A stage escalated for evidence walks back down max_step a fit: on the way, few labelled answers
    lie above its threshold, but the fit heads where the evidence is, so it is not starved again."""
    from app.learning.tuning import starved_stages, starved_towards

    cfg = LearningConfig(shadow_rate=0.1, min_labels=20)
    rows = _thin(50, 10.0)  # fifty equal labels above 0.6
    assert list(starved_stages(rows, (0.94,), [0], cfg)) == ["0"]  # few of them above 0.94
    assert starved_towards(rows, (0.6,), (0.94,), [0], cfg) == {}
    thin = _thin(5, 100.0)
    assert list(starved_towards(thin, (0.6,), (0.6,), [0], cfg)) == ["0"]
    assert starved_towards(thin, (0.6,), (0.99,), [0], cfg) == {}  # escalating all it can already


def _loose_start(n: int = 20, seed: int = 3) -> Rows:
    """A loose start's first labels: the first stage accepted every request, and its shadow calls also
    ran the middle stage, whose answer was as good as the last's every time."""
    rng = np.random.default_rng(seed)
    s0 = rng.random(n)
    s1 = rng.random(n)
    c0 = (rng.random(n) < np.where(s0 > 0.5, 0.95, 0.4)).astype(float)
    scores = np.stack([s0, s1, np.zeros(n)], axis=1)
    correct = np.stack([c0, np.ones(n), np.ones(n)], axis=1)
    cost = np.tile([1.0, 2.0, 20.0], (n, 1))
    return Rows(scores, correct, cost, np.ones(n), [s0, s1])


def test_a_fit_correcting_a_miss_does_not_leave_a_stage_serving_on_a_handful_of_its_own_labels() -> None:
    """The fit raises the first stage just enough and hands the rest to the middle one, on 20 labels, so
    nothing would reach the last stage (no request labels itself): every stage that would serve a tenth
    or more of the requests on fewer than ``min_labels`` labels of its own answers is escalated past
    instead (the last stage labels them for free). Where a tenth or more still reach the last stage,
    labels flow and the thresholds stand."""
    rows = _loose_start()
    old = (0.0, 0.0)
    cfg = LearningConfig(target_quality=0.9, max_step=0.05, max_step_up=1.0, margin_z=0.0, min_labels=20)
    cal = fit(rows, cfg.target_quality, margin_z=0.0, bounds=(0.0, 0.99), current=old)
    assert cal.current is not None and cal.current.quality < cfg.target_quality
    assert cal.thresholds[0] > 0.3 and cal.thresholds[1] < 0.5  # the fit hands the middle stage the rest
    new, missing, _, unproven, _ = next_thresholds(old, cal, cfg, rows)
    assert missing
    assert new == (0.99, 0.99) and set(unproven) == {"0", "1"}
    assert all(0 < n < cfg.min_labels for n in unproven.values())
    # With enough labels of their own answers, the fit's choice stands.
    few = LearningConfig(target_quality=0.9, max_step=0.05, max_step_up=1.0, margin_z=0.0, min_labels=3)
    new, _, _, unproven, _ = next_thresholds(old, cal, few, rows)
    assert unproven == {} and new[0] == pytest.approx(cal.thresholds[0]) and new[1] < 0.5
    flowing = (cal.thresholds[0], 0.9)  # the middle stage passes most of what it gets on
    assert unproven_stages(rows, old, flowing, cfg) == (flowing, {})
    # Only the stages named (those the spend caps starve, when the fit saw no miss) are judged.
    out, named = unproven_stages(rows, old, cal.thresholds, cfg, only=[1])
    assert set(named) == {"1"} and out[0] == cal.thresholds[0] and out[1] == 0.99
    # ... and every stage after the first one sent up, which gets its requests: the middle stage has 20
    # labels of its own answers, enough at min_labels 20, not at 21.
    out, named = unproven_stages(rows, old, cal.thresholds, cfg, only=[0])
    assert set(named) == {"0"} and out == (0.99, cal.thresholds[1])
    more = LearningConfig(target_quality=0.9, max_step=0.05, max_step_up=1.0, margin_z=0.0, min_labels=21)
    out, named = unproven_stages(rows, old, cal.thresholds, more, only=[0])
    assert set(named) == {"0", "1"} and out == (0.99, 0.99)
