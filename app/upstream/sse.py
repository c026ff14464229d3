"""Server-sent events: an incremental decoder that survives lines split across reads, and the encoder.

Only ``data:`` fields matter for OpenAI streams; ``event:`` names are kept so an ``event: error`` can be
told apart. Comments (``: keep-alive``) and ``id:``/``retry:`` fields are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Event:
    data: str
    event: str = "message"


class SSEDecoder:
    __slots__ = ("_buf", "_data", "_event")

    def __init__(self) -> None:
        self._buf = b""
        self._data: list[str] = []
        self._event = "message"

    def feed(self, chunk: bytes) -> list[Event]:
        """Feed raw bytes; return the events completed by them (possibly none)."""
        buf = self._buf + chunk if self._buf else chunk
        out: list[Event] = []
        start = 0
        n = len(buf)
        while start < n:
            nl = buf.find(b"\n", start)
            cr = buf.find(b"\r", start, nl if nl >= 0 else n)
            if cr >= 0:
                # A lone "\r" ends a line too; "\r\n" is one line ending. A "\r" as the very last byte may
                # be the first half of "\r\n": wait for more input.
                if cr == n - 1:
                    break
                end, nxt = cr, cr + 2 if buf[cr + 1 : cr + 2] == b"\n" else cr + 1
            elif nl >= 0:
                end, nxt = nl, nl + 1
            else:
                break
            self._line(buf[start:end], out)
            start = nxt
        self._buf = buf[start:]
        return out

    def flush(self) -> list[Event]:
        """End of stream: a final event without its blank line still counts (lenient, like browsers do
        not, but like most SDKs do)."""
        out: list[Event] = []
        if self._buf:
            self._line(self._buf, out)
            self._buf = b""
        self._line(b"", out)
        return out

    def _line(self, line: bytes, out: list[Event]) -> None:
        if not line:
            if self._data:
                out.append(Event("\n".join(self._data), self._event))
            self._data = []
            self._event = "message"
            return
        if line[0] == 58:  # ":" comment
            return
        field, sep, value = line.partition(b":")
        if sep and value[:1] == b" ":
            value = value[1:]
        if field == b"data":
            self._data.append(value.decode("utf-8", "replace"))
        elif field == b"event":
            self._event = value.decode("utf-8", "replace")


DONE = b"data: [DONE]\n\n"


def encode(data: bytes) -> bytes:
    return b"data: " + data + b"\n\n"
