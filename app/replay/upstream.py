"""The replay upstream: an OpenAI-compatible ASGI app that answers with a dataset's recorded answers.

``create_replay_upstream(rows)`` serves ``POST /v1/chat/completions`` (and ``GET /v1/models``):

* the request's ``model`` is a dataset model id (``mistralai/Mixtral-8x7B-Instruct-v0.1`` is fine);
* the prompt selects the row: the text of the last user message, matched exactly against the rows'
  ``prompt`` (falling back to all messages joined as :func:`messages_to_prompt` does). When several rows
  share a prompt and their recorded answers differ, ``metadata.replay_row_id`` picks the row (the replay
  runner always sends it); missing or still ambiguous -> 404 with an OpenAI error body;
* the reply is the recorded answer with ``finish_reason: "stop"``; ``usage`` carries token estimates
  (ceil(chars / 4)) and ``cost`` = the recorded ``cost_usd``, so an upstream configured with
  ``price: {reported: true}`` is charged exactly the recorded cost;
* ``stream: true`` works too (role chunk, content, finish chunk, usage chunk when asked, ``[DONE]``).

Hand-written ASGI + orjson, no framework: it must never be the bottleneck of a benchmark.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from app.answers import messages_to_prompt
from app.errors import CascadeBaseError
from app.learning.rows import ModelAnswer, Row
from app.replay.dataset import estimate_tokens

Json = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

ROW_ID_FIELD = "replay_row_id"  # in the request's `metadata`: disambiguates rows that share a prompt

_JSON = [(b"content-type", b"application/json")]
_SSE = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


class ReplayLookupError(CascadeBaseError):
    def __init__(self, message: str, code: str, param: str | None) -> None:
        super().__init__(message)
        self.code = code
        self.param = param


@dataclass(frozen=True, slots=True)
class Served:
    row: Row
    model: str
    answer: ModelAnswer
    prompt: str


def _text(content: Any) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [
            p["text"]
            for p in content
            if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        ]
        return "".join(parts)
    return None


def request_prompts(messages: Sequence[Any]) -> list[str]:
    """Candidate prompt texts of a request, most specific first: the last user message, all messages."""
    out: list[str] = []
    for m in reversed(messages):
        if isinstance(m, dict) and m.get("role") == "user":
            t = _text(m.get("content"))
            if t is not None:
                out.append(t)
            break
    joined = messages_to_prompt([m for m in messages if isinstance(m, dict)])
    if joined not in out:
        out.append(joined)
    return out


class ReplayIndex:
    """Rows by exact prompt text and by id; the models every row records."""

    def __init__(self, rows: Sequence[Row]) -> None:
        self.rows = list(rows)
        self.by_prompt: dict[str, list[Row]] = {}
        self.by_id: dict[str, Row] = {}
        models: set[str] = set()
        for r in self.rows:
            self.by_prompt.setdefault(r.prompt, []).append(r)
            self.by_id[r.id] = r
            models.update(r.answers)
        self.models = sorted(models)

    def lookup(self, model: str, prompts: Sequence[str], row_id: str | None = None) -> Served:
        if model not in self.models:
            raise ReplayLookupError(
                f"The model '{model[:200]}' is not recorded in this dataset.", "model_not_found", "model"
            )
        for prompt in prompts:
            rows = self.by_prompt.get(prompt)
            if not rows:
                continue
            if row_id is not None:
                rows = [r for r in rows if r.id == row_id] or rows
            with_model = [r for r in rows if model in r.answers]
            if not with_model:
                raise ReplayLookupError(
                    f"The dataset records no answer of '{model[:200]}' for this prompt.",
                    "answer_not_found",
                    "model",
                )
            first = with_model[0].answers[model]
            if any(r.answers[model] != first for r in with_model[1:]):
                raise ReplayLookupError(
                    f"{len(with_model)} rows share this prompt with different answers; "
                    f"send metadata.{ROW_ID_FIELD} to pick one.",
                    "ambiguous_prompt",
                    "messages",
                )
            return Served(with_model[0], model, first, prompt)
        raise ReplayLookupError("No dataset row has this prompt.", "prompt_not_found", "messages")


def _usage(served: Served) -> Json:
    pt = estimate_tokens(served.prompt)
    ct = estimate_tokens(served.answer.answer)
    return {
        "prompt_tokens": pt,
        "completion_tokens": ct,
        "total_tokens": pt + ct,
        "cost": served.answer.cost_usd,
    }


def _n(request: Mapping[str, Any]) -> int:
    n = request.get("n")
    return max(1, min(n, 128)) if isinstance(n, int) and not isinstance(n, bool) else 1


def build_completion(served: Served, request: Mapping[str, Any], completion_id: str) -> Json:
    """The non-stream ``chat.completion`` for a lookup; ``n`` choices all carry the recorded answer."""
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": served.answer.answer, "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
        for i in range(_n(request))
    ]
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": served.model,
        "choices": choices,
        "usage": _usage(served),
    }


def build_chunks(served: Served, request: Mapping[str, Any], completion_id: str) -> list[Json]:
    """The ``chat.completion.chunk`` objects of a streamed reply (without ``[DONE]``)."""
    so = request.get("stream_options")
    want_usage = isinstance(so, dict) and so.get("include_usage") is True
    head: Json = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": served.model,
    }
    if want_usage:
        head["usage"] = None
    out: list[Json] = []
    text = served.answer.answer
    for i in range(_n(request)):
        deltas: list[tuple[Json, str | None]] = [
            ({"role": "assistant", "content": "", "refusal": None}, None)
        ]
        deltas += [({"content": text[k : k + 256]}, None) for k in range(0, len(text), 256)]
        deltas.append(({}, "stop"))
        for delta, finish in deltas:
            choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
            out.append({**head, "choices": [choice]})
    if want_usage:
        out.append({**head, "choices": [], "usage": _usage(served)})
    return out


def _error(status: int, message: str, code: str, param: str | None = None) -> bytes:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return orjson.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}})


async def _read_body(receive: Receive) -> bytes:
    parts: list[bytes] = []
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            break
        parts.append(msg.get("body", b""))
        if not msg.get("more_body"):
            break
    return b"".join(parts)


async def _send(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] = _JSON) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class ReplayUpstream:
    """The ASGI app. ``calls`` counts served answers per model (for checks and reports)."""

    def __init__(self, rows: Sequence[Row]) -> None:
        self.index = ReplayIndex(rows)
        self.calls: dict[str, int] = {}
        self._ids = itertools.count()

    def lookup(self, request: Mapping[str, Any]) -> Served:
        messages = request.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ReplayLookupError("'messages' must be a non-empty array.", "invalid_request", "messages")
        md = request.get("metadata")
        rid = md.get(ROW_ID_FIELD) if isinstance(md, dict) else None
        return self.index.lookup(
            str(request.get("model", "")), request_prompts(messages), rid if isinstance(rid, str) else None
        )

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path: str = scope["path"].rstrip("/")
        method: str = scope["method"]
        if method == "POST" and path.endswith("/chat/completions"):
            await self._chat(receive, send)
        elif method == "GET" and path.endswith("/models"):
            data = [
                {"id": m, "object": "model", "created": 0, "owned_by": "replay"} for m in self.index.models
            ]
            await _send(send, 200, orjson.dumps({"object": "list", "data": data}))
        else:
            await _send(send, 404, _error(404, f"{method} {path}: not found", "not_found"))

    async def _chat(self, receive: Receive, send: Send) -> None:
        try:
            request = orjson.loads(await _read_body(receive))
        except orjson.JSONDecodeError:
            await _send(send, 400, _error(400, "The body is not valid JSON.", "invalid_json"))
            return
        if not isinstance(request, dict):
            await _send(send, 400, _error(400, "The body must be a JSON object.", "invalid_request"))
            return
        try:
            served = self.lookup(request)
        except ReplayLookupError as exc:
            await _send(send, 404, _error(404, str(exc), exc.code, exc.param))
            return
        self.calls[served.model] = self.calls.get(served.model, 0) + 1
        cid = f"chatcmpl-replay-{next(self._ids)}"
        if request.get("stream") is True:
            events = [b"data: " + orjson.dumps(c) + b"\n\n" for c in build_chunks(served, request, cid)]
            await _send(send, 200, b"".join(events) + b"data: [DONE]\n\n", _SSE)
        else:
            await _send(send, 200, orjson.dumps(build_completion(served, request, cid)))


def create_replay_upstream(rows: Sequence[Row]) -> ReplayUpstream:
    return ReplayUpstream(rows)
