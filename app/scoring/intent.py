"""What a request asks for beyond its fields, for the heuristic scorer: JSON asked for in the prompt only,
and a tool it offered that a text answer should have called.

Both are built to leave good plain answers alone, since a false rejection costs an escalation on every
such request:

* **JSON in the prompt** (instructor's ``MD_JSON`` mode, "respond in JSON" prompts): only an imperative
  asking for JSON output counts (``return ... JSON``, ``respond in JSON``, a ```json example), in a system
  or developer message or the last user message; a question *about* JSON does not. The answer passes
  when any JSON can be pulled from it the way such clients do: the whole answer, a fenced block, or the
  span from the first ``{``/``[`` to the last ``}``/``]``.
* **A tool that was not called** (``tool_choice`` auto or absent, the last message the user's, a text
  answer): only two high-precision signs count. The answer *writes* a call as text (``get_weather(...)``,
  ``{"name": "get_weather", ...}``, ``<tool_call>``): a small model that cannot emit tool calls. Or it
  says it has no access to live data or cannot look things up, while a tool whose name or description
  shares a word with the user's request was offered. A text reply to "hi" with tools on offer, or an
  answer after a tool result, is never touched.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

Json = dict[str, Any]

_HEAD, _TAIL = 4000, 2000  # characters of system messages / of the last user message looked at
_ASKS_JSON = re.compile(
    r"```json"
    r"|\b(?:return|respond|reply|answer|output|provide|give|format|produce|emit|generate|write)\b"
    r"[^.\n]{0,48}?\bjson\b"
    r"|\b(?:in|as)\s+(?:a\s+)?(?:valid\s+)?json\b(?:\s+(?:format|object|only))?"
    r"|\bjson[ _]schema\b",
    re.IGNORECASE,
)
_ABOUT_JSON = re.compile(
    r"\b(?:what\s+is|explain|describe|difference|history\s+of)\b[^.?\n]{0,24}\bjson\b", re.I
)
_FENCED = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL | re.IGNORECASE)
_NO_ACCESS = re.compile(
    r"\bi(?:'m|\s+am)?\s+(?:do\s+not|don't|cannot|can't|unable\s+to|not\s+able\s+to|have\s+no)\s+"
    r"(?:have\s+)?(?:access|browse|look\s+up|check|retrieve|fetch|get\s+real|provide\s+real|real[- ]time)"
    r"|\bno\s+(?:access\s+to\s+)?real[- ]time\b|\bmy\s+knowledge\s+cut-?off\b"
    r"|\bi(?:'d|\s+would|\s+will|'ll)?\s+need\s+to\s+(?:call|use)\s+(?:the|a)\b",
    re.IGNORECASE,
)
_WORD = re.compile(r"[a-z]{3,}")
# fmt: off
_STOP = frozenset({
    "the", "and", "for", "with", "that", "this", "from", "what", "your", "you", "are", "get", "set",
    "make", "find", "about", "into", "any", "all", "can", "how", "use", "using", "list", "given", "when",
    "which", "will", "does", "have", "has", "our", "out", "who", "why", "its", "their", "there",
})  # words too common to tie a request to a tool
# fmt: on


def _text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _last(request: Json) -> Json | None:
    messages = request.get("messages")
    last = messages[-1] if isinstance(messages, list) and messages else None
    return last if isinstance(last, dict) else None


def prompt_asks_json(request: Json) -> bool:
    """JSON asked for in the prompt (not by ``response_format``): see the module doc."""
    texts: list[str] = []
    for m in request.get("messages") or ():
        if isinstance(m, dict) and m.get("role") in ("system", "developer"):
            texts.append(_text(m.get("content"))[:_HEAD])
    last = _last(request)
    if last is not None and last.get("role") == "user":
        texts.append(_text(last.get("content"))[-_TAIL:])
    return any("json" in t.lower() and _ASKS_JSON.search(t) and not _ABOUT_JSON.search(t) for t in texts)


def _parses(s: str) -> bool:
    s = s.strip()
    if not s or s[0] not in "{[":
        return False
    try:
        orjson.loads(s)
    except orjson.JSONDecodeError:
        return False
    return True


def has_json(text: str) -> bool:
    """Whether JSON can be pulled from ``text`` as prompt-JSON clients do (whole, fenced, or braced)."""
    if _parses(text):
        return True
    for block in _FENCED.findall(text):
        if _parses(block):
            return True
    for open_, close in (("{", "}"), ("[", "]")):
        i, j = text.find(open_), text.rfind(close)
        if 0 <= i < j and _parses(text[i : j + 1]):
            return True
    return False


def _tool_names(request: Json) -> dict[str, str]:
    """Function tool name -> its name and description, for word overlap."""
    out: dict[str, str] = {}
    for t in request.get("tools") or ():
        fn = t.get("function") if isinstance(t, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("name"), str) and fn["name"]:
            desc = fn.get("description")
            out[fn["name"]] = fn["name"] + " " + (desc if isinstance(desc, str) else "")
    return out


def _words(text: str) -> set[str]:
    spaced = re.sub(r"([a-z])([A-Z])", r"\1 \2", text).replace("_", " ").replace("-", " ").lower()
    return {w for w in _WORD.findall(spaced) if w not in _STOP}


def missed_tool(request: Json, text: str) -> str | None:
    """Why a text answer should have been a tool call (see the module doc), or None."""
    tc = request.get("tool_choice")
    if tc not in (None, "auto"):
        return None  # none: text is right; required / a named tool: the heuristic checks that itself
    tools = _tool_names(request)
    last = _last(request)
    if not tools or last is None or last.get("role") != "user":
        return None
    for name in tools:
        if re.search(rf"(?<![\w.]){re.escape(name)}\s*\(", text) or re.search(
            rf"\"name\"\s*:\s*\"{re.escape(name)}\"", text
        ):
            return "a tool call written as text"
    if "<tool_call>" in text or "<function_call>" in text:
        return "a tool call written as text"
    if _NO_ACCESS.search(text[:600].replace("’", "'")):
        asked = _words(_text(last.get("content"))[-_TAIL:])
        if any(asked & _words(about) for about in tools.values()):
            return "answered without the offered tool"
    return None
