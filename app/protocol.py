"""OpenAI wire format: request checks, completion/chunk shaping. Imports nothing from ``app`` but errors.

Over 400 lines on purpose: the wire format is one vocabulary (request checks, token estimates, reply
shaping and its replay as chunks) that the api, the engine and the scorers read the same way.

Bodies stay plain dicts (parsed with orjson): the proxy reads a handful of fields and passes everything
else through untouched, so a pydantic round-trip per request or per chunk would be pure cost.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from typing import Any

import orjson

from app.errors import InvalidRequest

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
FINISH_REASONS = frozenset({"stop", "length", "tool_calls", "content_filter", "function_call"})

Json = dict[str, Any]


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _bad(param: str, msg: str) -> InvalidRequest:
    return InvalidRequest(f"'{param}': {msg}", param=param)


def _check_number(body: Json, name: str, lo: float, hi: float, *, integer: bool = False) -> None:
    v = body.get(name)
    if v is None:
        return
    ok = _is_int(v) if integer else _is_num(v)
    if not ok:
        raise _bad(name, f"must be {'an integer' if integer else 'a number'}")
    if not lo <= v <= hi:
        raise _bad(name, f"must be between {lo:g} and {hi:g}")


def validate_chat_request(body: object, *, max_messages: int) -> Json:
    """Check the fields the proxy relies on; return the body. Raises InvalidRequest naming the field.

    Only shape is checked here. Semantics (e.g. a tool message without a preceding tool call) are the
    upstream's to judge, exactly as OpenAI would.
    """
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    model = body.get("model")
    if model is None:
        raise _bad("model", "is required")
    if not isinstance(model, str) or not model:
        raise _bad("model", "must be a non-empty string")
    messages = body.get("messages")
    if messages is None:
        raise _bad("messages", "is required")
    if not isinstance(messages, list):
        raise _bad("messages", "must be an array of message objects")
    if not messages:
        raise _bad("messages", "must contain at least one message")
    if len(messages) > max_messages:
        raise _bad("messages", f"has {len(messages)} messages; the limit is {max_messages}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}]", "must be an object")
        role = m.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise _bad(f"messages[{i}].role", f"must be one of {', '.join(sorted(ROLES))}")
        content = m.get("content")
        if content is not None and not isinstance(content, str | list):
            raise _bad(f"messages[{i}].content", "must be a string, an array of content parts or null")
    for name in ("stream", "logprobs", "parallel_tool_calls", "store"):
        v = body.get(name)
        if v is not None and not isinstance(v, bool):
            raise _bad(name, "must be a boolean")
    so = body.get("stream_options")
    if so is not None:
        if not isinstance(so, dict):
            raise _bad("stream_options", "must be an object")
        if "include_usage" in so and not isinstance(so["include_usage"], bool | None):
            raise _bad("stream_options.include_usage", "must be a boolean")
    _check_number(body, "n", 1, 128, integer=True)
    _check_number(body, "temperature", 0, 2)
    _check_number(body, "top_p", 0, 1)
    _check_number(body, "presence_penalty", -2, 2)
    _check_number(body, "frequency_penalty", -2, 2)
    _check_number(body, "top_logprobs", 0, 20, integer=True)
    _check_number(body, "max_tokens", 1, 10**9, integer=True)
    _check_number(body, "max_completion_tokens", 1, 10**9, integer=True)
    _check_number(body, "seed", -(2**63), 2**63 - 1, integer=True)
    stop = body.get("stop")
    if (
        stop is not None
        and not isinstance(stop, str)
        and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop))
    ):
        raise _bad("stop", "must be a string, an array of strings or null")
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise _bad("tools", "must be an array")
        for i, t in enumerate(tools):
            if not isinstance(t, dict):
                raise _bad(f"tools[{i}]", "must be an object")
            fn = t.get("function")
            if t.get("type", "function") == "function":
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise _bad(f"tools[{i}].function.name", "is required and must be a string")
                params = fn.get("parameters")
                if params is not None and not isinstance(params, dict):
                    raise _bad(f"tools[{i}].function.parameters", "must be a JSON schema object")
    rf = body.get("response_format")
    if rf is not None and (not isinstance(rf, dict) or not isinstance(rf.get("type"), str)):
        raise _bad("response_format.type", "is required and must be a string")
    for name in ("user", "service_tier", "reasoning_effort"):
        v = body.get(name)
        if v is not None and not isinstance(v, str):
            raise _bad(name, "must be a string")
    md = body.get("metadata")
    if md is not None and not isinstance(md, dict):
        raise _bad("metadata", "must be an object")
    return body


# --- ids and shapes -------------------------------------------------------------------------------------


def new_id(prefix: str = "chatcmpl-") -> str:
    return prefix + os.urandom(12).hex()


def now() -> int:
    return int(time.time())


def include_usage(body: Json) -> bool:
    so = body.get("stream_options")
    return bool(isinstance(so, dict) and so.get("include_usage"))


def wants_logprobs(body: Json) -> bool:
    return body.get("logprobs") is True


def estimate_tokens(text: str) -> int:
    """Rough token count (about 4 characters per token) for upstreams that report no usage."""
    return max(1, (len(text) + 3) // 4)


def _prompt_parts(body: Json) -> Iterator[str]:
    for m in body.get("messages") or ():
        c = m.get("content") if isinstance(m, dict) else None
        if isinstance(c, str):
            yield c
        elif isinstance(c, list):
            yield from (p["text"] for p in c if isinstance(p, dict) and isinstance(p.get("text"), str))


def prompt_text(body: Json) -> str:
    return "\n".join(_prompt_parts(body))


_WORD = re.compile(r"[^\W_]+")
QUOTE_WORDS = 4
WITHHELD = "[upstream message withheld: it quotes the request]"
_ESCAPE = re.compile(r"\\(u[0-9a-fA-F]{4}|x[0-9a-fA-F]{2}|.)", re.S)


def _unescape(m: re.Match[str]) -> str:
    e = m.group(1)
    return chr(int(e[1:], 16)) if len(e) > 1 else " "


def _words(text: str) -> list[str]:
    return [w.casefold() for w in _WORD.findall(text)]


def withhold_quotes(text: str, body: Json) -> str:
    """``text`` (an upstream's error message), or a placeholder when it quotes the request: any run of
    ``QUOTE_WORDS`` consecutive words of a message (or the whole of a shorter one) found in it, compared
    word by word so escaping and case do not hide a quote. Upstreams such as vLLM echo the offending
    input in validation errors; the contract says no prompt reaches an error or a log line."""
    said = _words(_ESCAPE.sub(_unescape, text))  # a quote may come JSON- or repr-escaped
    if not said:
        return text
    grams: dict[int, set[tuple[str, ...]]] = {}
    parts: list[str] = list(_prompt_parts(body))
    for m in body.get("messages") or ():
        for call in (m.get("tool_calls") or ()) if isinstance(m, dict) else ():
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                parts.append(fn["arguments"])
    for part in parts:
        words = _words(part)
        k = min(QUOTE_WORDS, len(words))
        if k == 0:
            continue
        if k not in grams:
            grams[k] = {tuple(said[i : i + k]) for i in range(len(said) - k + 1)}
        seen = grams[k]
        if any(tuple(words[i : i + k]) in seen for i in range(len(words) - k + 1)):
            return WITHHELD
    return text


# A reported token count above this is no count (and fits no SQL INTEGER column of the trace store).
MAX_TOKENS = 2**31 - 1


def token_count(value: object) -> int | None:
    """A ``usage`` token count as the upstream reported it, or None when it is missing or implausible
    (not an int, negative, beyond ``MAX_TOKENS``): the caller estimates instead, as for no usage."""
    return value if type(value) is int and 0 <= value <= MAX_TOKENS else None


# Estimating a prompt's tokens when the upstream reports none (llama.cpp servers in streams). What the
# model reads is the chat template's rendering, not the message texts: each message framed by special
# tokens and its role, the reply's own opening, a default system prompt that templates such as Qwen's
# and SmolLM's add when the request has none, and with tools the template's tool instructions plus
# every tool's JSON schema. The constants are fitted to llama.cpp's own counts for SmolLM2 and Qwen2.5
# (tests/fixtures/llamacpp_prompt_tokens.json, recorded by bench/token_counts.py).
_PIECE = re.compile(r"[A-Za-z]+|[^\W\d_]+|\d|\n+|[ \t]{2,}|[^\w\s]+")
MESSAGE_TOKENS = 5  # <|im_start|>role\n ... <|im_end|>\n
REPLY_TOKENS = 3  # <|im_start|>assistant\n
DEFAULT_SYSTEM_TOKENS = 20  # "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
TOOLS_TOKENS = 80  # the template's instructions around the tools' schemas
TOOL_CALL_TOKENS = 8  # <tool_call>{"name": ..., "arguments": ...}</tool_call> around name and arguments
TOOL_RESULT_TOKENS = 6  # <tool_response> ... </tool_response>


def text_tokens(text: str) -> int:
    """Tokens of ``text`` for a modern BPE vocabulary (~150k entries), without a tokenizer: a word of
    ASCII letters is one token per 7 letters (common words are one), other letters count denser (CJK:
    one per character), each digit one (Qwen, Llama 3 and SmolLM split numbers into digits), a run of
    punctuation one per 3 characters, newlines and indentation one per run; single spaces ride on the
    next word. Within about 20% of llama.cpp's counts for prose, code, JSON and mixed scripts."""
    n = 0
    for m in _PIECE.finditer(text):
        s = m.group()
        c = s[0]
        if c.isascii() and c.isalpha():
            n += (len(s) + 6) // 7
        elif c.isalpha():
            cjk = sum(1 for ch in s if ch >= "\u2e80")
            n += cjk + (len(s) - cjk + 3) // 4
        elif c.isdigit() or c in "\n \t":
            n += 1
        else:
            n += (len(s) + 2) // 3
    return n


def _content_tokens(content: object) -> int:
    if isinstance(content, str):
        return text_tokens(content)
    if isinstance(content, list):
        return sum(
            text_tokens(p["text"]) for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return 0


def estimate_prompt_tokens(body: Json) -> int:
    """The prompt tokens a chat-templated model reads for ``body``: see the constants above."""
    n = REPLY_TOKENS
    system = False
    for m in body.get("messages") or ():
        if not isinstance(m, dict):
            continue
        role = m.get("role")
        system = system or role in ("system", "developer")
        n += MESSAGE_TOKENS + _content_tokens(m.get("content"))
        if role == "tool":
            n += TOOL_RESULT_TOKENS
        for call in m.get("tool_calls") or ():
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict):
                n += TOOL_CALL_TOKENS + text_tokens(f"{fn.get('name') or ''} {fn.get('arguments') or ''}")
    if not system:
        n += DEFAULT_SYSTEM_TOKENS
    tools = body.get("tools")
    if isinstance(tools, list) and tools:
        n += TOOLS_TOKENS + sum(text_tokens(orjson.dumps(t).decode()) for t in tools)
    return n


def shape_completion(resp: Json, *, completion_id: str, fallback_model: str, keep_logprobs: bool) -> Json:
    """Make an upstream ``chat.completion`` conform to the schema the client expects (in place)."""
    resp["id"] = completion_id
    resp["object"] = "chat.completion"
    if not isinstance(resp.get("created"), int):
        resp["created"] = now()
    if not resp.get("model"):
        resp["model"] = fallback_model
    for i, ch in enumerate(resp.get("choices") or ()):
        if not isinstance(ch, dict):
            continue
        ch.setdefault("index", i)
        msg = ch.get("message")
        if not isinstance(msg, dict):
            msg = ch["message"] = {"role": "assistant", "content": None}
        msg.setdefault("role", "assistant")
        msg.setdefault("content", None)
        msg.setdefault("refusal", None)
        fr = ch.get("finish_reason")
        if not isinstance(fr, str) or fr not in FINISH_REASONS:
            ch["finish_reason"] = "stop"
        if not keep_logprobs or "logprobs" not in ch:
            ch["logprobs"] = None
    if resp.get("system_fingerprint", "") is None:
        del resp["system_fingerprint"]
    return resp


# Replayed answers go out in pieces of about this many characters (a few tokens), cut after a word.
PIECE_CHARS = 16
_WORDS = re.compile(r"\s*\S+|\s+")


def text_pieces(text: str, size: int = PIECE_CHARS) -> list[str]:
    """``text`` in pieces of at least ``size`` characters (the last may be shorter), each ending at the
    end of a word; "".join(result) == text."""
    if len(text) <= size:
        return [text] if text else []
    out: list[str] = []
    cur: list[str] = []
    n = 0
    for w in _WORDS.findall(text):
        cur.append(w)
        n += len(w)
        if n >= size:
            out.append("".join(cur))
            cur, n = [], 0
    if cur:
        out.append("".join(cur))
    return out


def _slices(text: str, size: int = PIECE_CHARS) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


def _content_deltas(content: str, logprobs: Any) -> list[tuple[Json, Any]]:
    """(delta, logprobs) per content chunk. With logprobs kept, the pieces follow their tokens (a few a
    chunk) so each chunk carries its own; when the tokens do not spell the content, one chunk has all."""
    tokens = logprobs.get("content") if isinstance(logprobs, dict) else None
    if tokens is None:
        return [({"content": piece}, None) for piece in text_pieces(content)]
    if not all(isinstance(t, dict) and isinstance(t.get("token"), str) for t in tokens) or (
        "".join(t["token"] for t in tokens) != content
    ):
        return [({"content": content}, logprobs)]
    out: list[tuple[Json, Any]] = []
    for i in range(0, len(tokens), 4):
        group = tokens[i : i + 4]
        out.append(({"content": "".join(t["token"] for t in group)}, {"content": group, "refusal": None}))
    return out


def completion_to_chunks(resp: Json, *, with_usage: bool, keep_logprobs: bool) -> list[Json]:
    """Replay a buffered ``chat.completion`` as the ``chat.completion.chunk`` events OpenAI would send:
    per choice (one choice a chunk, in index order) the role, the content (or refusal) a few words a
    chunk, each tool call's header then its arguments in pieces, and the choice's finish_reason; then,
    when the client asked for usage, the usage chunk (the answer's own usage, details included)."""
    base = {
        "id": resp["id"],
        "object": "chat.completion.chunk",
        "created": resp["created"],
        "model": resp["model"],
    }
    if resp.get("system_fingerprint"):
        base["system_fingerprint"] = resp["system_fingerprint"]
    if with_usage:
        base["usage"] = None
    chunks: list[Json] = []

    def add(idx: int, delta: Json, finish: str | None = None, logprobs: Any = None) -> None:
        choice = {"index": idx, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        chunks.append({**base, "choices": [choice]})

    for ch in resp.get("choices") or ():
        idx = ch.get("index", 0)
        msg = ch.get("message") or {}
        content, refusal, calls = msg.get("content"), msg.get("refusal"), msg.get("tool_calls")
        lp = ch.get("logprobs") if keep_logprobs else None
        deltas: list[tuple[Json, Any]] = []
        if isinstance(content, str) and content:
            deltas = _content_deltas(content, lp)
        elif lp is not None:
            deltas = [({}, lp)]
        if isinstance(refusal, str) and refusal:
            deltas += [({"refusal": piece}, None) for piece in text_pieces(refusal)]
        # The role first, as OpenAI sends it (with the first tool call's header when there is one).
        first: Json = {"role": "assistant", "content": None if calls and not content else "", "refusal": None}
        heads: list[Json] = []
        for k, tc in enumerate(calls or ()):
            fn = tc.get("function") or {}
            head = {key: tc[key] for key in ("id", "type") if key in tc}
            heads.append({"index": k, **head, "function": {**fn, "arguments": ""}})
        if heads and not deltas:
            first["tool_calls"] = [heads.pop(0)]
        add(idx, first)
        for delta, plp in deltas:
            add(idx, delta, logprobs=plp)
        for k, tc in enumerate(calls or ()):
            if heads and heads[0]["index"] == k:
                add(idx, {"tool_calls": [heads.pop(0)]})
            args = (tc.get("function") or {}).get("arguments")
            for piece in _slices(args) if isinstance(args, str) and args else ():
                add(idx, {"tool_calls": [{"index": k, "function": {"arguments": piece}}]})
        add(idx, {}, ch.get("finish_reason") or "stop")
    if not chunks:
        add(0, {"role": "assistant", "content": ""})
        add(0, {}, "stop")
    if with_usage:
        chunks.append({**base, "choices": [], "usage": resp.get("usage")})
    return chunks


def model_object(model_id: str, owned_by: str, created: int) -> Json:
    return {"id": model_id, "object": "model", "created": created, "owned_by": owned_by}
