"""Server-sent events: an incremental decoder that survives lines split across reads, and the encoder.

Only ``data:`` fields matter for OpenAI streams; ``event:`` names are kept so an ``event: error`` can be
told apart. Comments (``: keep-alive``) and ``id:``/``retry:`` fields are ignored. Event data stays bytes
(orjson parses bytes, and a relay forwards them).

Every upstream the proxy knows sends ``data: {...}\\n\\n`` with bare ``\\n`` line endings, so ``feed``
cuts such input at blank lines and takes a one-line ``data:`` event whole; anything else (``\\r``, a
multi-line or named event, a comment) goes through the line-by-line parser, with the same result.
"""

from __future__ import annotations

from app.errors import CascadeBaseError

# One event: its data, and its ``event:`` name ("message" when it has none). A plain tuple: the
# decoder makes one per chunk.
Event = tuple[bytes, str]

# What one event may hold, its lines and the bytes of a line not yet ended included. OpenAI sends
# deltas of a few hundred bytes; a stream that never ends a line would otherwise grow without bound.
MAX_EVENT_BYTES = 64 * 2**20


class SSEEventTooLarge(CascadeBaseError, ValueError):
    """An event (or a line still without its end) over ``MAX_EVENT_BYTES``."""


class SSEDecoder:
    __slots__ = ("_buf", "_data", "_dsize", "_event", "_more", "_size")

    def __init__(self) -> None:
        self._buf = b""  # the input not parsed yet: an incomplete line or event
        self._more: list[bytes] = []  # ... and reads after it that could not complete it, not joined yet
        self._size = 0  # bytes in _more
        self._data: list[bytes] = []
        self._dsize = 0  # bytes in _data
        self._event = "message"

    def feed(self, chunk: bytes) -> list[Event]:
        """Feed raw bytes; return the events completed by them (possibly none).

        Raises ``SSEEventTooLarge`` when one event outgrows ``MAX_EVENT_BYTES``. A read that cannot
        complete the line or event held is kept aside, not joined to it: joining every read to a
        growing line re-copied and re-scanned it each time (quadratic in the line's length)."""
        if self._buf:
            if b"\n\n" not in chunk and self._waits(chunk):
                if chunk:
                    self._more.append(chunk)
                    self._size += len(chunk)
                    self._check(len(self._buf) + self._size)
                return []
            if self._more:
                buf = b"".join((self._buf, *self._more, chunk))
                self._more, self._size = [], 0
            else:
                buf = self._buf + chunk
        else:
            buf = chunk
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
        self._buf = rest = buf[start:]
        if len(rest) > MAX_EVENT_BYTES:  # (no data lines are held between events)
            self._check(len(rest))
        return out

    def _waits(self, chunk: bytes) -> bool:
        """Whether ``chunk`` (after the input held) cannot end a line (while an event is in progress:
        its data lines are parsed, the line held is incomplete) or an event (between events)."""
        if not chunk:
            return True
        last = (self._more[-1] if self._more else self._buf)[-1:]
        if last == b"\r" or b"\r" in chunk:
            return False
        if self._data or self._event != "message":
            return b"\n" not in chunk
        return b"\n\n" not in chunk and not (last == b"\n" and chunk[:1] == b"\n")

    def _check(self, held: int) -> None:
        """Refuse (and forget) an event holding more than ``MAX_EVENT_BYTES``, its data lines included."""
        if held + self._dsize > MAX_EVENT_BYTES:
            self._buf, self._more, self._data, self._size, self._dsize = b"", [], [], 0, 0
            raise SSEEventTooLarge(f"stream event over the {MAX_EVENT_BYTES}-byte limit")

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
        self._check(len(self._buf))
        return out

    def flush(self) -> list[Event]:
        """End of stream: a final event without its blank line still counts (lenient, like browsers do
        not, but like most SDKs do)."""
        if self._more:
            self._buf, self._more, self._size = b"".join((self._buf, *self._more)), [], 0
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
            self._dsize = 0
            self._event = "message"
            return
        if line[0] == 58:  # ":" comment
            return
        field, sep, value = line.partition(b":")
        if sep and value[:1] == b" ":
            value = value[1:]
        if field == b"data":
            self._data.append(value)
            self._dsize += len(value)
        elif field == b"event":
            self._event = value.decode("utf-8", "replace")


DONE = b"data: [DONE]\n\n"


def encode(data: bytes) -> bytes:
    return b"data: " + data + b"\n\n"
