import math

import pytest

from app.answers import agreeing, agrees, extract_code, extract_number, messages_to_prompt, normalize_answer
from app.scoring.feature_spec import ENGINEERED_NAMES, PREVIOUS_NAMES, FeatureSpec, feature_names
from app.scoring.features import arithmetic_checks, extract_features, with_previous

MC_PROMPT = (
    "The trophy doesn't fit in the suitcase because the _ is too big.\nA) trophy\nB) suitcase\nAnswer:"
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("A", "A"),
        ("B\n", "B"),
        ("(C)", "C"),
        ("A) trophy", "A"),
        ("The answer is B.", "B"),
        ("Answer: (D)", "D"),
        ("#### 18", "18"),
        ("She makes 9 * 2 = $18.\n#### 18", "18"),
        ("so 2 + 3 = 5 apples", "5"),
        ("The total is 1,250 dollars = 1,250", "1250"),
        ("x = 7.50\n#### 7.50", "7.5"),
        ("\\boxed{42}", "42"),
        ("  Hello,   World! ", "hello world"),
        ("", ""),
        ("A cat sat on the mat", "a cat sat on the mat"),
        ("the answer is a dog", "the answer is a dog"),
    ],
)
def test_normalize_answer(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


def test_normalize_answer_maps_option_text_to_letter() -> None:
    assert normalize_answer("suitcase", MC_PROMPT) == "B"
    assert normalize_answer("Trophy.", MC_PROMPT) == "A"
    assert normalize_answer("I do", MC_PROMPT) == "i do"


def test_agrees_is_the_agreement_scorers_rule() -> None:
    """Equal non-empty normal forms, against the last earlier answer that is not empty."""
    assert agrees("The answer is B.", ["B"], MC_PROMPT)
    assert agrees("suitcase", ["(B)"], MC_PROMPT)  # option text and letter name the same choice
    assert not agrees("A", ["B"], MC_PROMPT)
    assert agrees("#### 18", ["It is 18.", "  "])  # an empty last answer is skipped
    assert not agrees("#### 18", ["18", "17"])  # the previous answer, not any earlier one
    assert not agrees("", [""]) and not agrees("18", []) and not agrees("  ", ["  "])


def test_agreeing_compares_tool_calls_and_json_canonically() -> None:
    """Tool calls (as ``message_text`` writes them) and JSON answers agree when their canonical JSON
    is equal: key order and spacing aside; ``any_earlier`` looks past a disagreeing previous answer."""
    call = '[{"name":"get_weather","arguments":"{\\"city\\": \\"Paris\\", \\"days\\": 3}"}]'
    same = '[{"arguments":"{\\"days\\":3,\\"city\\":\\"Paris\\"}","name":"get_weather"}]'
    other = '[{"name":"get_weather","arguments":"{\\"city\\": \\"Lyon\\", \\"days\\": 3}"}]'
    assert agrees(same, [call]) and not agrees(other, [call])
    assert agrees('{"a": 1, "b": [2, 3]}', ['```json\n{"b": [2, 3], "a": 1}\n```'])
    assert agreeing("#### 18", ["18", "17"]) is None
    assert agreeing("#### 18", ["18", "17"], any_earlier=True) == 0
    assert agreeing("#### 18", ["18", "17", " "], any_earlier=True) == 0
    assert agreeing("17", ["18", "17", " "]) == 1
    # the learned scorer's agreement features follow the same rule
    names, spec = feature_names(FeatureSpec(hash_dim=0)), FeatureSpec(hash_dim=0)
    for answer, previous, want_prev, want_any in (
        (same, [call], 1.0, 1.0),
        (other, [call], 0.0, 0.0),
        (same, [call, other], 0.0, 1.0),
    ):
        v = extract_features("Weather in Paris?", answer, previous, spec=spec)
        assert (v[names.index("agree_prev")], v[names.index("agree_any")]) == (want_prev, want_any)


FOUR_OPTIONS = "What is true of Mars?\nA. It is red\nB. It is blue\nC. It has rings\nD. It is a star\nAnswer:"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # how chat models answer multiple choice when they are not terse
        ("**B**", "B"),
        ("**B. It is blue**", "B"),
        ("B\n\nExplanation: Mars is red because of iron oxide.", "B"),
        ("Sure! The answer is:\n\nB) It is blue", "B"),
        ("The answer is: **C**", "C"),
        ("**Answer:** D", "D"),
        ("C is correct.", "C"),
        ("(C) is the right answer", "C"),
        ("A) It is red, as the iron oxide on its surface shows\n\nMars is ...", "A"),
        # not choices
        (
            "A man walks into a bar and then some more words\nand",
            "a man walks into a bar and then some more words and",
        ),
        ("I do", "i do"),
    ],
)
def test_normalize_answer_finds_the_choice_in_chatty_answers(text: str, expected: str) -> None:
    assert normalize_answer(text, FOUR_OPTIONS) == expected


def test_a_first_line_is_a_choice_only_where_the_prompt_offers_lettered_options() -> None:
    text = "A. Lincoln was the sixteenth president of the United States\nHe led the Union."
    assert normalize_answer(text, FOUR_OPTIONS) == "A"
    assert (
        normalize_answer(text)
        == "a lincoln was the sixteenth president of the united states he led the union"
    )
    assert normalize_answer("B\n\nbecause", None) == "B"  # a letter alone on its line


def test_normalize_answer_kinds() -> None:
    assert normalize_answer("A long text ending with 12", kind="number") == "12"
    assert normalize_answer("B", kind="text") == "b"
    assert normalize_answer("Option C is right", kind="choice") == "C"


def test_code_answers_are_text_not_numbers() -> None:
    ans = "```python\ndef f(x):\n    return x + 1\n```"
    assert normalize_answer(ans) == normalize_answer(ans, kind="text")
    assert extract_code(ans) == ("python", "def f(x):\n    return x + 1\n")


def test_extract_number() -> None:
    assert extract_number("so 3 + 4 = 7\n#### 7") == 7.0
    assert extract_number("no numbers") is None
    assert extract_number("costs $1,000.50 in total") == 1000.5


def test_arithmetic_checks() -> None:
    good = "He has 3 * 4 = <<3*4=12>>12 apples and 12 + 5 = 17 pears."
    assert arithmetic_checks(good) == (1, 0, 2, 0)  # the annotated statement is also checked as text
    bad = "He has 3 * 4 = <<3*4=13>>13 apples and 13 + 5 = 19 pears."
    n_ann, ann_bad, n_eq, eq_bad = arithmetic_checks(bad)
    assert (n_ann, ann_bad) == (1, 1) and (n_eq, eq_bad) == (2, 2)
    assert arithmetic_checks("8 x $5 x 60% = $24") == (0, 0, 1, 0)
    assert arithmetic_checks("1/0 = 3") == (0, 0, 0, 0)


def test_feature_vector_shape_and_determinism() -> None:
    spec = FeatureSpec(hash_dim=32)
    v1 = extract_features(
        "Q: 2 apples and 3 pears?", "2 + 3 = 5\n#### 5", ["#### 5"], [-0.1, -2.0], spec=spec
    )
    v2 = extract_features(
        "Q: 2 apples and 3 pears?", "2 + 3 = 5\n#### 5", ["#### 5"], [-0.1, -2.0], spec=spec
    )
    assert v1 == v2
    assert len(v1) == spec.dim == len(feature_names(spec)) == len(ENGINEERED_NAMES) + 32
    names = feature_names(spec)
    assert v1[names.index("agree_prev")] == 1.0
    assert v1[names.index("has_logprobs")] == 1.0
    assert v1[names.index("has_final_mark")] == 1.0
    assert v1[names.index("any_arith_wrong")] == 0.0
    v3 = extract_features("Q: 2 apples and 3 pears?", "2 + 3 = 6\n#### 6", ["#### 5"], spec=spec)
    assert v3[names.index("agree_prev")] == 0.0
    assert v3[names.index("any_arith_wrong")] == 1.0


def test_choice_and_agreement_features() -> None:
    names = feature_names(FeatureSpec(hash_dim=0))
    v = extract_features(MC_PROMPT, "B", ["suitcase"], spec=FeatureSpec(hash_dim=0))
    assert v[names.index("choice_B")] == 1.0
    assert v[names.index("prev_choice_B")] == 1.0
    assert v[names.index("agree_prev")] == 1.0
    assert v[names.index("choice_clean")] == 1.0


def test_with_previous_matches_full_extraction() -> None:
    spec = FeatureSpec(hash_dim=16)
    base = extract_features(MC_PROMPT, "A", (), spec=spec)
    full = extract_features(MC_PROMPT, "A", ["B", "A"], spec=spec)
    assert with_previous(base, MC_PROMPT, "A", ["B", "A"], spec) == full
    assert set(PREVIOUS_NAMES) <= set(ENGINEERED_NAMES)


def test_empty_and_code_answers() -> None:
    names = feature_names(FeatureSpec(hash_dim=0))
    v = extract_features("Write f", "", spec=FeatureSpec(hash_dim=0))
    assert v[names.index("empty")] == 1.0
    code = "Here:\n```python\ndef f(x):\n    return x\n```"
    v = extract_features("Write f", code, spec=FeatureSpec(hash_dim=0))
    assert v[names.index("code_python_parses")] == 1.0
    assert v[names.index("code_defines_function")] == 1.0
    v = extract_features("Write f", "```js\nfunction f(x) { return x; }\n```", spec=FeatureSpec(hash_dim=0))
    assert v[names.index("code_non_python")] == 1.0


def test_messages_to_prompt() -> None:
    assert messages_to_prompt([{"role": "user", "content": "hi"}]) == "hi"
    msgs = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {}}]},
    ]
    assert messages_to_prompt(msgs) == "be brief\n\na"


def test_spec_roundtrip_and_version_check() -> None:
    spec = FeatureSpec(hash_dim=8, prompt_tail_chars=100)
    assert FeatureSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError):
        FeatureSpec.from_dict({**spec.to_dict(), "version": 999})
    with pytest.raises(ValueError):
        FeatureSpec.from_dict({**spec.to_dict(), "engineered": ["x"]})


def test_extraction_of_a_long_prompt_is_complete_and_deterministic() -> None:
    # Its speed is a benchmark figure (bench/), not a wall-clock assertion that flakes on a busy machine.
    prompt = ("Some context sentence with 12 numbers and words. " * 60) + "\nA) first\nB) second\nAnswer:"
    answer = "Step: 12 * 3 = <<12*3=36>>36 apples.\nThen 36 + 4 = 40.\n" * 10 + "#### 40"
    spec = FeatureSpec(hash_dim=256)
    first = extract_features(prompt, answer, ["#### 40"], spec=spec)
    assert len(first) == len(feature_names(spec)) and all(math.isfinite(v) for v in first)
    assert extract_features(prompt, answer, ["#### 40"], spec=spec) == first
