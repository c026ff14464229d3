"""The layout of a learned scorer's feature vector, saved with each model so serving rebuilds it.

Two kinds: ``answer`` vectors (:mod:`app.scoring.features`: one stage's answer, with the prompt and the
earlier stages' answers) for stage scorers, and ``prompt`` vectors (:mod:`app.scoring.prompt_features`:
the request alone) for routers. Each is ``[named features..., hashed token features...]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

FEATURE_SPEC_VERSION = 1
KINDS = ("answer", "prompt")

# Features comparing the answer with earlier stages' answers (``previous_features``).
PREVIOUS_NAMES: tuple[str, ...] = (
    "has_prev",
    "n_prev",
    "agree_prev",
    "agree_any",
    "agree_frac",
    "disagree_prev",
    "prev_agree_each_other",
    "max_jaccard_prev",
    "prev_choice_A",
    "prev_choice_B",
    "prev_choice_C",
    "prev_choice_D",
    "prev_choice_E",
)

ENGINEERED_NAMES: tuple[str, ...] = (
    "bias_one",
    "empty",
    "log_answer_chars",
    "log_prompt_chars",
    "log_answer_prompt_ratio",
    "answer_lines",
    "hedge_count",
    "self_correct_count",
    "refusal",
    "ends_clean",
    "unbalanced_annotation",
    "finish_length",
    "is_choice",
    "choice_clean",
    "choice_from_option_text",
    "choice_A",
    "choice_B",
    "choice_C",
    "choice_D",
    "choice_E",
    "answer_words_log",
    "has_final_mark",
    "final_mark_decorated",
    "final_mark_conflict",
    "final_decimal_zero",
    "has_number",
    "final_integer",
    "final_negative",
    "final_log_magnitude",
    "final_in_prompt",
    "final_in_body",
    "final_is_last_eq_result",
    "prompt_numbers_used_frac",
    "answer_numbers_log",
    "n_ann_log",
    "ann_wrong",
    "ann_wrong_frac",
    "n_eq_log",
    "eq_wrong",
    "eq_wrong_frac",
    "any_arith_wrong",
    "has_code",
    "code_python_parses",
    "code_defines_function",
    "code_non_python",
    "code_lines_log",
    *PREVIOUS_NAMES,
    "has_logprobs",
    "lp_mean",
    "lp_min",
    "lp_p10",
)

# Features of the request alone (``prompt_features``): what a router sees before any answer exists.
PROMPT_NAMES: tuple[str, ...] = (
    "bias_one",
    "log_chars",
    "log_words",
    "log_lines",
    "log_numbers",
    "digit_share",
    "upper_share",
    "question_marks",
    "n_options",
    "has_options",
    "has_code",
    "code_words",
    "math_symbols",
    "log_longest_word",
    "n_messages",
    "has_system",
)


@dataclass(frozen=True)
class FeatureSpec:
    """Layout of the feature vector; saved with a model so that scoring rebuilds the same vector."""

    hash_dim: int = 256
    prompt_tail_chars: int = 1500
    hash_answer: bool = True
    hash_prompt: bool = True
    version: int = FEATURE_SPEC_VERSION
    kind: str = "answer"  # "answer" (a stage scorer) or "prompt" (a router)

    @property
    def names(self) -> tuple[str, ...]:
        return PROMPT_NAMES if self.kind == "prompt" else ENGINEERED_NAMES

    @property
    def dim(self) -> int:
        return len(self.names) + self.hash_dim

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "hash_dim": self.hash_dim,
            "prompt_tail_chars": self.prompt_tail_chars,
            "hash_answer": self.hash_answer,
            "hash_prompt": self.hash_prompt,
            "kind": self.kind,
            "engineered": list(self.names),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureSpec:
        version = int(d.get("version", FEATURE_SPEC_VERSION))
        if version != FEATURE_SPEC_VERSION:
            raise ValueError(f"feature spec version {version} is not supported (want {FEATURE_SPEC_VERSION})")
        kind = str(d.get("kind", "answer"))
        if kind not in KINDS:
            raise ValueError(f"feature spec kind {kind!r} is not one of {', '.join(KINDS)}")
        names = PROMPT_NAMES if kind == "prompt" else ENGINEERED_NAMES
        eng = d.get("engineered")
        if eng is not None and list(eng) != list(names):
            raise ValueError("feature spec lists different engineered features than this version computes")
        return cls(
            hash_dim=int(d.get("hash_dim", 256)),
            prompt_tail_chars=int(d.get("prompt_tail_chars", 1500)),
            hash_answer=bool(d.get("hash_answer", True)),
            hash_prompt=bool(d.get("hash_prompt", True)),
            version=version,
            kind=kind,
        )


def feature_names(spec: FeatureSpec | None = None) -> list[str]:
    spec = spec or FeatureSpec()
    return list(spec.names) + [f"h{i}" for i in range(spec.hash_dim)]
