"""SSE decoder: survives any split of the byte stream, CRLF/CR line endings, comments, multi-line data."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.upstream import sse
from app.upstream.sse import SSEDecoder

STREAM = (
    b": keep-alive\n\n"
    b'data: {"a": 1}\n\n'
    b'event: error\r\ndata: {"b": 2}\r\n\r\n'
    b"data: line1\ndata: line2\n\n"
    b"data:nospace\r\rid: 7\nretry: 100\ndata: [DONE]\n\n"
)
EXPECTED = [
    ('{"a": 1}', "message"),
    ('{"b": 2}', "error"),
    ("line1\nline2", "message"),
    ("nospace", "message"),
    ("[DONE]", "message"),
]


def _decode(parts: list[bytes]) -> list[tuple[str, str]]:
    d = SSEDecoder()
    out = []
    for p in parts:
        out += [(data.decode(), name) for data, name in d.feed(p)]
    out += [(data.decode(), name) for data, name in d.flush()]
    return out


def test_whole_stream() -> None:
    assert _decode([STREAM]) == EXPECTED


def test_byte_by_byte() -> None:
    assert _decode([STREAM[i : i + 1] for i in range(len(STREAM))]) == EXPECTED


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=20))
def test_any_split(cuts: list[int]) -> None:
    points = sorted(set(cuts))
    parts = [STREAM[a:b] for a, b in zip([0, *points], [*points, len(STREAM)], strict=True)]
    assert _decode(parts) == EXPECTED


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.text(
            alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)), max_size=30
        ),
        max_size=8,
    ),
    st.integers(1, 7),
)
def test_roundtrip_random_payloads(payloads: list[str], step: int) -> None:
    raw = b"".join(b"data: " + p.encode() + b"\n\n" for p in payloads)
    got = _decode([raw[i : i + step] for i in range(0, len(raw), step)])
    # "data: " + payload: exactly one space is stripped; an empty field still dispatches an event.
    assert [d for d, _ in got] == payloads


def test_last_event_without_blank_line_is_flushed() -> None:
    assert _decode([b"data: tail"]) == [("tail", "message")]


_LINE_ENDS = st.sampled_from([b"\n", b"\r\n", b"\r"])
_EVENT = st.tuples(
    st.lists(
        st.binary(min_size=0, max_size=40).filter(lambda b: b"\r" not in b and b"\n" not in b), max_size=3
    ),
    st.sampled_from([None, b"error", b"ping"]),
    _LINE_ENDS,
    st.booleans(),
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(_EVENT, min_size=1, max_size=6), st.lists(st.integers(min_value=0, max_value=400), max_size=60)
)
def test_any_split_of_any_stream(events: list[Any], cuts: list[int]) -> None:
    """Reads that cannot end the line or event held are kept aside unjoined; whatever the cuts (many
    reads inside one line, a CR at a read's end, LF after LF across reads), the events are the same."""
    raw = b""
    expected = []
    for lines, name, end, comment in events:
        if comment:
            raw += b": keep-alive" + end
        if name is not None:
            raw += b"event: " + name + end
        raw += b"".join(b"data: " + line + end for line in lines) + end
        if lines:
            expected.append((b"\n".join(lines).decode("utf-8", "replace"), (name or b"message").decode()))
    points = sorted({c % (len(raw) + 1) for c in cuts})
    parts = [raw[a:b] for a, b in zip([0, *points], [*points, len(raw)], strict=True)]
    got = []
    d = SSEDecoder()
    for p in parts:
        got += [(data.decode("utf-8", "replace"), name) for data, name in d.feed(p)]
    got += [(data.decode("utf-8", "replace"), name) for data, name in d.flush()]
    assert got == expected


def test_an_event_over_the_limit_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A line that never ends, or an event of many lines that never ends, stops at ``MAX_EVENT_BYTES``
    (held bytes, not per read); one under it passes whole, however it is cut."""
    monkeypatch.setattr(sse, "MAX_EVENT_BYTES", 1000)
    d = SSEDecoder()
    d.feed(b"data: ")
    with pytest.raises(sse.SSEEventTooLarge, match="over the 1000-byte limit"):
        for _ in range(200):
            d.feed(b"x" * 10)
    d = SSEDecoder()
    with pytest.raises(sse.SSEEventTooLarge):
        for _ in range(200):
            d.feed(b"data: " + b"y" * 10 + b"\r\n")
    d = SSEDecoder()
    line = b"data: " + b"z" * 900 + b"\n\n"
    got = [e for i in range(0, len(line), 7) for e in d.feed(line[i : i + 7])]
    assert got == [(b"z" * 900, "message")]
