"""A fake OpenAI-compatible upstream: a plain ASGI app whose request `model` picks its behaviour.

The model name is one or more directives joined by '+', e.g. `slow-200+refuse` or `tools+logprobs`.
Unknown directives are ignored, so any real model name ("gpt-4o-mini") behaves like `ok`. The table
of directives is `parse_directives`; the pure builders (`build_completion`, `iter_chunks`) are public
so tests and benchmarks can compute the exact reply a request will get.

Hand-written ASGI + orjson (no FastAPI/pydantic): benchmarks drive it at thousands of requests/s.
Run it standalone with `python -m tests.fake_upstream --host 127.0.0.1 --port 8081`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import itertools
import json
import logging
import math
import random
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import httpx
import orjson
import uvicorn

Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

DEFAULT_CONTENT = "The answer is 42."
REFUSAL = "I'm sorry, but I can't help with that request."
DEFAULT_CONF = 0.95
STALL_S = 30.0
CUT_AFTER = 3  # `drop`/`stall` streams: events sent before the cut (role chunk + 2 content chunks)
MAX_RECORDED = 1000
MODELS = ("ok", "echo", "refuse")

_JSON = [(b"content-type", b"application/json")]
_SSE = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    429: "rate_limit_error",
}
_PIECES = re.compile(r"\s*\S+|\s+")


class DroppedConnection(httpx.RemoteProtocolError):
    """Raised by the app for `drop`: a real server closes the socket mid-body; in-process
    (httpx.ASGITransport) the client sees this same httpx error type."""


@dataclasses.dataclass(frozen=True, slots=True)
class Behaviour:
    content: str = DEFAULT_CONTENT
    echo: bool = False  # content = orjson dump of the request body
    tools: str | None = None  # "ok" | "badargs" | "mismatch"
    finish_reason: str = "stop"
    logprobs: bool = False  # include logprobs even when not asked
    conf: float = DEFAULT_CONF
    slow_ms: int = 0
    chunk_delay_ms: int = 0
    error_status: int | None = None
    flaky: int = 0
    drop: bool = False
    stall: bool = False
    badjson_body: bool = False
    error_in_200: bool = False
    html: bool = False
    no_usage: bool = False
    no_logprobs: bool = False  # `nologprobs`: never sends logprobs, asked or not
    logprobs_need_top: bool = False  # `llamacpp`: logprobs only when top_logprobs is set too
    varied: bool = False  # `varied`: choice i says "<content> v{i}"; with tools, its call gets "variant": i
    reply_model: str | None = None
    leak: str | None = None  # `leak`: error messages echo the request's authorization header
    quote: str | None = None  # `quote`: error messages echo the last message, as vLLM's validation errors do
    chaos: float = 0.0  # percent of requests that get a random fault (see CHAOS_FAULTS)
    ptokens: int | None = None  # `ptokens-<n>`: the usage reports n prompt tokens, however absurd
    badchunk: str | None = None  # `badchunk-<kind>`: a stream's chunk CUT_AFTER is malformed (BAD_CHUNKS)
    gated: bool = False  # `gated`: the reply waits until the test sets `FakeUpstream.gate`
    agent: bool = False  # `agent`: a tool call; text quoting the tool's result once one is the last message
    details: bool = False  # `details`: usage with token details and a cost, and a system_fingerprint
    bare: bool = False  # `bare`: a non-stream reply with only what sloppy servers send (no created, model...)
    hollow: bool = False  # `hollow`: a stream of no chunk at all, only `[DONE]`
    tail_ms: int = 0  # `tail-<ms>-<pct>`: prompts whose seeded draw (prompt_draw) is under pct % wait ms more
    tail_pct: float = 0.0
    no_stream_tools: bool = (
        False  # `nostreamtools`: a streamed request with tools gets a 500 (llama-cpp-python)
    )


_FLAGS: dict[str, dict[str, Any]] = {
    "ok": {},
    "echo": {"echo": True},
    "refuse": {"content": REFUSAL, "echo": False},
    "empty": {"content": "", "echo": False},
    "truncated": {"finish_reason": "length"},
    "json": {"content": '{"answer": 42}', "echo": False},
    "badjson": {"content": '{"answer": 42', "echo": False},
    "tools": {"tools": "ok"},
    "tools-badargs": {"tools": "badargs"},
    "tools-mismatch": {"tools": "mismatch"},
    "logprobs": {"logprobs": True},
    "slow": {"slow_ms": 2000},
    "drop": {"drop": True},
    "stall": {"stall": True},
    "badjson-body": {"badjson_body": True},
    "error-in-200": {"error_in_200": True},
    "html": {"html": True},
    "no-usage": {"no_usage": True},
    "nologprobs": {"no_logprobs": True},
    # llama-cpp-python's server: no usage in streams, and no logprobs unless top_logprobs is set.
    "llamacpp": {"no_usage": True, "logprobs_need_top": True},
    "varied": {"varied": True},
    "leak": {"leak": ""},
    "quote": {"quote": ""},
    "gated": {"gated": True},
    "agent": {"tools": "ok", "agent": True},
    "details": {"details": True},
    "bare": {"bare": True},
    "hollow": {"hollow": True},
    "nostreamtools": {"no_stream_tools": True},
}
_PREFIXED: dict[str, Callable[[str], dict[str, Any]]] = {
    "answer-": lambda v: {"content": v.replace("_", " "), "echo": False},
    "words-": lambda v: {"content": " ".join(f"w{i}" for i in range(int(v))), "echo": False},
    "conf-": lambda v: {"conf": min(1.0, max(0.0, float(v)))},
    "slow-": lambda v: {"slow_ms": int(v)},
    "chunkdelay-": lambda v: {"chunk_delay_ms": int(v)},
    "error-": lambda v: {"error_status": int(v)} if 400 <= int(v) <= 599 else {},
    "flaky-": lambda v: {"flaky": int(v)},
    "model-": lambda v: {"reply_model": v},
    "chaos-": lambda v: {"chaos": min(100.0, max(0.0, float(v)))},
    "ptokens-": lambda v: {"ptokens": int(v)},
    "badchunk-": lambda v: {"badchunk": v} if v in BAD_CHUNKS else {},
    "tail-": lambda v: {"tail_ms": int(v.partition("-")[0]), "tail_pct": float(v.partition("-")[2])},
}
# `badchunk-<kind>`: valid JSON of the wrong shape. A stream's chunk CUT_AFTER carries BAD_CHUNKS[kind]
# as its choice; a whole reply has BAD_CHOICES[kind] as its first choice.
BAD_CHUNKS: dict[str, Any] = {
    "toolcalls": {"index": 0, "delta": {"tool_calls": 5}, "finish_reason": None},
    "index": {"index": [0], "delta": {"content": "x"}, "finish_reason": None},
    "toolcall": {
        "index": 0,
        "delta": {"tool_calls": [{"index": [0], "function": {}}]},
        "finish_reason": None,
    },
    "choice": {"index": 0, "delta": "not an object", "finish_reason": None},
    "finish": {"index": 0, "delta": {"content": "x"}, "finish_reason": 1},
    "notobject": ["not", "a", "choice"],
}
_MSG = {"role": "assistant", "content": "x", "refusal": None}
BAD_CHOICES: dict[str, Any] = {
    "toolcalls": {"index": 0, "message": {**_MSG, "tool_calls": 5}, "finish_reason": "stop"},
    "index": {"index": [0], "message": _MSG, "finish_reason": "stop"},
    "toolcall": {
        "index": 0,
        "message": {**_MSG, "tool_calls": [{"id": "c", "function": "f"}]},
        "finish_reason": "stop",
    },
    "choice": {"index": 0, "message": "not an object", "finish_reason": "stop"},
    "finish": {"index": 0, "message": _MSG, "finish_reason": 1},
    "notobject": ["not", "a", "choice"],
}
# `chaos-<pct>`: each request, with probability pct/100 (seeded RNG: `FakeUpstream(seed=...)`), gets one
# of these faults, chosen uniformly: HTTP 500, HTTP 429, a stall (timeout), a mid-body/mid-stream drop,
# an unparsable body.
CHAOS_FAULTS: dict[str, dict[str, Any]] = {
    "500": {"error_status": 500},
    "429": {"error_status": 429},
    "timeout": {"stall": True},
    "drop": {"drop": True},
    "badjson": {"badjson_body": True},
}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a server a test starts in another process)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@functools.lru_cache(maxsize=4096)
def parse_directives(model: str) -> Behaviour:
    """`slow-200+refuse` -> Behaviour. Later content directives win; unknown ones are ignored."""
    fields: dict[str, Any] = {}
    for part in model.split("+"):
        if part in _FLAGS:
            fields.update(_FLAGS[part])
            continue
        for prefix, make in _PREFIXED.items():
            if part.startswith(prefix):
                with contextlib.suppress(ValueError):
                    fields.update(make(part[len(prefix) :]))
                break
    return Behaviour(**fields)


# --- pure builders -------------------------------------------------------------------------------


def prompt_tokens(request: dict[str, Any]) -> int:
    messages = request.get("messages") or []
    return sum(len(str((m.get("content") if isinstance(m, dict) else m) or "")) // 4 + 4 for m in messages)


def sample_value(schema: Any) -> Any:
    """A simple value that fits a JSON schema (required properties filled by type)."""
    if not isinstance(schema, dict):
        return "test"
    if schema.get("enum"):
        return schema["enum"][0]
    if "const" in schema:
        return schema["const"]
    for key in ("anyOf", "oneOf", "allOf"):
        if schema.get(key):
            return sample_value(schema[key][0])
    kind = schema.get("type", "object" if "properties" in schema else "string")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        props = schema.get("properties") or {}
        return {name: sample_value(props.get(name, {})) for name in schema.get("required") or []}
    if kind == "array":
        return [sample_value(schema.get("items", {})) for _ in range(int(schema.get("minItems", 0)))]
    return {"string": "test", "integer": 1, "number": 1.5, "boolean": True, "null": None}.get(kind, "test")


def _mismatch_value(params: dict[str, Any]) -> Any:
    """Valid JSON that does not fit `params`: required properties left out, the others mistyped."""
    props: dict[str, Any] = params.get("properties") or {}
    required = set(params.get("required") or [])
    wrong = {
        name: 12345 if isinstance(sub, dict) and sub.get("type") == "string" else "wrong-type"
        for name, sub in props.items()
        if name not in required
    }
    return wrong if (required or wrong) else "not-an-object"


def tool_call(request: dict[str, Any], mode: str, call_id: str, variant: int = 0) -> dict[str, Any]:
    """The tool call of one choice; ``variant`` > 0 (choice ``variant`` of a `varied` reply) adds a
    ``"variant": N`` argument, so the choices of one reply call the tool differently."""
    tools = request.get("tools") or [{}]
    function = (tools[0] if isinstance(tools[0], dict) else {}).get("function") or {}
    params = function.get("parameters") or {"type": "object"}
    if mode == "badargs":
        arguments = '{"answer": 42, "unterminated'
    else:
        value = _mismatch_value(params) if mode == "mismatch" else sample_value(params)
        if variant and isinstance(value, dict):
            value = {**value, "variant": variant}
        arguments = orjson.dumps(value).decode()
    name = function.get("name") or "fake_tool"
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def choice_contents(request: dict[str, Any], b: Behaviour) -> list[str | None]:
    """Content per choice (None for a tool-call choice)."""
    n = request.get("n")
    n = max(1, min(int(n), 128)) if isinstance(n, int) else 1
    if b.tools:
        return [None] * n
    text = orjson.dumps(request).decode() if b.echo else b.content
    return [f"{text} v{i}" if b.varied else text for i in range(n)]


def split_pieces(text: str) -> list[str]:
    """Word chunks, each with its leading whitespace; "".join(result) == text."""
    return _PIECES.findall(text)


def token_logprob(token: str, p: float, top: int) -> dict[str, Any]:
    lp = math.log(p) if p > 0 else -9999.0
    alt = math.log(max(1.0 - p, 1e-12) / max(top - 1, 1))
    tops = [{"token": token, "logprob": lp, "bytes": None}]
    tops += [{"token": f"alt{j}", "logprob": alt, "bytes": None} for j in range(1, top)]
    return {"token": token, "logprob": lp, "bytes": None, "top_logprobs": tops[:top]}


def wants_logprobs(request: dict[str, Any], b: Behaviour) -> bool:
    if b.no_logprobs:
        return False
    if b.logprobs_need_top and not isinstance(request.get("top_logprobs"), int):
        return False
    return b.logprobs or request.get("logprobs") is True


def _logprobs(request: dict[str, Any], b: Behaviour, tokens: list[str]) -> dict[str, Any]:
    top = request.get("top_logprobs")
    top = top if isinstance(top, int) and top > 0 else 0
    return {"content": [token_logprob(t, b.conf, top) for t in tokens], "refusal": None}


def _completion_tokens(content: str | None, calls: list[dict[str, Any]] | None) -> int:
    text = content if calls is None else calls[0]["function"]["arguments"]
    return max(1, len(text or "") // 4)


FINGERPRINT = "fp_fake_0"
COST_USD = 0.000123  # `details`: the usage.cost the fake reports


def _usage(request: dict[str, Any], completion: int, b: Behaviour) -> dict[str, Any]:
    prompt = prompt_tokens(request) if b.ptokens is None else b.ptokens
    total = min(prompt + completion, 2**64 - 1)  # JSON has no limit; orjson (and many servers) do
    usage: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": total}
    if b.details:
        usage["prompt_tokens_details"] = {"cached_tokens": prompt // 2, "audio_tokens": 0}
        usage["completion_tokens_details"] = {"reasoning_tokens": 1, "audio_tokens": 0}
        usage["cost"] = COST_USD
    return usage


def _turn(request: dict[str, Any], b: Behaviour) -> Behaviour:
    """`agent`: after a tool result (or when no tools were offered) the agent answers in text, quoting
    the result."""
    if not b.agent:
        return b
    if not request.get("tools"):
        return dataclasses.replace(b, tools=None)
    messages = request.get("messages")
    last = messages[-1] if isinstance(messages, list) and messages else None
    if isinstance(last, dict) and last.get("role") == "tool":
        return dataclasses.replace(b, tools=None, content=f"The tool said: {last.get('content')}")
    return b


def build_completion(
    request: dict[str, Any],
    behaviour: Behaviour | None = None,
    *,
    completion_id: str = "chatcmpl-fake-0",
    created: int | None = None,
) -> dict[str, Any]:
    """The non-stream `chat.completion` object the fake returns for `request`."""
    b = _turn(request, behaviour or parse_directives(str(request.get("model", "ok"))))
    choices, completion = [], 0
    for i, content in enumerate(choice_contents(request, b)):
        calls = [tool_call(request, b.tools, f"call_fake_{i}", i if b.varied else 0)] if b.tools else None
        message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
        if calls:
            message["tool_calls"] = calls
        logprobs = _logprobs(request, b, split_pieces(content or "")) if wants_logprobs(request, b) else None
        finish = "tool_calls" if calls else b.finish_reason
        choices.append({"index": i, "message": message, "finish_reason": finish, "logprobs": logprobs})
        completion += _completion_tokens(content, calls)
    if b.badchunk is not None:
        choices[0] = BAD_CHOICES[b.badchunk]
    out = {
        "id": completion_id,
        "object": "chat.completion",
        "created": created or int(time.time()),
        "model": b.reply_model or str(request.get("model", "ok")),
        "choices": choices,
        "usage": _usage(request, completion, b),
    }
    if b.details:
        out["system_fingerprint"] = FINGERPRINT
    if b.bare:  # what some OpenAI-compatible servers leave out, or send as null or their own words
        del out["created"], out["model"]
        out["system_fingerprint"] = None
        for ch in choices:
            del ch["index"], ch["logprobs"], ch["message"]["role"], ch["message"]["refusal"]
            ch["finish_reason"] = "eos"
    return out


def iter_chunks(
    request: dict[str, Any],
    behaviour: Behaviour | None = None,
    *,
    completion_id: str = "chatcmpl-fake-0",
    created: int | None = None,
) -> Iterator[dict[str, Any]]:
    """The `chat.completion.chunk` objects of a full stream (without the `[DONE]` sentinel)."""
    b = _turn(request, behaviour or parse_directives(str(request.get("model", "ok"))))
    opts = request.get("stream_options")
    usage = isinstance(opts, dict) and opts.get("include_usage") is True and not b.no_usage
    lp = wants_logprobs(request, b)
    head = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created or int(time.time()),
        "model": b.reply_model or str(request.get("model", "ok")),
    }
    if b.details:
        head["system_fingerprint"] = FINGERPRINT
    if usage:
        head["usage"] = None

    def chunk(
        i: int, delta: dict[str, Any], finish: str | None = None, logprobs: Any = None
    ) -> dict[str, Any]:
        choice = {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return {**head, "choices": [choice]}

    per_choice: list[list[dict[str, Any]]] = []
    completion = 0
    for i, content in enumerate(choice_contents(request, b)):
        steps: list[dict[str, Any]] = []
        if b.tools:
            call = tool_call(request, b.tools, f"call_fake_{i}", i if b.varied else 0)
            args = call["function"]["arguments"]
            header = {
                "index": 0,
                "id": call["id"],
                "type": "function",
                "function": {"name": call["function"]["name"], "arguments": ""},
            }
            steps.append(
                chunk(i, {"role": "assistant", "content": None, "refusal": None, "tool_calls": [header]})
            )
            for k in range(0, len(args), 8):
                frag = {"index": 0, "function": {"arguments": args[k : k + 8]}}
                steps.append(chunk(i, {"tool_calls": [frag]}))
            completion += _completion_tokens(None, [call])
        else:
            steps.append(chunk(i, {"role": "assistant", "content": "", "refusal": None}))
            for piece in split_pieces(content or ""):
                steps.append(
                    chunk(i, {"content": piece}, logprobs=_logprobs(request, b, [piece]) if lp else None)
                )
            completion += _completion_tokens(content, None)
        steps.append(chunk(i, {}, "tool_calls" if b.tools else b.finish_reason))
        per_choice.append(steps)
    # OpenAI interleaves the choices of an n > 1 stream.
    for group in itertools.zip_longest(*per_choice):
        yield from (c for c in group if c is not None)
    if usage:
        yield {**head, "choices": [], "usage": _usage(request, completion, b)}


def error_body(status: int, message: str, code: str | None = None) -> dict[str, Any]:
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def sse_event(obj: Any) -> bytes:
    return b"data: " + (obj if isinstance(obj, bytes) else orjson.dumps(obj)) + b"\n\n"


# --- the ASGI app --------------------------------------------------------------------------------


class _ClientWatch:
    """Learns that the client went away (http.disconnect), started only when a request waits/streams."""

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self.gone = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        self.gone.set()

    async def pause(self, seconds: float) -> bool:
        """Sleep up to `seconds`; True when the client went away meanwhile."""
        if seconds > 0:
            self.start()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.gone.wait(), seconds)
        return self.gone.is_set()

    async def wait_for(self, gate: asyncio.Event) -> bool:
        """Wait until ``gate`` is set; True when the client went away first."""
        self.start()
        waits = [asyncio.ensure_future(gate.wait()), asyncio.ensure_future(self.gone.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        return not gate.is_set()

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()


def prompt_draw(seed: int, request: Any) -> float:
    """A number in [0, 1) fixed by the seed and the request's messages (the `tail-` draw)."""
    messages = request.get("messages") if isinstance(request, dict) else None
    raw = json.dumps([seed, messages], sort_keys=True, default=str).encode()
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "big") / 2**64


class FakeUpstream:
    def __init__(self, seed: int = 0) -> None:
        self._seed = seed
        self._rng = random.Random(seed)
        self.chaos_faults: dict[str, int] = {}  # fault -> how many `chaos-` requests got it
        self.tailed: list[Any] = []  # the messages of the requests a `tail-` directive slowed down
        self.requests: list[dict[str, Any]] = []  # {"path", "headers", "body"}, the last 1000
        self.counts: dict[str, int] = {}
        self.active_streams = self.finished_streams = self.cancelled_streams = 0
        self.cancelled_waits = 0  # non-stream requests whose client left while the fake was waiting
        self.gate = asyncio.Event()  # `gated` requests wait for it (in-process fakes only)
        self._ids = itertools.count(1)

    def reset(self) -> None:
        self.requests.clear()
        self.counts.clear()
        self.active_streams = self.finished_streams = self.cancelled_streams = 0
        self.cancelled_waits = 0
        self.tailed.clear()

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                kind = (await receive())["type"]
                if kind == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif kind == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path, method = scope["path"].rstrip("/"), scope["method"]
        if path == "/v1/chat/completions" and method == "POST":
            await self._chat(scope, receive, send)
        elif path == "/v1/models" and method == "GET":
            data = [_model_object(m) for m in MODELS]
            await _send(send, 200, orjson.dumps({"object": "list", "data": data}))
        elif path.startswith("/v1/models/") and method == "GET":
            await _send(send, 200, orjson.dumps(_model_object(path[len("/v1/models/") :])))
        else:
            body = error_body(404, f"Unknown request URL: {method} {scope['path']}", "unknown_url")
            await _send(send, 404, orjson.dumps(body))

    async def _chat(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        raw = bytearray()
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            raw += msg.get("body", b"")
            if not msg.get("more_body", False):
                break
        try:
            request = orjson.loads(raw)
        except orjson.JSONDecodeError:
            request = None
        if not isinstance(request, dict):
            await _send(send, 400, orjson.dumps(error_body(400, "We could not parse the JSON body.")))
            return
        model = str(request.get("model", "ok"))
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        self.requests.append({"path": scope["path"], "headers": headers, "body": request})
        if len(self.requests) > MAX_RECORDED:
            del self.requests[0]
        count = self.counts[model] = self.counts.get(model, 0) + 1
        b = parse_directives(model)
        if b.leak is not None:
            b = dataclasses.replace(b, leak=headers.get("authorization", ""))
        if b.quote is not None:
            messages = request.get("messages")
            last = messages[-1] if isinstance(messages, list) and messages else {}
            b = dataclasses.replace(b, quote=repr(last.get("content") if isinstance(last, dict) else last))
        if b.chaos and self._rng.random() * 100 < b.chaos:
            fault = self._rng.choice(list(CHAOS_FAULTS))
            self.chaos_faults[fault] = self.chaos_faults.get(fault, 0) + 1
            b = dataclasses.replace(b, **CHAOS_FAULTS[fault])
        if b.tail_ms and prompt_draw(self._seed, request) * 100 < b.tail_pct:
            # A latency tail (a busy provider): this request is slow_ms + tail_ms. Drawn per prompt (seeded),
            # not in arrival order: two runs of one request sequence put the same prompts in the tail.
            b = dataclasses.replace(b, slow_ms=b.slow_ms + b.tail_ms)
            self.tailed.append(request.get("messages"))
        stream = request.get("stream") is True
        # Streams wait after their headers (time to first token); everything else before its reply.
        delay = 0.0 if stream and _is_normal(b, count) else b.slow_ms / 1000
        if b.stall and not stream:
            delay = max(delay, STALL_S)
        watch = _ClientWatch(receive)
        try:
            if await watch.pause(delay) or (b.gated and await watch.wait_for(self.gate)):
                self.cancelled_waits += 1
                return
            await self._reply(send, request, b, count, stream, watch)
        finally:
            watch.close()

    async def _reply(
        self, send: Send, request: dict[str, Any], b: Behaviour, count: int, stream: bool, watch: _ClientWatch
    ) -> None:
        if b.no_stream_tools and stream and request.get("tools"):
            # llama-cpp-python's server with a function-calling chat format, streamed with tool_choice auto
            message = "Automatic streaming tool choice is not supported"
            await _send(send, 500, orjson.dumps(error_body(500, message)))
        elif b.error_status is not None or count <= b.flaky:
            status = b.error_status if b.error_status is not None else 500
            extra = [(b"retry-after", b"0")] if status == 429 else []
            code = "rate_limit_exceeded" if status == 429 else None
            message = f"fake upstream error {status}" + (f" (you sent '{b.leak}')" if b.leak else "")
            if b.quote:
                message += (
                    f"; 1 validation error: {{'type': 'value_error', 'loc': ('body', 'messages', 0), "
                    f"'msg': 'Value error, not accepted', 'input': {b.quote}}}"
                )
            body = orjson.dumps(error_body(status, message, code))
            await _send(send, status, body, extra)
        elif b.html:
            await _send(send, 200, b"<html>oops</html>", content_type=b"text/html")
        elif b.error_in_200:
            body = orjson.dumps(error_body(503, "overloaded"))
            await (_send_sse(send, [sse_event(body)]) if stream else _send(send, 200, body))
        elif b.badjson_body:
            await (
                _send_sse(send, [b"data: {broken\n\n"])
                if stream
                else _send(send, 200, b'{"id": "x", "choices": [')
            )
        elif stream:
            await self._stream(send, request, b, watch)
        else:
            body = orjson.dumps(
                build_completion(request, b, completion_id=f"chatcmpl-fake-{next(self._ids)}")
            )
            if b.drop:
                headers = [*_JSON, (b"content-length", str(len(body)).encode())]
                await send({"type": "http.response.start", "status": 200, "headers": headers})
                await send({"type": "http.response.body", "body": body[: len(body) // 2], "more_body": True})
                raise DroppedConnection("fake upstream dropped the connection mid-body")
            await _send(send, 200, body)

    async def _stream(self, send: Send, request: dict[str, Any], b: Behaviour, watch: _ClientWatch) -> None:
        watch.start()
        self.active_streams += 1
        finished = False
        try:
            await send({"type": "http.response.start", "status": 200, "headers": _SSE})
            if await watch.pause(b.slow_ms / 1000):
                return
            chunks = iter_chunks(request, b, completion_id=f"chatcmpl-fake-{next(self._ids)}")
            if b.hollow:
                chunks = iter(())
            cut = b.drop or b.stall
            for i, chunk in enumerate(chunks):
                if b.badchunk is not None and i == CUT_AFTER:
                    chunk = {**chunk, "choices": [BAD_CHUNKS[b.badchunk]]}
                if cut and (i >= CUT_AFTER or _is_final(chunk)):
                    cut = False
                    if b.drop:
                        break  # truncated SSE: no finish chunk, no [DONE]
                    if await watch.pause(STALL_S):
                        return
                elif i and await watch.pause(b.chunk_delay_ms / 1000):
                    return
                await send({"type": "http.response.body", "body": sse_event(chunk), "more_body": True})
                if watch.gone.is_set():
                    return
            else:
                await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            finished = True
        except OSError:
            return
        finally:
            self.active_streams -= 1
            if finished:
                self.finished_streams += 1
            else:
                self.cancelled_streams += 1


def _model_object(model: str) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": 1700000000, "owned_by": "fake"}


def _is_final(chunk: dict[str, Any]) -> bool:
    choices = chunk["choices"]
    return not choices or choices[0]["finish_reason"] is not None


def _is_normal(b: Behaviour, count: int) -> bool:
    """A real stream (its `slow` waits after the headers, before the first chunk)."""
    return b.error_status is None and count > b.flaky and not (b.html or b.error_in_200 or b.badjson_body)


async def _send(
    send: Send,
    status: int,
    body: bytes,
    extra: list[tuple[bytes, bytes]] | None = None,
    content_type: bytes = b"application/json",
) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _send_sse(send: Send, events: list[bytes]) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": _SSE})
    await send(
        {"type": "http.response.body", "body": b"".join(events) + b"data: [DONE]\n\n", "more_body": False}
    )


def create_fake_upstream(seed: int = 0) -> FakeUpstream:
    return FakeUpstream(seed)


# --- running it ----------------------------------------------------------------------------------


class _QuietDrops(logging.Filter):
    """Keeps uvicorn from logging a traceback for every deliberate `drop`."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], DroppedConnection))


_QUIET_DROPS = _QuietDrops()


@contextlib.asynccontextmanager
async def serve_in_background(app: Any, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
    """Run any ASGI `app` (this fake, or the proxy) under uvicorn on the current event loop, with its
    lifespan; yields its base URL (`http://127.0.0.1:PORT`, a free port unless `port` is given)."""
    logging.getLogger("uvicorn.error").addFilter(_QUIET_DROPS)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)
    task = asyncio.get_running_loop().create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()  # surfaces a bind error
                raise RuntimeError("uvicorn exited before it started")
            await asyncio.sleep(0.005)
        bound = server.servers[0].sockets[0].getsockname()
        yield f"http://{bound[0]}:{bound[1]}"
    finally:
        server.should_exit = True
        await task


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fake OpenAI-compatible upstream for tests and benchmarks.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--seed", type=int, default=0, help="seed of the `chaos-<pct>` fault picker")
    args = parser.parse_args(argv)
    try:
        import uvloop  # noqa: F401

        loop = "uvloop"
    except ImportError:
        loop = "asyncio"
    logging.getLogger("uvicorn.error").addFilter(_QUIET_DROPS)
    uvicorn.run(
        create_fake_upstream(args.seed),
        host=args.host,
        port=args.port,
        loop=loop,
        http="httptools",
        log_level="warning",
        access_log=False,
        lifespan="on",
    )


if __name__ == "__main__":
    main()
