"""A ``chat.completion`` -> the Responses API ``response`` object (and the pieces the stream reuses).

The shape is the strict form of the official schema (``Response``): every required key present,
``logprobs: []`` on ``output_text`` parts, both ``*_tokens_details`` in ``usage``, optional keys left out
rather than null where the schema does not allow null. Request fields the client set are echoed back
(``instructions``, ``tools``, ``tool_choice``, ``text``, ``temperature``, ``top_p``, ``metadata``,
``max_output_tokens``, ``parallel_tool_calls``), as OpenAI does.
"""

from __future__ import annotations

import os
import time
from typing import Any

Json = dict[str, Any]

# chat finish_reason -> the Responses incomplete reason; any other finish is a completed response.
INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


def item_id(prefix: str) -> str:
    return f"{prefix}_{os.urandom(12).hex()}"


def response_id(completion_id: str) -> str:
    """The response id for a chat completion id: the same random part, so ``/v1/feedback`` (and the
    trace store) find the answer under either."""
    return "resp_" + completion_id.removeprefix("chatcmpl-")


def _tools_echo(tools: object) -> list[Json]:
    out: list[Json] = []
    for t in tools if isinstance(tools, list) else ():
        if isinstance(t, dict):
            out.append(
                {
                    "type": "function",
                    "name": t.get("name"),
                    "description": t.get("description"),
                    "parameters": t.get("parameters"),
                    "strict": t.get("strict") if isinstance(t.get("strict"), bool) else None,
                }
            )
    return out


def _text_echo(text: object, fmt: object) -> Json:
    out: Json = {"format": fmt if isinstance(fmt, dict) else {"type": "text"}}
    if isinstance(text, dict) and isinstance(text.get("verbosity"), str):
        out["verbosity"] = text["verbosity"]
    return out


def skeleton(request: Json, rid: str, model: str, created_at: int, status: str) -> Json:
    """A ``response`` with no output yet: what ``response.created`` carries, and the base of the final one."""
    text = request.get("text")
    fmt = text.get("format") if isinstance(text, dict) else None
    resp: Json = {
        "id": rid,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": request.get("instructions"),
        "max_output_tokens": request.get("max_output_tokens"),
        "model": model,
        "output": [],
        "parallel_tool_calls": request.get("parallel_tool_calls") is not False,
        "previous_response_id": None,
        "store": False,
        "temperature": request.get("temperature"),
        "text": _text_echo(text, fmt),
        "tool_choice": request.get("tool_choice") if request.get("tool_choice") is not None else "auto",
        "tools": _tools_echo(request.get("tools")),
        "top_p": request.get("top_p"),
        "truncation": "disabled",
        "metadata": request.get("metadata") if isinstance(request.get("metadata"), dict) else {},
    }
    for name in ("user", "service_tier", "safety_identifier", "prompt_cache_key"):
        if isinstance(request.get(name), str):
            resp[name] = request[name]
    return resp


def usage(chat_usage: object) -> Json:
    u = obj(chat_usage)
    pd, cd = obj(u.get("prompt_tokens_details")), obj(u.get("completion_tokens_details"))
    inp, out = _int(u.get("prompt_tokens")), _int(u.get("completion_tokens"))
    total = _int(u.get("total_tokens")) or inp + out
    return {
        "input_tokens": inp,
        "input_tokens_details": {
            "cached_tokens": _int(pd.get("cached_tokens")),
            "cache_write_tokens": _int(pd.get("cache_write_tokens")),
        },
        "output_tokens": out,
        "output_tokens_details": {"reasoning_tokens": _int(cd.get("reasoning_tokens"))},
        "total_tokens": total,
    }


def obj(v: object) -> Json:
    """``v`` when it is an object, else an empty one (upstream JSON is read defensively)."""
    return v if isinstance(v, dict) else {}


def _int(v: object) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else 0


def text_part(text: str) -> Json:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def message_item(mid: str, parts: list[Json], status: str) -> Json:
    return {"id": mid, "type": "message", "role": "assistant", "status": status, "content": parts}


def call_item(fid: str, call_id: str, name: str, arguments: str, status: str) -> Json:
    return {
        "id": fid,
        "type": "function_call",
        "status": status,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
    }


def finish(resp: Json, finish_reason: str | None, chat_usage: object, cascade: object) -> Json:
    """Complete a response built on ``skeleton``: status, incomplete details, usage, the extension."""
    reason = INCOMPLETE.get(finish_reason or "")
    resp["status"] = "incomplete" if reason else "completed"
    resp["incomplete_details"] = {"reason": reason} if reason else None
    if not reason:
        resp["completed_at"] = int(time.time())
    resp["usage"] = usage(chat_usage)
    texts = [
        p["text"]
        for item in resp["output"]
        if item.get("type") == "message"
        for p in item["content"]
        if p.get("type") == "output_text"
    ]
    # Not in the wire format (the SDKs compute it from ``output``); raw-HTTP users read it here.
    resp["output_text"] = "".join(texts)
    if cascade is not None:
        resp["cascade"] = cascade
    return resp


def from_completion(request: Json, completion: Json, completion_id: str) -> Json:
    """The ``response`` object for an accepted chat completion (non-stream)."""
    created = completion.get("created")
    resp = skeleton(
        request,
        response_id(completion_id),
        str(completion.get("model") or request.get("model")),
        created if isinstance(created, int) else int(time.time()),
        "completed",
    )
    choices = completion.get("choices") or [{}]
    ch = choices[0] if isinstance(choices[0], dict) else {}
    finish_reason = ch.get("finish_reason")
    status = "incomplete" if finish_reason in INCOMPLETE else "completed"
    msg = obj(ch.get("message"))
    content, refusal, calls = msg.get("content"), msg.get("refusal"), msg.get("tool_calls")
    parts: list[Json] = []
    if isinstance(content, str) and content:
        parts.append(text_part(content))
    if isinstance(refusal, str) and refusal:
        parts.append({"type": "refusal", "refusal": refusal})
    output: list[Json] = resp["output"]
    if parts or not calls:
        output.append(message_item(item_id("msg"), parts or [text_part("")], status))
    for tc in calls if isinstance(calls, list) else ():
        fn = obj(tc.get("function") if isinstance(tc, dict) else None)
        if not fn:
            continue
        output.append(
            call_item(
                item_id("fc"),
                str(tc.get("id") or item_id("call")),
                str(fn.get("name") or ""),
                args if isinstance(args := fn.get("arguments"), str) else "{}",
                "completed",
            )
        )
    return finish(resp, finish_reason, completion.get("usage"), completion.get("cascade"))
