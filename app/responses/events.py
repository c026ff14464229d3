"""The chat chunk stream -> the Responses API stream events, in OpenAI's order.

``response.created``, ``response.in_progress``; per output item ``response.output_item.added``, then for
a message ``response.content_part.added``, ``response.output_text.delta``... ``response.output_text.done``,
``response.content_part.done`` (a refusal: ``response.refusal.delta``/``.done``), for a function call
``response.function_call_arguments.delta``... ``.done``; ``response.output_item.done``; and last
``response.completed`` (``response.incomplete`` when the answer was cut at ``max_output_tokens``), whose
``response`` carries the ``cascade`` extension and the usage. After a failure mid-stream: an ``error``
event, then ``response.failed``. Every event has a ``sequence_number`` from 0. Frames are
``event: <type>`` + ``data: <json>``, with no ``[DONE]`` (the Responses API sends none).

Only choice 0 is read (a Responses request never asks for ``n``). Items are opened as their first delta
arrives and closed when the next item starts or the stream ends, so text streams as it comes.
"""

from __future__ import annotations

from typing import Any

import orjson

from app.responses.reply import call_item, finish, item_id, message_item, obj, skeleton, text_part

Json = dict[str, Any]


def frame(event: Json) -> bytes:
    kind: str = event["type"]
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"


def chat_payloads(data: bytes) -> list[Json | str]:
    """The ``data:`` payloads of chat SSE bytes (one or more whole events): dicts, and "[DONE]"."""
    out: list[Json | str] = []
    for line in data.split(b"\n"):
        if line.startswith(b"data: "):
            payload = line[6:].strip()
            out.append("[DONE]" if payload == b"[DONE]" else orjson.loads(payload))
    return out


class _Item:
    __slots__ = ("call_id", "id", "index", "kind", "name", "parts")

    def __init__(self, kind: str, index: int, iid: str) -> None:
        self.kind = kind  # "message" | "function_call"
        self.index = index
        self.id = iid
        self.parts: list[list[Any]] = []  # message: [part type, [text pieces]]; call: one [_, [args]]
        self.call_id = ""
        self.name = ""


class ResponseEvents:
    """Turns chat chunks into Responses events. ``start``, then ``chunk`` per chat chunk, then ``end``
    (or ``fail``); each returns the encoded frames to send."""

    def __init__(self, request: Json, rid: str, model: str, created_at: int) -> None:
        self._resp = skeleton(request, rid, model, created_at, "in_progress")
        self._seq = 0
        self._items: list[_Item] = []
        self._open: _Item | None = None
        self._calls: dict[int, _Item] = {}  # chat tool-call index -> its item
        self._finish: str | None = None
        self._usage: object = None
        self._cascade: object = None
        self.done = False

    def _ev(self, out: list[bytes], type_: str, **fields: Any) -> None:
        out.append(frame({"type": type_, "sequence_number": self._seq, **fields}))
        self._seq += 1

    def start(self) -> list[bytes]:
        out: list[bytes] = []
        snapshot = {k: v for k, v in self._resp.items()}
        self._ev(out, "response.created", response=snapshot)
        self._ev(out, "response.in_progress", response=snapshot)
        return out

    def chunk(self, chunk: Json) -> list[bytes]:
        out: list[bytes] = []
        if isinstance(chunk.get("model"), str) and chunk["model"]:
            self._resp["model"] = chunk["model"]
        if chunk.get("usage") is not None:
            self._usage = chunk["usage"]
        if chunk.get("cascade") is not None:
            self._cascade = chunk["cascade"]
        for ch in chunk.get("choices") or ():
            if not isinstance(ch, dict) or ch.get("index", 0) != 0:
                continue
            delta = obj(ch.get("delta"))
            for key, kind in (("content", "output_text"), ("refusal", "refusal")):
                piece = delta.get(key)
                if isinstance(piece, str) and piece:
                    self._text(out, kind, piece)
            for tc in delta.get("tool_calls") or ():
                if isinstance(tc, dict):
                    self._call(out, tc)
            if ch.get("finish_reason"):
                self._finish = ch["finish_reason"]
        return out

    def _text(self, out: list[bytes], kind: str, piece: str) -> None:
        item = self._open
        if item is None or item.kind != "message":
            self._close(out)
            item = self._new("message", "msg")
            self._ev(
                out,
                "response.output_item.added",
                output_index=item.index,
                item=message_item(item.id, [], "in_progress"),
            )
        if not item.parts or item.parts[-1][0] != kind:
            if item.parts:
                self._close_part(out, item)
            item.parts.append([kind, []])
            empty = text_part("") if kind == "output_text" else {"type": "refusal", "refusal": ""}
            self._ev(
                out,
                "response.content_part.added",
                item_id=item.id,
                output_index=item.index,
                content_index=len(item.parts) - 1,
                part=empty,
            )
        item.parts[-1][1].append(piece)
        where = {"item_id": item.id, "output_index": item.index, "content_index": len(item.parts) - 1}
        if kind == "output_text":
            self._ev(out, "response.output_text.delta", **where, delta=piece, logprobs=[])
        else:
            self._ev(out, "response.refusal.delta", **where, delta=piece)

    def _call(self, out: list[bytes], tc: Json) -> None:
        idx = tc.get("index", 0)
        fn = obj(tc.get("function"))
        item = self._calls.get(idx)
        if item is None:
            self._close(out)
            item = self._calls[idx] = self._new("function_call", "fc")
            item.call_id = str(tc.get("id") or item_id("call"))
            item.name = str(fn.get("name") or "")
            item.parts.append(["arguments", []])
            self._ev(
                out,
                "response.output_item.added",
                output_index=item.index,
                item=call_item(item.id, item.call_id, item.name, "", "in_progress"),
            )
        elif isinstance(fn.get("name"), str) and fn["name"] and not item.name:
            item.name = fn["name"]
        args = fn.get("arguments")
        if isinstance(args, str) and args:
            item.parts[0][1].append(args)
            self._ev(
                out,
                "response.function_call_arguments.delta",
                item_id=item.id,
                output_index=item.index,
                delta=args,
            )

    def _new(self, kind: str, prefix: str) -> _Item:
        item = _Item(kind, len(self._items), item_id(prefix))
        self._items.append(item)
        self._open = item
        return item

    def _close_part(self, out: list[bytes], item: _Item) -> Json:
        kind, pieces = item.parts[-1]
        text = "".join(pieces)
        where = {"item_id": item.id, "output_index": item.index, "content_index": len(item.parts) - 1}
        if kind == "output_text":
            part = text_part(text)
            self._ev(out, "response.output_text.done", **where, text=text, logprobs=[])
        else:
            part = {"type": "refusal", "refusal": text}
            self._ev(out, "response.refusal.done", **where, refusal=text)
        self._ev(out, "response.content_part.done", **where, part=part)
        return part

    def _close(self, out: list[bytes], status: str = "completed") -> None:
        item = self._open
        if item is None:
            return
        self._open = None
        if item.kind == "message":
            parts = [
                self._close_part(out, item) if k == len(item.parts) - 1 else self._part(p)
                for k, p in enumerate(item.parts)
            ]
            done = message_item(item.id, parts, status)
        else:
            args = "".join(item.parts[0][1])
            self._ev(
                out,
                "response.function_call_arguments.done",
                item_id=item.id,
                output_index=item.index,
                name=item.name,
                arguments=args,
            )
            done = call_item(item.id, item.call_id, item.name, args, "completed")
        self._resp["output"].append(done)
        self._ev(out, "response.output_item.done", output_index=item.index, item=done)

    @staticmethod
    def _part(p: list[Any]) -> Json:
        text = "".join(p[1])
        return text_part(text) if p[0] == "output_text" else {"type": "refusal", "refusal": text}

    def end(self) -> list[bytes]:
        """The stream ended well: close the open item, then ``response.completed`` (or ``.incomplete``)."""
        out: list[bytes] = []
        incomplete = self._finish in ("length", "content_filter")
        if not self._items:  # an empty answer is still one (empty) message, as OpenAI sends it
            self._text_empty(out)
        self._close(out, "incomplete" if incomplete else "completed")
        resp = finish(self._resp, self._finish, self._usage, self._cascade)
        self._ev(out, "response.incomplete" if incomplete else "response.completed", response=resp)
        self.done = True
        return out

    def _text_empty(self, out: list[bytes]) -> None:
        item = self._new("message", "msg")
        self._ev(
            out,
            "response.output_item.added",
            output_index=item.index,
            item=message_item(item.id, [], "in_progress"),
        )
        item.parts.append(["output_text", []])
        self._ev(
            out,
            "response.content_part.added",
            item_id=item.id,
            output_index=item.index,
            content_index=0,
            part=text_part(""),
        )

    def fail(self, message: str, code: str | None) -> list[bytes]:
        """A failure after the first byte: an ``error`` event, then ``response.failed``."""
        out: list[bytes] = []
        self._ev(out, "error", code=code, message=message, param=None)
        self._resp["status"] = "failed"
        self._resp["error"] = {"code": "server_error", "message": message}
        if self._cascade is not None:
            self._resp["cascade"] = self._cascade
        self._ev(out, "response.failed", response=self._resp)
        self.done = True
        return out
