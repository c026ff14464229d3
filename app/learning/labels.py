"""The one label definition: is a stage's answer as good as the reference (the last stage's) answer?

Free labels (the request reached the last stage), shadow labels (the last stage re-asked later) and
user labels (``POST /v1/feedback``) all answer that question with 1.0 (as good) or 0.0 (not):

* ``compare: exact``: the answers' canonical forms are equal (``app.answers.canonical_answer``: choice
  letter, final number, canonical JSON for JSON answers and tool calls, else normalised text);
* ``compare: judge``: the ``learning.judge`` upstream says so (``JUDGE_PROMPT``; a call, in the background);
* ``compare: auto`` (default): exact when both answers are closed forms (``app.answers.closed_form``),
  the judge when one is free form and a judge is configured, and no label at all otherwise: exact
  match of free-form text would call every early answer wrong and walk the thresholds up until
  everything escalates. Such skipped labels are counted (``cascade_labels_skipped_total{reason}``);
* a user's score ``s`` in 0..1 is 1.0 when ``s >= learning.user_pass_score``, else 0.0 (the raw score is
  stored; the fit converts it). An answer that failed (upstream error) is 0.0; an empty answer next to a
  non-empty reference is 0.0.

``detail`` on a stored label says which comparator decided: ``exact``, ``judge``, ``error``, ``empty``
or ``feedback``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from app.answers import canonical_answer, closed_form
from app.config import Config, LearningConfig

EXACT, JUDGE, SKIP = "exact", "judge", "skip"

# The judge sees the request and both answers; the replay's judge (app.replay.judge) parses this format.
JUDGE_PROMPT = (
    "You compare two answers to the same request. Is answer A as good as answer B: as correct and as "
    "complete (wording and style may differ)? Reply with one word: yes or no.\n\n"
    "Request:\n{question}\n\nAnswer A:\n{a}\n\nAnswer B:\n{b}"
)
JUDGE_MAX_CHARS = 4000  # of the question (its end) and of each answer (its start)
_JUDGE_RE = re.compile(r"\nRequest:\n(.*)\n\nAnswer A:\n(.*)\n\nAnswer B:\n(.*)\Z", re.DOTALL)
_YES_NO = re.compile(r"\b(yes|no)\b", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Verdict:
    """How one answer is labelled: ``how`` is ``exact`` (``value`` is the label), ``judge`` (ask the
    judge) or ``skip`` (no label; ``reason`` says why)."""

    how: str
    value: float | None = None
    reason: str = ""


def compare_mode(config: Config, lcfg: LearningConfig, cascade: str) -> str:
    """The comparator of ``cascade``: its own ``compare``, else ``learning.compare``."""
    cc = config.cascades.get(cascade)
    return cc.compare if cc is not None and cc.compare is not None else lcfg.compare


def verdict(mode: str, text: str, reference: str, prompt: str, *, have_judge: bool) -> Verdict:
    """Decide how the answer ``text`` is labelled next to ``reference`` (both non-None answer texts)."""
    if not reference.strip():
        return Verdict(SKIP, reason="empty_reference")
    if not text.strip():
        return Verdict(EXACT, 0.0, "empty")
    if mode == EXACT or (mode == "auto" and closed_form(text, prompt) and closed_form(reference, prompt)):
        same = canonical_answer(text, prompt) == canonical_answer(reference, prompt)
        return Verdict(EXACT, 1.0 if same else 0.0)
    if have_judge:
        return Verdict(JUDGE)
    return Verdict(SKIP, reason="free_form")


def user_label(score: float, pass_score: float) -> float:
    """A user's 0..1 score as the label: 1.0 at ``pass_score`` or above."""
    return 1.0 if score >= pass_score else 0.0


def judge_prompt(question: str, a: str, b: str) -> str:
    return JUDGE_PROMPT.format(
        question=question[-JUDGE_MAX_CHARS:], a=a[:JUDGE_MAX_CHARS], b=b[:JUDGE_MAX_CHARS]
    )


def parse_judge_prompt(text: str) -> tuple[str, str, str] | None:
    """(question, answer A, answer B) of a ``JUDGE_PROMPT``, as truncated; None for other text."""
    m = _JUDGE_RE.search(text)
    return (m.group(1), m.group(2), m.group(3)) if m else None


def judge_reply(text: str) -> float | None:
    """1.0 / 0.0 from the judge's yes / no; None when it said neither."""
    m = _YES_NO.search(text)
    if m is None:
        return None
    return 1.0 if m.group(1).lower() == "yes" else 0.0
