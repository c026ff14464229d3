"""The shape of what an upstream sends, checked where it arrives (``app.upstream.client``).

The fields the proxy reads or rewrites (the choices, their ``index``, ``delta`` / ``message``, tool calls,
``finish_reason``, ``usage``) must have their OpenAI types, so the code further in (the stream relay, the
assembler, accounting, scorers) can rely on them. A reply of another shape is an upstream protocol error,
like bad JSON: the cascade escalates past it, and after the first streamed byte it ends the stream with
an error event. Everything else passes through unread. Checks are exact type checks: orjson builds
plain dicts and lists, and a bool is no index.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Json = dict[str, Any]


def chunk_problem(chunk: Json) -> str | None:
    """What is wrong with a ``chat.completion.chunk``'s shape, or None."""
    return _problem(chunk, "delta")


def completion_problem(body: Json) -> str | None:
    """What is wrong with a ``chat.completion``'s shape, or None."""
    return _problem(body, "message")


def _problem(obj: Json, part: str) -> str | None:
    # The common case (a list of well-formed choices) inline: this runs on every reply and chunk.
    choices = obj.get("choices")
    if choices is not None:
        if type(choices) is not list:
            return "choices is not a list"
        for ch in choices:
            if type(ch) is not dict:
                return "an item of choices is not an object"
            index, finish, msg = ch.get("index"), ch.get("finish_reason"), ch.get(part)
            if index is not None and type(index) is not int:
                return "a choice index is not an integer"
            if finish is not None and type(finish) is not str:
                return "finish_reason is not a string"
            if msg is not None:
                if type(msg) is not dict:
                    return f"{part} is not an object"
                calls = msg.get("tool_calls")
                if calls is not None:
                    why = _each(calls, "tool_calls", _tool_call)
                    if why is not None:
                        return why
    return _typed(obj, "usage", dict, "usage is not an object")


def _each(items: object, name: str, check: Callable[[Json], str | None]) -> str | None:
    """``items`` is a list of objects, each of which passes ``check``."""
    if type(items) is not list:
        return f"{name} is not a list"
    for item in items:
        if type(item) is not dict:
            return f"an item of {name} is not an object"
        why = check(item)
        if why is not None:
            return why
    return None


def _tool_call(call: Json) -> str | None:
    return _typed(call, "index", int, "a tool call index is not an integer") or _typed(
        call, "function", dict, "a tool call's function is not an object"
    )


def _typed(obj: Json, key: str, kind: type, problem: str) -> str | None:
    """``problem`` when ``obj[key]`` is there (not null) and not exactly of type ``kind``."""
    value = obj.get(key)
    return None if value is None or type(value) is kind else problem
