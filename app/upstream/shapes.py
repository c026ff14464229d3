"""The shape of what an upstream sends, checked where it arrives (``app.upstream.client``).

The fields the proxy reads or rewrites (the choices, their ``index``, ``delta`` / ``message``, tool calls,
``finish_reason``, ``usage``) must have their OpenAI types, so the code further in (the stream relay, the
assembler, accounting, scorers) can rely on them. A reply of another shape is an upstream protocol error,
like bad JSON: the cascade escalates past it, and after the first streamed byte it ends the stream with
an error event. Everything else passes through unread. Checks are exact type checks: orjson builds
plain dicts and lists, and a bool is no index.
"""

from __future__ import annotations

from typing import Any

Json = dict[str, Any]


def chunk_problem(chunk: Json) -> str | None:
    """What is wrong with a ``chat.completion.chunk``'s shape, or None."""
    return _problem(chunk, "delta")


def completion_problem(body: Json) -> str | None:
    """What is wrong with a ``chat.completion``'s shape, or None."""
    return _problem(body, "message")


def _problem(obj: Json, part: str) -> str | None:
    choices = obj.get("choices")
    if choices is not None:
        if type(choices) is not list:
            return "choices is not a list"
        for ch in choices:
            if type(ch) is not dict:
                return "a choice is not an object"
            why = _choice(ch, part)
            if why is not None:
                return why
    usage = obj.get("usage")
    if usage is not None and type(usage) is not dict:
        return "usage is not an object"
    return None


def _choice(ch: Json, part: str) -> str | None:
    index = ch.get("index")
    if index is not None and type(index) is not int:
        return "a choice index is not an integer"
    finish = ch.get("finish_reason")
    if finish is not None and type(finish) is not str:
        return "finish_reason is not a string"
    msg = ch.get(part)
    if msg is None:
        return None
    if type(msg) is not dict:
        return f"{part} is not an object"
    calls = msg.get("tool_calls")
    if calls is None:
        return None
    if type(calls) is not list:
        return "tool_calls is not a list"
    for call in calls:
        if type(call) is not dict:
            return "a tool call is not an object"
        index = call.get("index")
        if index is not None and type(index) is not int:
            return "a tool call index is not an integer"
        fn = call.get("function")
        if fn is not None and type(fn) is not dict:
            return "a tool call's function is not an object"
    return None
