"""Feature extraction for learned answer scorers.

Stdlib only and fast (well under 1 ms for a few-KB prompt and answer).

What a scorer sees at request time, for stage ``k`` of a cascade:

* ``prompt``: the request text. For chat requests use :func:`app.answers.messages_to_prompt` so that
  live traffic and recorded datasets (whose ``prompt`` is the single user message) produce the same text.
* ``answer``: the stage's answer text (``message.content``; tool calls serialised by the caller).
* ``previous``: the answer texts of stages ``0..k-1`` in order (empty at stage 0).
* ``logprobs``: optional token log-probabilities of the answer (natural log), ``None`` when unknown.
* ``finish_reason``: optional (``"length"`` marks truncation).

Public API::

    FeatureSpec(hash_dim=256, prompt_tail_chars=1500)         # fixed-size vector layout, saved with a model
    feature_names(spec) -> list[str]
    extract_features(prompt, answer, previous=(), logprobs=None, finish_reason=None, spec=FeatureSpec())
        -> list[float]                                        # len == spec.dim, deterministic

The vector is ``[engineered features..., hashed token features...]``. Engineered features are generic
(length, hedging, truncation, refusal), task-shaped but harmless elsewhere (choice letters, verified
arithmetic in math answers, code that parses) and cross-stage agreement (the answer's canonical form,
:func:`app.answers.canonical_answer`, equals an earlier stage's: the ``agreement`` rule). Hashed
features are CRC32 buckets of answer tokens and of the prompt's tail, signed (feature hashing), scaled
by 1/sqrt(count) so long texts do not dominate.
"""

from __future__ import annotations

import ast
import functools
import math
import re
import zlib
from collections.abc import Sequence

from app.answers import (
    BOXED_RE,
    FINAL_MARK_RE,
    NUM_RE,
    canon_number,
    canonical_answer,
    choice_letter,
    extract_code,
    final_number_str,
)
from app.scoring.arithmetic import ANNOT_RE, EQ_CLEAN_RE, EQ_RE, arithmetic_checks
from app.scoring.feature_spec import ENGINEERED_NAMES, FeatureSpec

_TOKEN_RE = re.compile(r"[a-z]+|\d+|[^\sa-z\d]")
_FINAL_LINE_RE = re.compile(r"####([^\n]*)")
_NUMBER_WORDS: dict[str, str] = {
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
    "eleven": "11",
    "twelve": "12",
    "fifteen": "15",
    "twenty": "20",
    "thirty": "30",
    "forty": "40",
    "fifty": "50",
    "hundred": "100",
    "thousand": "1000",
    "dozen": "12",
    "twice": "2",
    "double": "2",
    "triple": "3",
    "thrice": "3",
    "half": "2",
    "quarter": "4",
    "third": "3",
}
_WORD_RE = re.compile(r"[a-z]+")


def _python_parses(code: str) -> bool:
    if not code.strip() or len(code) > 20000:
        return False
    try:
        ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    return True


# ----------------------------------------------------------------------------------------------------
# feature vector
# ----------------------------------------------------------------------------------------------------

_HEDGES = (
    "not sure",
    "unsure",
    "i think",
    "perhaps",
    "maybe",
    "probably",
    "might be",
    "it seems",
    "unclear",
    "approximately",
    "assume",
    "assuming",
    "estimate",
    "roughly",
    "round",
    "?",
    "cannot determine",
    "not enough information",
    "ambiguous",
    "depends",
)
_SELF_CORRECT = (
    "however",
    "actually",
    "wait",
    "mistake",
    "correction",
    "recalculate",
    "re-evaluate",
    "let me re",
    "i apologize",
    "error in",
    "incorrect",
    "let's try again",
    "but this",
)
_REFUSALS = (
    "i'm sorry",
    "i am sorry",
    "i cannot",
    "i can't",
    "i can not",
    "as an ai",
    "unfortunately",
    "i'm unable",
    "i am unable",
    "i do not have",
    "i don't have",
)
_NON_PY = ("function ", "console.log", "public static", "#include", "=> {", "var ", "let ", "const ")


_INDEX: dict[str, int] = {n: i for i, n in enumerate(ENGINEERED_NAMES)}


@functools.lru_cache(maxsize=1024)
def _prompt_numbers(ptail: str, with_words: bool) -> frozenset[str]:
    """The numbers a prompt (tail) mentions, canonical; with number words. Cached: every stage's answer
    to one request (and every model's, when fitting) is scored against the same prompt."""
    nums = {c for c in (canon_number(n) for n in NUM_RE.findall(ptail)) if c is not None}
    if with_words:
        nums.update(_NUMBER_WORDS[w] for w in _WORD_RE.findall(ptail.lower()) if w in _NUMBER_WORDS)
    return frozenset(nums)


def _count_any(text: str, needles: Sequence[str]) -> int:
    return sum(text.count(n) for n in needles)


def _log1p(x: float) -> float:
    return math.log1p(max(0.0, x))


def _tokens(text: str) -> list[str]:
    return _TOKEN_RE.findall(text.lower())


def _jaccard(a: set[str], b: set[str]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / max(1, len(a | b))


def _hash_into(vec: list[float], offset: int, dim: int, prefix: bytes, toks: Sequence[str]) -> None:
    if not toks or dim <= 0:
        return
    counts: dict[str, int] = {}
    for t in toks:
        counts[t] = counts.get(t, 0) + 1
    scale = 1.0 / math.sqrt(len(counts))
    for t, c in counts.items():
        h = zlib.crc32(prefix + t.encode("utf-8"))
        idx = offset + (h % dim)
        sign = 1.0 if (h >> 31) & 1 == 0 else -1.0
        vec[idx] += sign * scale * (1.0 + math.log(c))


def previous_features(prompt: str, answer: str, previous: Sequence[str]) -> dict[str, float]:
    """Cross-stage features (agreement with earlier stages' answers); empty when there are none."""
    f: dict[str, float] = {}
    if not previous:
        return f
    a = answer.strip()
    _, code = extract_code(a)
    has_code = bool(code.strip())
    f["has_prev"] = 1.0
    f["n_prev"] = float(len(previous))
    norm = canonical_answer(a, prompt)  # the agreement rule's form (``app.answers.agreeing``)
    prev_norm = [canonical_answer(p, prompt) for p in previous]
    eq = [1.0 if (norm and norm == p) else 0.0 for p in prev_norm]
    f["agree_prev"] = eq[-1]
    if len(prev_norm[-1]) == 1 and prev_norm[-1] in "ABCDE":
        f["prev_choice_" + prev_norm[-1]] = 1.0
    f["agree_any"] = max(eq)
    f["agree_frac"] = sum(eq) / len(eq)
    f["disagree_prev"] = 1.0 - eq[-1]
    if len(prev_norm) >= 2:
        f["prev_agree_each_other"] = 1.0 if len(set(prev_norm)) == 1 and prev_norm[0] else 0.0
    code_toks = set(_tokens(code)) if has_code else None
    my = code_toks if code_toks else set(_tokens(a[:4000]))
    best = 0.0
    for p in previous:
        _, pcode = extract_code(p)
        other = set(_tokens(pcode)) if (code_toks and pcode) else set(_tokens(p[:4000]))
        best = max(best, _jaccard(my, other))
    f["max_jaccard_prev"] = best

    return f


def with_previous(
    base: Sequence[float], prompt: str, answer: str, previous: Sequence[str], spec: FeatureSpec | None = None
) -> list[float]:
    """``base`` (computed with no previous answers) completed with the cross-stage features.

    ``extract_features(p, a, prev, ...) == with_previous(extract_features(p, a, (), ...), p, a, prev)``;
    lets a caller that scores one answer against many earlier-stage combinations reuse the base vector.
    """
    vec = list(base)
    for name, value in previous_features(prompt, answer, previous).items():
        vec[_INDEX[name]] = value
    return vec


def extract_features(
    prompt: str,
    answer: str,
    previous: Sequence[str] = (),
    logprobs: Sequence[float] | None = None,
    finish_reason: str | None = None,
    spec: FeatureSpec | None = None,
) -> list[float]:
    """Fixed-size feature vector (``spec.dim`` floats) for one stage answer. Deterministic."""
    spec = spec or FeatureSpec()
    ptail = prompt[-spec.prompt_tail_chars :] if spec.prompt_tail_chars > 0 else ""
    a = answer.strip()
    al = a.lower()
    f: dict[str, float] = {"bias_one": 1.0}
    f["empty"] = 1.0 if not a else 0.0
    f["log_answer_chars"] = _log1p(len(a))
    f["log_prompt_chars"] = _log1p(len(prompt))
    f["log_answer_prompt_ratio"] = math.log((len(a) + 1.0) / (len(ptail) + 1.0))
    f["answer_lines"] = _log1p(a.count("\n"))
    f["hedge_count"] = _log1p(_count_any(al, _HEDGES))
    f["self_correct_count"] = _log1p(_count_any(al, _SELF_CORRECT))
    f["refusal"] = 1.0 if any(r in al[:300] for r in _REFUSALS) else 0.0
    last = a[-1:] if a else ""
    last_line = a.rsplit("\n", 1)[-1].strip() if a else ""
    f["ends_clean"] = (
        1.0
        if (
            last in ".!?)\"'`]*>}"
            or (last.isdigit() and (len(a) <= 20 or "####" in last_line))
            or (last.isalpha() and len(a) <= 40)
        )
        else 0.0
    )
    f["unbalanced_annotation"] = 1.0 if a.count("<<") != a.count(">>") else 0.0
    f["finish_length"] = 1.0 if finish_reason == "length" else 0.0

    letter = choice_letter(a, None)
    letter_opt = None if letter is not None else choice_letter(a, prompt)
    f["is_choice"] = 1.0 if (letter or letter_opt) else 0.0
    f["choice_clean"] = 1.0 if letter is not None and len(a) <= 3 else 0.0
    f["choice_from_option_text"] = 1.0 if letter_opt is not None else 0.0
    if letter or letter_opt:
        f["choice_" + str(letter or letter_opt)] = 1.0
    f["answer_words_log"] = _log1p(len(a.split()))

    lang, code = extract_code(a)
    has_code = bool(code.strip())
    final_mark = FINAL_MARK_RE.findall(a) or BOXED_RE.findall(a)
    f["has_final_mark"] = 1.0 if final_mark else 0.0
    final_lines = _FINAL_LINE_RE.findall(a) if "####" in a else []
    if final_lines:
        raw = final_lines[-1].strip()
        f["final_mark_decorated"] = 0.0 if re.fullmatch(r"-?[\d,]*\.?\d+", raw) else 1.0
        f["final_decimal_zero"] = 1.0 if re.search(r"\d\.0+\b", raw) else 0.0
        vals = {canon_number(m) for m in (NUM_RE.findall(x) for x in final_lines) for m in m[:1]}
        f["final_mark_conflict"] = 1.0 if len(vals) > 1 else 0.0
    final = None if has_code else final_number_str(a)
    f["has_number"] = 1.0 if final is not None else 0.0
    if final is not None:
        fv = float(final)
        f["final_integer"] = 1.0 if abs(fv - round(fv)) < 1e-9 else 0.0
        f["final_negative"] = 1.0 if fv < 0 else 0.0
        f["final_log_magnitude"] = math.log10(abs(fv) + 1.0)
    p_nums = _prompt_numbers(ptail, with_words=not has_code and len(ptail) <= 3000)
    a_nums_list = (
        [c for c in (canon_number(n) for n in NUM_RE.findall(a)) if c is not None] if not has_code else []
    )
    a_nums = set(a_nums_list)
    if final is not None:
        f["final_in_prompt"] = 1.0 if final in p_nums else 0.0
        f["final_in_body"] = 1.0 if a_nums_list[:-1].count(final) > 0 else 0.0
    f["prompt_numbers_used_frac"] = (len(p_nums & a_nums) / len(p_nums)) if p_nums and a_nums else 0.0
    f["answer_numbers_log"] = _log1p(len(a_nums_list))
    if not has_code and ("=" in a):
        n_ann, ann_bad, n_eq, eq_bad = arithmetic_checks(a)
    else:
        n_ann = ann_bad = n_eq = eq_bad = 0
    f["n_ann_log"] = _log1p(n_ann)
    f["ann_wrong"] = _log1p(ann_bad)
    f["ann_wrong_frac"] = ann_bad / n_ann if n_ann else 0.0
    f["n_eq_log"] = _log1p(n_eq)
    f["eq_wrong"] = _log1p(eq_bad)
    f["eq_wrong_frac"] = eq_bad / n_eq if n_eq else 0.0
    f["any_arith_wrong"] = 1.0 if (ann_bad + eq_bad) > 0 else 0.0
    if final is not None and (n_ann or n_eq):
        results = [r for _, r in ANNOT_RE.findall(a)]
        last_res = canon_number(results[-1]) if results else None
        if last_res is None:
            eqs = EQ_RE.findall(EQ_CLEAN_RE.sub("", a).replace("$", ""))
            last_res = canon_number(eqs[-1][1]) if eqs else None
        f["final_is_last_eq_result"] = 1.0 if last_res == final else 0.0

    f["has_code"] = 1.0 if has_code else 0.0
    if has_code:
        parses = _python_parses(code)
        f["code_python_parses"] = 1.0 if parses else 0.0
        f["code_defines_function"] = 1.0 if ("def " in code) else 0.0
        f["code_non_python"] = (
            1.0
            if (
                lang not in ("", "python", "py", "python3")
                or (not parses and any(n in code for n in _NON_PY))
            )
            else 0.0
        )
        f["code_lines_log"] = _log1p(code.count("\n") + 1)

    if logprobs:
        lps = sorted(float(x) for x in logprobs)
        f["has_logprobs"] = 1.0
        f["lp_mean"] = sum(lps) / len(lps)
        f["lp_min"] = max(-30.0, lps[0])
        f["lp_p10"] = max(-30.0, lps[int(0.1 * (len(lps) - 1))])

    if previous:
        f.update(previous_features(prompt, answer, previous))
    vec = [f.get(name, 0.0) for name in ENGINEERED_NAMES]
    if spec.hash_dim > 0:
        vec.extend([0.0] * spec.hash_dim)
        off = len(ENGINEERED_NAMES)
        if spec.hash_answer:
            atoks = _tokens(a[:4000])
            _hash_into(vec, off, spec.hash_dim, b"a:", atoks)
            if not a:
                _hash_into(vec, off, spec.hash_dim, b"a:", ["<empty>"])
        if spec.hash_prompt and ptail:
            _hash_into(vec, off, spec.hash_dim, b"p:", _tokens(ptail[-600:]))
    return vec
