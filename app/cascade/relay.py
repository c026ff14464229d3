"""Pure helpers that rewrite an upstream chunk stream for the client.

Chunks arrive with their shape checked (``app.upstream.shapes``), each with the bytes it came in. Content
chunks are forwarded the moment they arrive, as the upstream sent them: only the ``id`` becomes the
proxy's own (a byte-level replace of the one ``"id":"..."`` pair; a bare ``"`` only occurs in JSON's
structure, never inside a string), and a ``"usage":null`` the client did not ask for is cut. A chunk
that needs more (a missing ``model`` or ``object``, a ``created`` that differs from the first chunk's,
logprobs the client did not ask for, a usage object on a content chunk, an id spelled with spaces or
escapes) is rewritten from its parsed form instead, with the same result. Every event one read from
the upstream completed goes out in one write (``process_batch``), so a client slower than the
upstream gets what is waiting at once, and nothing waits for anything that has not come yet.

From the first chunk carrying a ``finish_reason`` on, chunks are held until the upstream ends, so the
``cascade`` extension (which needs the final usage and cost) can ride on the last chunk: the usage
chunk when the client asked for usage, else the last finish chunk. With one choice (``n`` = 1) holding
costs nothing visible: after a finish_reason only the usage chunk and ``[DONE]`` follow. With ``n`` > 1
the choices interleave and finish one by one, so everything after the first choice to finish (the
other choices' remaining content included) is held and reaches the client in one burst when the
upstream ends.
"""

from __future__ import annotations

from typing import Any

import orjson

from app.protocol import now
from app.upstream.sse import encode

Json = dict[str, Any]


def _cut_null_usage(raw: bytes) -> bytes | None:
    """``raw`` without its one ``"usage":null`` pair, or None when it is not spelled so (or twice)."""
    for pair in (b',"usage":null', b'"usage":null,'):
        i = raw.find(pair)
        if i >= 0:
            return raw[:i] + raw[i + 13 :] if raw.find(pair, i + 13) < 0 else None
    return None


class StreamRelay:
    __slots__ = (
        "_created",
        "_held",
        "_holding",
        "_id",
        "_id_pair",
        "_keep_logprobs",
        "_up_id",
        "_up_id_pair",
        "_with_usage",
        "fingerprint",
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
        self._id_pair = b'"id":' + orjson.dumps(completion_id)
        self._up_id: object = None  # the upstream's id, and its pair as bytes
        self._up_id_pair = b""
        self._keep_logprobs = keep_logprobs
        self._with_usage = with_usage
        self._created: int | None = None
        self._held: list[Json] = []
        self._holding = False
        self.usage: Json | None = None
        self.fingerprint: str | None = None
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

    def process_batch(self, batch: list[tuple[bytes, Json]]) -> bytes:
        """The SSE bytes to send now for the events of one upstream read (possibly none)."""
        if len(batch) == 1:
            return self.process(*batch[0]) or b""
        return b"".join([out for raw, chunk in batch if (out := self.process(raw, chunk)) is not None])

    def process(self, raw: bytes, chunk: Json) -> bytes | None:
        """One upstream chunk (``raw``: its JSON as sent); the SSE bytes to send now, or None if held."""
        get = chunk.get
        created = get("created")
        if self._created is None:
            self._created = created if type(created) is int else now()
        model = get("model")
        if model:
            self.model = model
        if "system_fingerprint" in chunk:
            fp = chunk["system_fingerprint"]
            if fp and type(fp) is str:
                self.fingerprint = fp
        usage = get("usage")
        if usage is not None and type(usage) is dict:
            self.usage = usage
        choices = get("choices")
        if not choices:
            # Usage-only chunk (or an empty keep-alive): belongs at the very end.
            if usage is not None:
                self._held.append(self._shape(chunk))
            return None
        up_id = get("id")
        # As sent, save the id: nothing else the proxy rewrites needs rewriting here.
        as_sent = (
            created == self._created
            and type(model) is str
            and get("object") == "chat.completion.chunk"
            and (usage is None or self._with_usage)
        )
        for ch in choices:
            if ch.get("logprobs") is not None and not self._keep_logprobs:
                as_sent = False
            delta = ch.get("delta")
            if delta:
                content = delta.get("content")
                if content and type(content) is str:
                    self.text_chars += len(content)
                    if self.texts is not None:
                        self.texts.setdefault(ch.get("index", 0), []).append(content)
                calls = delta.get("tool_calls")
                if calls:
                    as_sent = self._tool_calls(ch.get("index", 0), calls, up_id) and as_sent
            fr = ch.get("finish_reason")
            if fr is not None:
                self.finish_reasons[ch.get("index", 0)] = fr
                self._holding = True
        if self._holding:
            self._held.append(self._shape(chunk))
            return None
        if as_sent and type(up_id) is str:
            if up_id != self._up_id:
                self._up_id = up_id
                self._up_id_pair = b'"id":' + orjson.dumps(up_id)
            pair = self._up_id_pair
            # (A multi-line data field arrives joined with "\n": not one SSE data line as it is.)
            if raw.count(pair) == 1 and b"\n" not in raw:
                out = raw.replace(pair, self._id_pair)
                if usage is None and not self._with_usage and "usage" in chunk:
                    cut = _cut_null_usage(out)
                    if cut is not None:
                        return b"data: " + cut + b"\n\n"
                else:
                    return b"data: " + out + b"\n\n"
        return encode(orjson.dumps(self._shape(chunk)))

    def _tool_calls(self, choice: int, calls: list[Json], up_id: object) -> bool:
        """Count (and keep, when kept) streamed tool calls; False when one's id is the chunk's own."""
        unique = True
        for tc in calls:
            if tc.get("id") == up_id:
                unique = False  # the id pair would not be unique in the bytes
            fn = tc.get("function")
            if fn is None:
                continue
            if isinstance(fn.get("arguments"), str):
                self.text_chars += len(fn["arguments"])
            if self.tools is not None:
                self._add_tool(choice, tc, fn)
        return unique

    def _shape(self, chunk: Json) -> Json:
        """The chunk as the client gets it, rewritten in place."""
        chunk["id"] = self._id
        chunk["object"] = "chat.completion.chunk"
        chunk["created"] = self._created
        if not chunk.get("model"):
            chunk["model"] = self.model
        if not self._with_usage:
            chunk.pop("usage", None)
        if not self._keep_logprobs:
            for ch in chunk.get("choices") or ():
                if ch.get("logprobs") is not None:
                    ch["logprobs"] = None
        return chunk

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
        base: Json = {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created or now(),
            "model": self.model,
        }
        if self.fingerprint is not None:
            base["system_fingerprint"] = self.fingerprint
        if self._with_usage:
            held.append({**base, "choices": [], "usage": usage})
        if not held:
            held.append({**base, "choices": []})
        held[-1]["cascade"] = extension
        return [encode(orjson.dumps(c)) for c in held]
