"""Logging setup: one JSON object per line (or plain text), never a prompt, an answer, a key or a stack
trace. Exceptions are reduced to their type and the place they were raised."""

from __future__ import annotations

import atexit
import logging
import queue
import sys
import threading
import time
import traceback
from typing import Any

import orjson

_STD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "color_message",
}


def _where(exc: BaseException) -> str:
    tb = traceback.extract_tb(exc.__traceback__)
    if not tb:
        return ""
    f = tb[-1]
    return f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} in {f.name}"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in record.__dict__.items():
            if k not in _STD and not k.startswith("_"):
                out[k] = v
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            out["error"] = type(exc).__name__
            out["where"] = _where(exc)
        return orjson.dumps(out, default=str).decode()


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extra = " ".join(
            f"{k}={v}" for k, v in record.__dict__.items() if k not in _STD and not k.startswith("_")
        )
        line = f"{self.formatTime(record)} {record.levelname.lower()} {record.name}: {record.getMessage()}"
        if extra:
            line += " " + extra
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            line += f" error={type(exc).__name__} where={_where(exc)}"
        return line


# Records waiting for the writer thread. A stderr that stops draining must not grow memory without bound:
# beyond this many, records are dropped (and counted in ``dropped``).
QUEUE_SIZE = 10_000
# How often the writer thread writes what has queued. Waking it for every record would cost each
# request a thread switch (measured: more than formatting and writing the line itself).
WRITE_EVERY_S = 0.05


class _Enqueue(logging.Handler):
    """Hands a record to the writer thread: the caller (the event loop, on every request) never waits on
    stderr. The message is merged now (its arguments may change later); formatting, the exception
    reduced to type and place included, happens in the writer thread."""

    dropped = 0

    def __init__(self, q: queue.SimpleQueue[logging.LogRecord]) -> None:
        super().__init__()
        self._q = q

    def emit(self, record: logging.LogRecord) -> None:
        record.msg = record.getMessage()
        record.args = None
        # A SimpleQueue: C, no Python-level locking, and nobody waits on it (the writer polls).
        if self._q.qsize() < QUEUE_SIZE:
            self._q.put(record)
        else:
            _Enqueue.dropped += 1


class _Writer(threading.Thread):
    """Writes the queued records every ``WRITE_EVERY_S``, and what is left when stopped."""

    def __init__(self, q: queue.SimpleQueue[logging.LogRecord], handler: logging.Handler) -> None:
        super().__init__(name="cascade-log-writer", daemon=True)
        self._q = q
        self.handler = handler
        self._stopping = threading.Event()

    def run(self) -> None:
        while not self._stopping.wait(WRITE_EVERY_S):
            self._drain()
        self._drain()

    def _drain(self) -> None:
        while True:
            try:
                record = self._q.get_nowait()
            except queue.Empty:
                return
            self.handler.handle(record)

    def stop(self) -> None:
        self._stopping.set()
        self.join()


_listener: _Writer | None = None


def setup_logging(level: str = "info", fmt: str = "json") -> None:
    """Every log record goes through a queue to one writer thread that formats it and writes stderr."""
    global _listener
    stop_logging()
    writer = logging.StreamHandler(sys.stderr)
    writer.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    q: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    _listener = _Writer(q, writer)
    _listener.start()
    atexit.unregister(stop_logging)  # once, however often logging is set up
    atexit.register(stop_logging)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(_Enqueue(q))
    root.setLevel(level.upper())
    # uvicorn's access log would print every request line; our one-line-per-request log replaces it.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers = []
        lg.propagate = True
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)


def stop_logging() -> None:
    """Write what is queued and stop the writer thread (also at exit); later records are written
    directly, by the thread that logs them."""
    global _listener
    if _listener is None:
        return
    listener, _listener = _listener, None
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, _Enqueue):
            root.removeHandler(h)
    root.addHandler(listener.handler)
    listener.stop()
