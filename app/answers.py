"""Answers as text: the normal form two answers are compared in, and the text of a chat message.

Bottom of the package: stdlib only, imported by scoring (agreement, learned features), the trace store
(labels) and replay. Pure and fast (well under 1 ms for a few-KB answer).

API::

    normalize_answer(text, prompt=None, kind="auto") -> str    # "A", "18", "2.5" or normalised text
    agreeing(answer, earlier, prompt=None, any_earlier=False) -> int | None  # the `agreement` rule
    agrees(answer, previous, prompt=None) -> bool             # ... with the previous answer
    extract_number(text) -> float | None                      # the final number of an answer
    extract_code(answer) -> (language, code)                  # the first fenced or [PYTHON] block
    message_text(message) -> str                              # content, or tool calls as compact JSON
    messages_to_prompt(messages) -> str                       # the prompt text of a chat request
    canonical_json(text) -> str | None                        # a JSON object/array answer, canonical
    answer_form(text, prompt=None) -> str                     # empty | json | choice | number | text
    closed_form(text, prompt=None) -> bool                    # json, choice or number: exact match decides
    canonical_answer(text, prompt=None) -> str                # what two closed-form answers compare by
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

NUM_RE = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?|-?\.\d+")
FINAL_MARK_RE = re.compile(r"####\s*\$?\s*(-?[\d,]*\.?\d+)")
BOXED_RE = re.compile(r"\\boxed\{\s*\$?\s*(-?[\d,]*\.?\d+)")
_ANSWER_IS_NUM_RE = re.compile(
    r"(?:final answer|answer)\s*(?:is|:|=)?\s*(?:\*\*)?\s*[:=]?\s*\$?\s*(-?[\d,]*\.?\d+)", re.IGNORECASE
)
_CHOICE_ONLY_RE = re.compile(r"^\s*([\(\[]?)\s*([A-Ea-e])\s*([\)\]\.:,]?)(?:\s|$)")
_ANSWER_IS_CHOICE_RE = re.compile(
    r"(?i:answer|option|choice)\s*(?i:is)?\s*:?\s*(?:\*\*)?\s*[\(\[]?([A-E])(?:[\)\]\.:,\s*]|$)"
)
_CHOICE_IS_RIGHT_RE = re.compile(r"^\s*[\(\[]?([A-E])[\)\]]?\s+is\s+(?i:the\s+)?(?i:correct|right|best)\b")
_EMPHASIS_RE = re.compile(r"\*\*|__")
_OPTION_LINE_RE = re.compile(r"^\s*[\(\[]?([A-E])[\)\]\.:]\s+(.+?)\s*$", re.MULTILINE)
_WS_RE = re.compile(r"\s+")
_PUNCT_RE = re.compile(r"[^\w\s]")


def canon_number(s: str) -> str | None:
    s = s.replace(",", "").strip()
    if not s or s in {"-", ".", "-."}:
        return None
    try:
        v = float(s)
    except ValueError:
        return None
    if not math.isfinite(v):
        return None
    if abs(v - round(v)) < 1e-9 and abs(v) < 1e15:
        return str(round(v))
    return f"{v:.6g}"


def _last_number(text: str) -> str | None:
    nums = NUM_RE.findall(text)
    for n in reversed(nums):
        c = canon_number(n)
        if c is not None:
            return c
    return None


def extract_number(text: str) -> float | None:
    """The final numeric answer: ``#### N``, ``\\boxed{N}``, "answer is N", else the last number."""
    s = final_number_str(text)
    return float(s) if s is not None else None


def final_number_str(text: str) -> str | None:
    for rx in (FINAL_MARK_RE, BOXED_RE):
        found = rx.findall(text)
        if found:
            c = canon_number(found[-1])
            if c is not None:
                return c
    found = _ANSWER_IS_NUM_RE.findall(text)
    if found:
        c = canon_number(found[-1])
        if c is not None:
            return c
    return _last_number(text)


def _prompt_options(prompt: str) -> dict[str, str]:
    """Options of the last multiple-choice question in the prompt: normalised option text -> letter."""
    return _options_of_tail(prompt[-800:])


@functools.lru_cache(maxsize=1024)
def _options_of_tail(tail: str) -> dict[str, str]:
    # Cached: every stage's answer to one request (and every model's, when fitting) reads the same prompt.
    # Callers only read the dict.
    opts: dict[str, str] = {}
    for m in _OPTION_LINE_RE.finditer(tail):
        letter, text = m.group(1), norm_text(m.group(2))
        if text:
            opts[text] = letter  # later (= last question's) options win
    return opts


def norm_text(text: str) -> str:
    return _WS_RE.sub(" ", _PUNCT_RE.sub(" ", text.lower())).strip()


def _choice_only(s: str, limit: int = 40) -> str | None:
    """The letter of a short answer that is only a choice: "B", "(c)", "B) text", "B. text"."""
    if len(s) > limit:
        return None
    m = _CHOICE_ONLY_RE.match(s)
    if m and (len(s) <= 3 or (m.group(2).isupper() and (m.group(1) or m.group(3)))):
        return m.group(2).upper()
    return None


def choice_letter(text: str, prompt: str | None) -> str | None:
    s = text.strip()
    if not s:
        return None
    if "**" in s or "__" in s:  # markdown emphasis: "**B**", "The answer is **C**"
        s = _EMPHASIS_RE.sub("", s).strip()
    letter = _choice_only(s)
    if letter is not None:
        return letter
    nl = s.find("\n")
    if nl > 0:
        first = s[:nl].strip()
        # The choice on a line of its own, an explanation after it ("B\n\nBecause ..."). A longer first
        # line ("B) text") counts only where the prompt offers lettered options: elsewhere "A. Lincoln"
        # is not a choice.
        lettered = bool(prompt and _prompt_options(prompt))
        letter = _choice_only(first, 200 if lettered else 3)
        if letter is not None:
            return letter
    m2 = _ANSWER_IS_CHOICE_RE.search(s[:400]) or _CHOICE_IS_RIGHT_RE.match(s)
    if m2:
        return m2.group(1).upper()
    if prompt:
        opts = _prompt_options(prompt)
        if opts:
            t = norm_text(s[:200])
            if t in opts:
                return opts[t]
            for opt_text, letter in opts.items():
                if t.startswith(opt_text + " ") or t == opt_text:
                    return letter
    return None


def normalize_answer(text: str, prompt: str | None = None, kind: str = "auto") -> str:
    """Canonical form of an answer, for agreement between stages.

    ``kind``: ``"choice"`` (a letter A-E), ``"number"`` (canonical number string), ``"text"``
    (lower-cased, punctuation-free, whitespace-collapsed, at most 300 chars) or ``"auto"``:
    a choice letter when the answer is one (or, given ``prompt``, names one of its options), else a
    number when the answer marks one (``#### N``, ``\\boxed{N}``, "answer is N") or is a short
    computation, else text. Returns ``""`` for an empty answer.
    """
    s = text.strip()
    if not s:
        return ""
    if kind == "choice":
        return choice_letter(s, prompt) or norm_text(s)[:300]
    if kind == "number":
        return final_number_str(s) or norm_text(s)[:300]
    if kind == "text":
        return norm_text(s)[:300]
    letter = choice_letter(s, prompt)
    if letter is not None:
        return letter
    if "```" not in s and "[PYTHON]" not in s:
        for rx in (FINAL_MARK_RE, BOXED_RE):
            found = rx.findall(s)
            if found:
                c = canon_number(found[-1])
                if c is not None:
                    return c
        m = _ANSWER_IS_NUM_RE.findall(s)
        if m:
            c = canon_number(m[-1])
            if c is not None:
                return c
        if len(s) <= 3000 and ("=" in s or len(s) <= 20):
            c2 = _last_number(s)
            if c2 is not None:
                return c2
    return norm_text(s)[:300]


_CODE_FENCE_RE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_PY_TAG_RE = re.compile(r"\[PYTHON\](.*?)(?:\[/PYTHON\]|\Z)", re.DOTALL)


def agreeing(
    answer: str, earlier: Sequence[str], prompt: str | None = None, *, any_earlier: bool = False
) -> int | None:
    """The ``agreement`` rule, one for the scorer on the request path and for the fit and baselines:
    the index in ``earlier`` (answer texts in stage order, tool calls as ``message_text`` writes them)
    of the answer that ``answer`` agrees with, or None. Two answers agree when their canonical forms
    (``canonical_answer``: canonical JSON for JSON answers and tool calls, else ``normalize_answer``)
    are equal and not empty. Blank earlier answers are skipped; of the others only the last counts
    (``with: previous``), or with ``any_earlier`` each, the latest first (``with: any``)."""
    mine = canonical_answer(answer, prompt)
    if not mine:
        return None
    for i in range(len(earlier) - 1, -1, -1):
        other = earlier[i]
        if not other.strip():
            continue
        if canonical_answer(other, prompt) == mine:
            return i
        if not any_earlier:
            return None
    return None


def agrees(answer: str, previous: Sequence[str], prompt: str | None = None) -> bool:
    """``agreeing`` with ``with: previous``: the answer agrees with the last non-empty earlier one."""
    return agreeing(answer, previous, prompt) is not None


def extract_code(answer: str) -> tuple[str, str]:
    """(language tag, code) of the answer's first fenced or [PYTHON] block; ("", "") when none."""
    m = _CODE_FENCE_RE.search(answer)
    if m:
        return m.group(1).lower(), m.group(2)
    m2 = _PY_TAG_RE.search(answer)
    if m2:
        return "python", m2.group(1)
    return "", ""


def message_text(message: Mapping[str, Any]) -> str:
    """The text features see for one answer message: its content, or for a tool-call answer its calls
    as compact JSON. Serving (the learned scorer) and the trace store both use this one form."""
    content = message.get("content")
    if isinstance(content, str) and content:
        return content
    calls = message.get("tool_calls")
    if not isinstance(calls, list) or not calls:
        return ""
    fns = [c.get("function") for c in calls if isinstance(c, Mapping)]
    return json.dumps(
        [{"name": f.get("name"), "arguments": f.get("arguments")} for f in fns if isinstance(f, Mapping)],
        separators=(",", ":"),
    )


def messages_to_prompt(messages: Sequence[dict[str, Any]]) -> str:
    """Flatten OpenAI chat messages into the prompt text features are computed on.

    A single user message yields exactly its content (the shape of recorded datasets); otherwise the
    contents are joined with blank lines (text parts of multi-part contents only).
    """
    parts: list[str] = []
    for msg in messages:
        content = msg.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            for part in content:
                if (
                    isinstance(part, dict)
                    and part.get("type") == "text"
                    and isinstance(part.get("text"), str)
                ):
                    parts.append(part["text"])
    return "\n\n".join(parts)


# --- closed forms: answers that one exact comparison can judge ------------------------------------------

_JSON_FENCE_RE = re.compile(r"^```[ \t]*(?:json)?[ \t]*\n(.*?)\n?```$", re.DOTALL | re.IGNORECASE)
CLOSED_FORMS = ("json", "choice", "number")


def _expand_arguments(value: Any) -> Any:
    """Tool calls as ``message_text`` writes them carry their arguments as a JSON string: parse it, so
    two calls that differ only in the arguments' key order or spacing compare equal."""
    if isinstance(value, list):
        return [_expand_arguments(v) for v in value]
    if isinstance(value, dict):
        out = {k: _expand_arguments(v) for k, v in value.items()}
        args = out.get("arguments")
        if isinstance(args, str):
            try:
                parsed: Any = json.loads(args)
            except ValueError:
                parsed = args
            out["arguments"] = parsed
        return out
    return value


def canonical_json(text: str) -> str | None:
    """The canonical form (sorted keys, no spaces) of an answer that is one JSON object or array,
    optionally in a single ```json fence; None for anything else (a bare string or number is not)."""
    s = text.strip()
    m = _JSON_FENCE_RE.match(s)
    if m:
        s = m.group(1).strip()
    if not s or s[0] not in "[{":
        return None
    try:
        value = json.loads(s)
    except ValueError:
        return None
    if not isinstance(value, dict | list):
        return None
    return json.dumps(_expand_arguments(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def answer_form(text: str, prompt: str | None = None) -> str:
    """What kind of answer ``text`` is: ``"empty"``; ``"json"`` (one JSON object or array: structured
    output, tool calls as ``message_text`` writes them); ``"choice"`` (a choice letter, as
    ``normalize_answer`` finds it); ``"number"`` (a marked or short numeric answer, as
    ``normalize_answer`` finds it); else ``"text"`` (free form)."""
    s = text.strip()
    if not s:
        return "empty"
    if canonical_json(s) is not None:
        return "json"
    if choice_letter(s, prompt) is not None:
        return "choice"
    norm = normalize_answer(s, prompt)
    return "number" if canon_number(norm) == norm else "text"


def closed_form(text: str, prompt: str | None = None) -> bool:
    """True when the answer is a closed form (a choice letter, a number, JSON or a tool call): two such
    answers are as good as each other exactly when their canonical forms are equal. Free-form text is
    not: two models never word it the same way."""
    return answer_form(text, prompt) in CLOSED_FORMS


def canonical_answer(text: str, prompt: str | None = None) -> str:
    """What answers are compared by: canonical JSON for a JSON answer, else ``normalize_answer``."""
    return canonical_json(text) or normalize_answer(text, prompt)
