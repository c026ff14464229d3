"""Pure helpers that rewrite an upstream chunk stream for the client.

Chunks arrive with their shape checked (``app.upstream.shapes``). Content chunks are forwarded the moment
they arrive (only the id, and logprobs/usage the client did not ask for, are changed). From the first
chunk carrying a ``finish_reason`` on, chunks are held until the upstream ends, so the ``cascade``
extension (which needs the final usage and cost) can ride on the last chunk: the usage chunk when the
client asked for usage, else the last finish chunk. With one choice (``n`` = 1) holding costs nothing
visible: after a finish_reason only the usage chunk and ``[DONE]`` follow. With ``n`` > 1 the choices
interleave and finish one by one, so everything after the first choice to finish (the other choices'
remaining content included) is held and reaches the client in one burst when the upstream ends.
"""

from __future__ import annotations

from typing import Any

import orjson

from app.protocol import now
from app.upstream.sse import encode

Json = dict[str, Any]


class StreamRelay:
    __slots__ = (
        "_created",
        "_held",
        "_holding",
        "_id",
        "_keep_logprobs",
        "_model",
        "_with_usage",
        "finish_reasons",
        "model",
        "text_chars",
        "texts",
        "tools",
        "usage",
    )

    def __init__(
        self, completion_id: str, *, keep_logprobs: bool, with_usage: bool, fallback_model: str
    ) -> None:
        self._id = completion_id
        self._keep_logprobs = keep_logprobs
        self._with_usage = with_usage
        self._model = fallback_model
        self._created: int | None = None
        self._held: list[Json] = []
        self._holding = False
        self.usage: Json | None = None
        self.text_chars = 0
        self.model = fallback_model
        self.finish_reasons: dict[int, str] = {}
        # Content per choice index, kept only when someone needs the text (early-abort checks, the
        # trace store); with it the tool calls streamed per choice: index -> [name, argument parts].
        self.texts: dict[int, list[str]] | None = None
        self.tools: dict[int, dict[int, list[Any]]] | None = None

    def keep_text(self) -> None:
        self.texts = {}
        self.tools = {}

    def text(self, index: int = 0) -> str:
        return "".join(self.texts.get(index, ())) if self.texts is not None else ""

    def message(self, index: int = 0) -> Json:
        """The streamed answer as a chat message: its content and, assembled, its tool calls."""
        calls = [
            {"type": "function", "function": {"name": name, "arguments": "".join(parts)}}
            for _, (name, parts) in sorted((self.tools or {}).get(index, {}).items())
        ]
        msg: Json = {"role": "assistant", "content": self.text(index) or None}
        if calls:
            msg["tool_calls"] = calls
        return msg

    def process(self, chunk: Json) -> bytes | None:
        """Rewrite one upstream chunk; return the SSE bytes to send now, or None if it is held."""
        chunk["id"] = self._id
        chunk["object"] = "chat.completion.chunk"
        if self._created is None:
            created = chunk.get("created")
            self._created = created if isinstance(created, int) else now()
        chunk["created"] = self._created
        model = chunk.get("model")
        if model:
            self.model = model
        else:
            chunk["model"] = self.model
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
        if not self._with_usage:
            chunk.pop("usage", None)
        choices = chunk.get("choices")
        if not choices:
            # Usage-only chunk (or an empty keep-alive): belongs at the very end.
            if usage is not None:
                self._held.append(chunk)
            return None
        for ch in choices:
            if not isinstance(ch, dict):
                continue
            if not self._keep_logprobs and ch.get("logprobs") is not None:
                ch["logprobs"] = None
            delta = ch.get("delta")
            if isinstance(delta, dict):
                content = delta.get("content")
                if isinstance(content, str) and content:
                    self.text_chars += len(content)
                    if self.texts is not None:
                        self.texts.setdefault(ch.get("index", 0), []).append(content)
                for tc in delta.get("tool_calls") or ():
                    fn = tc.get("function") if isinstance(tc, dict) else None
                    if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                        self.text_chars += len(fn["arguments"])
                    if self.tools is not None and isinstance(fn, dict):
                        self._add_tool(ch.get("index", 0), tc, fn)
            fr = ch.get("finish_reason")
            if fr is not None:
                self.finish_reasons[ch.get("index", 0)] = fr
                self._holding = True
        if self._holding:
            self._held.append(chunk)
            return None
        return encode(orjson.dumps(chunk))

    def _add_tool(self, choice: int, tc: Json, fn: Json) -> None:
        assert self.tools is not None
        idx = tc.get("index", 0)
        slot = self.tools.setdefault(choice, {}).setdefault(idx if isinstance(idx, int) else 0, ["", []])
        if isinstance(fn.get("name"), str) and fn["name"]:
            slot[0] = fn["name"]
        if isinstance(fn.get("arguments"), str):
            slot[1].append(fn["arguments"])

    def finish(self, extension: Json, usage: Json) -> list[bytes]:
        """The held chunks, with ``usage`` (exact or estimated) and the ``cascade`` extension attached."""
        held = [c for c in self._held if c.get("choices")]
        base = {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created or now(),
            "model": self.model,
        }
        if self._with_usage:
            held.append({**base, "choices": [], "usage": usage})
        if not held:
            held.append({**base, "choices": []})
        held[-1]["cascade"] = extension
        return [encode(orjson.dumps(c)) for c in held]
