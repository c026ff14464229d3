"""Cheap, free checks that catch the answers no user wants: empty, refusing or hedging, cut off by the
token limit, filtered, bad JSON when JSON was asked for, tool calls whose arguments do not parse or do
not fit the tool's JSON schema, no tool call when one was required; and (``app.scoring.intent``) no JSON
when only the prompt asked for it, a text answer that writes out a tool call or says it cannot look
things up while a matching tool was offered.

An answer cut at the client's own ``max_tokens`` / ``max_completion_tokens`` (``finish_reason: length``
with such a limit in the request) is what the client asked for, not a defect: it is not vetoed, and
neither is JSON (or tool-call arguments) that the cut left unfinished; every later stage would be cut
at the same limit. A limit the proxy added (an upstream's ``defaults``) is not the client's: there a
cut answer is truncated as before.

Scores: 1.0 ok; 0.3 hedging or answered without the offered tool; 0.0 for the rest. It also implements
``StreamCheck``: a refusal in the first characters of a streamed answer, or a JSON answer that can no
longer become valid JSON, aborts the stage early.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Any

import orjson
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from app.config import HeuristicScorer as HeuristicConfig
from app.scoring.base import Answer, Score, ScoreContext
from app.scoring.intent import has_json, missed_tool, prompt_asks_json

Json = dict[str, Any]

REFUSALS = (
    "i'm sorry, but i can't",
    "i’m sorry, but i can’t",
    "i am sorry, but i cannot",
    "i'm sorry, but i cannot",
    "sorry, i can't",
    "sorry, i cannot",
    "i can't help with",
    "i cannot help with",
    "i can't assist with",
    "i cannot assist with",
    "i'm unable to help",
    "i am unable to help",
    "i'm not able to help",
    "i am not able to help",
    "i won't be able to",
    "i cannot provide",
    "i can't provide",
    "i cannot comply",
    "as an ai language model, i cannot",
    "as an ai, i cannot",
)
HEDGES = (
    "i'm not sure",
    "i am not sure",
    "i don't know",
    "i do not know",
    "i'm not certain",
    "i am not certain",
    "it is impossible to determine",
    "it's impossible to determine",
    "i cannot determine",
    "i can't determine",
    "not enough information",
)
_WS = re.compile(r"\s+")
_FENCE = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.DOTALL | re.IGNORECASE)


class _SchemaCache:
    """Compiled validators keyed by the schema's canonical JSON; bounded so hostile input can't grow it."""

    def __init__(self, size: int = 256) -> None:
        self._size = size
        self._items: OrderedDict[bytes, Draft202012Validator | None] = OrderedDict()

    def get(self, schema: Json) -> Draft202012Validator | None:
        key = orjson.dumps(schema, option=orjson.OPT_SORT_KEYS)
        v = self._items.get(key, False)
        if v is False:
            try:
                Draft202012Validator.check_schema(schema)
                v = Draft202012Validator(schema)
            except SchemaError:
                v = None  # an invalid schema from the client: the upstream judges it, we don't
            self._items[key] = v
            if len(self._items) > self._size:
                self._items.popitem(last=False)
        else:
            self._items.move_to_end(key)
        return v if isinstance(v, Draft202012Validator) else None


_SCHEMAS = _SchemaCache()
_CUT = "cut at the client's max_tokens"


def _normalise(text: str) -> str:
    return _WS.sub(" ", text.lower().replace("’", "'")).strip()


def _json_mode(request: Json) -> Json | None:
    """The JSON schema asked for ({} for plain json_object), or None when no JSON was asked for."""
    rf = request.get("response_format")
    if not isinstance(rf, dict):
        return None
    if rf.get("type") == "json_object":
        return {}
    if rf.get("type") == "json_schema":
        js = rf.get("json_schema")
        schema = js.get("schema") if isinstance(js, dict) else None
        return schema if isinstance(schema, dict) else {}
    return None


def client_limited(request: Json) -> bool:
    """Whether the client set its own output-token limit (a ``length`` finish is then its choice)."""
    return any(
        isinstance(request.get(k), int) and not isinstance(request.get(k), bool)
        for k in ("max_tokens", "max_completion_tokens")
    )


def _strip_fence(text: str) -> str:
    m = _FENCE.match(text)
    return m.group(1) if m else text


def _tool_schemas(request: Json) -> dict[str, Json]:
    out: dict[str, Json] = {}
    for t in request.get("tools") or ():
        fn = t.get("function") if isinstance(t, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            params = fn.get("parameters")
            out[fn["name"]] = params if isinstance(params, dict) else {}
    return out


def _check_tool_calls(request: Json, calls: list[Any]) -> str | None:
    schemas = _tool_schemas(request)
    for i, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict):
            return f"tool_calls[{i}] has no function"
        name = fn.get("name")
        if schemas and (not isinstance(name, str) or name not in schemas):
            return f"tool_calls[{i}] calls unknown tool '{str(name)[:40]}'"
        try:
            args = orjson.loads(fn.get("arguments") or "{}")
        except orjson.JSONDecodeError:
            return f"tool_calls[{i}] arguments are not valid JSON"
        if not isinstance(args, dict):
            return f"tool_calls[{i}] arguments are not a JSON object"
        schema = schemas.get(str(name))
        if schema:
            validator = _SCHEMAS.get(schema)
            if validator is not None:
                err = next(iter(validator.iter_errors(args)), None)
                if err is not None:
                    where = "/".join(str(p) for p in err.absolute_path) or "arguments"
                    return f"tool_calls[{i}] {where} does not fit the tool schema ({err.validator})"
    return None


class Heuristic:
    kind = "heuristic"
    inline = True  # pure CPU: no timeout timer needed

    def __init__(self, cfg: HeuristicConfig) -> None:
        self.cfg = cfg
        extra = tuple(_normalise(p) for p in cfg.phrases)
        self._refusals = REFUSALS + extra
        self._hedges = HEDGES

    async def score(self, ctx: ScoreContext) -> Score:
        return self.check(ctx.request, ctx.answer)

    def check(self, request: Json, answer: Answer) -> Score:
        ok = Score(1.0, "ok")
        for ch in answer.completion.get("choices") or ():
            s = self._check_choice(request, ch.get("message") or {}, ch.get("finish_reason"))
            if s.value < 1.0:
                return s
            if s.reason != "ok":
                ok = s
        return ok

    def _check_choice(self, request: Json, msg: Json, finish: object) -> Score:
        cut = finish == "length"
        if cut and not client_limited(request):
            return Score(0.0, "truncated: finish_reason is length")
        if finish == "content_filter":
            return Score(0.0, "content filtered")
        if msg.get("refusal"):
            return Score(0.0, "refusal")
        calls = msg.get("tool_calls")
        content = msg.get("content")
        text = content if isinstance(content, str) else ""
        if calls:
            if cut:
                return Score(1.0, _CUT)
            problem = _check_tool_calls(request, calls)
            return Score(0.0, problem) if problem else Score(1.0, "ok")
        tc = request.get("tool_choice")
        if tc == "required" or isinstance(tc, dict):
            return Score(0.0, "a tool call was required but none was made")
        if len(text.strip()) < max(1, self.cfg.min_chars):
            return Score(0.0, "empty answer")
        if self.cfg.max_chars is not None and len(text) > self.cfg.max_chars:
            return Score(0.0, f"longer than {self.cfg.max_chars} characters")
        head = _normalise(text[:400])
        for p in self._refusals:
            if p in head:
                return Score(0.0, "refusal")
        schema = None if cut else _json_mode(request)
        if schema is not None:
            try:
                value = orjson.loads(_strip_fence(text))
            except orjson.JSONDecodeError:
                return Score(0.0, "invalid JSON while JSON was asked for")
            if schema:
                validator = _SCHEMAS.get(schema)
                if validator is not None and next(iter(validator.iter_errors(value)), None) is not None:
                    return Score(0.0, "JSON does not fit the requested schema")
        elif not cut and prompt_asks_json(request) and not has_json(text):
            return Score(0.0, "no JSON while the prompt asked for JSON")
        if request.get("tools"):
            missed = missed_tool(request, text)
            if missed is not None:
                return Score(0.0 if missed == "a tool call written as text" else 0.3, missed)
        for p in self._hedges:
            if p in head:
                return Score(0.3, "hedging")
        return Score(1.0, _CUT if cut else "ok")

    # --- StreamCheck ------------------------------------------------------------------------------------

    def check_partial(self, request: Json, text: str) -> str | None:
        if not text:
            return None
        if self.cfg.max_chars is not None and len(text) > self.cfg.max_chars:
            return f"longer than {self.cfg.max_chars} characters"
        if not self.cfg.early_chars:
            return None
        head = _normalise(text[: self.cfg.early_chars])
        for p in self._refusals:
            if p in head:
                return "refusal in the first tokens"
        if _json_mode(request) is not None:
            stripped = text.lstrip()
            if stripped and stripped[0] not in "{[`":
                return "JSON was asked for but the answer does not start like JSON"
        return None
