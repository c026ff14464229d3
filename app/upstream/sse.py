"""Server-sent events: an incremental decoder that survives lines split across reads, and the encoder.

Only ``data:`` fields matter for OpenAI streams; ``event:`` names are kept so an ``event: error`` can be
told apart. Comments (``: keep-alive``) and ``id:``/``retry:`` fields are ignored. Event data stays bytes
(orjson parses bytes, and a relay forwards them).

Every upstream the proxy knows sends ``data: {...}\\n\\n`` with bare ``\\n`` line endings, so ``feed``
cuts such input at blank lines and takes a one-line ``data:`` event whole; anything else (``\\r``, a
multi-line or named event, a comment) goes through the line-by-line parser, with the same result.
"""

from __future__ import annotations

# One event: its data, and its ``event:`` name ("message" when it has none). A plain tuple: the
# decoder makes one per chunk.
Event = tuple[bytes, str]


class SSEDecoder:
    __slots__ = ("_buf", "_data", "_event")

    def __init__(self) -> None:
        self._buf = b""
        self._data: list[bytes] = []
        self._event = "message"

    def feed(self, chunk: bytes) -> list[Event]:
        """Feed raw bytes; return the events completed by them (possibly none)."""
        buf = self._buf + chunk if self._buf else chunk
        if self._data or self._event != "message" or b"\r" in buf:
            return self._lines(buf)
        # Between events, "\n" line endings only: an event ends at the next blank line ("\n\n").
        out: list[Event] = []
        start = 0
        while True:
            end = buf.find(b"\n\n", start)
            if end < 0:
                break
            if buf.startswith(b"data: ", start) and buf.find(b"\n", start, end) < 0:
                out.append((buf[start + 6 : end], "message"))
            else:
                for line in buf[start:end].split(b"\n"):
                    self._line(line, out)
                self._line(b"", out)
            start = end + 2
        self._buf = buf[start:]
        return out

    def _lines(self, buf: bytes) -> list[Event]:
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
        out = self._lines(self._buf) if self._buf else []
        if self._buf:
            self._line(self._buf, out)
            self._buf = b""
        self._line(b"", out)
        return out

    def _line(self, line: bytes, out: list[Event]) -> None:
        if not line:
            if self._data:
                out.append((b"\n".join(self._data), self._event))
            self._data = []
            self._event = "message"
            return
        if line[0] == 58:  # ":" comment
            return
        field, sep, value = line.partition(b":")
        if sep and value[:1] == b" ":
            value = value[1:]
        if field == b"data":
            self._data.append(value)
        elif field == b"event":
            self._event = value.decode("utf-8", "replace")


DONE = b"data: [DONE]\n\n"


def encode(data: bytes) -> bytes:
    return b"data: " + data + b"\n\n"
