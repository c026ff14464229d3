"""Request-body helpers in app.protocol that are not covered through the HTTP path alone."""

from __future__ import annotations

from typing import Any

import pytest

from app.protocol import WITHHELD, withhold_quotes


def body(*contents: Any, tool_args: str | None = None) -> dict[str, Any]:
    messages: list[dict[str, Any]] = [{"role": "user", "content": c} for c in contents]
    if tool_args is not None:
        messages.append(
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": tool_args}}
                ],
            }
        )
    return {"model": "m", "messages": messages}


PROMPT = "Summarise the quarterly report for ACME Corp, and list the three risks."


@pytest.mark.parametrize(
    "message",
    [
        f"Input should be a valid string: {PROMPT!r}",  # repr-escaped
        "1 validation error ... 'input': 'SUMMARISE THE QUARTERLY REPORT'",  # case changed, 4 words
        'bad content "summarise\\nthe  quarterly-report" at messages[0]',  # escapes and punctuation
        "prompt too long: ...for ACME Corp, and list...",  # a run from the middle
    ],
)
def test_a_message_quoting_four_words_in_a_row_is_withheld(message: str) -> None:
    assert withhold_quotes(message, body(PROMPT)) == WITHHELD


@pytest.mark.parametrize(
    "message",
    [
        "This model's maximum context length is 4096 tokens; you requested 5000 tokens",
        "Invalid value for 'temperature': must be at most 2",
        "the quarterly numbers are unavailable",  # shares words, never four in a row
        "",
    ],
)
def test_a_message_that_quotes_nothing_is_kept(message: str) -> None:
    assert withhold_quotes(message, body(PROMPT)) == message


def test_short_messages_count_whole_and_every_part_is_checked() -> None:
    # A prompt shorter than four words is a quote when all of it appears in a row.
    assert withhold_quotes("unknown token in 'Hi there'", body("hi there")) == WITHHELD
    assert withhold_quotes("there was a problem, hi", body("hi there")) == "there was a problem, hi"
    # Text parts of multi-part content, later messages and tool-call arguments are prompts too.
    parts = [{"type": "text", "text": "describe this picture of a lighthouse"}, {"type": "image_url"}]
    assert withhold_quotes("cannot: 'this picture of a'", body("first", parts)) == WITHHELD
    args = '{"city": "San Francisco de Macoris"}'
    assert (
        withhold_quotes("arguments 'San Francisco de Macoris' invalid", body("x", tool_args=args)) == WITHHELD
    )
    # Malformed messages are skipped, not fatal (errors are built for requests that may be odd).
    odd = {"messages": [None, {"content": 3}, {"tool_calls": [None, {"function": "x"}]}]}
    assert withhold_quotes("some error", odd) == "some error"


def test_escaped_quotes_are_read_unescaped() -> None:
    prompt = "Wie viel kostet ein Café in München heute?"
    assert (
        withhold_quotes(r"'input': 'wie viel kostet ein caf\u00e9 in m\xfcnchen'", body(prompt)) == WITHHELD
    )
    assert (
        withhold_quotes(r"bad path 'C:\\new\\folder is here'", body("open C:\\new\\folder is here"))
        == WITHHELD
    )
