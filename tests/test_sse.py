"""SSE decoder: survives any split of the byte stream, CRLF/CR line endings, comments, multi-line data."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

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
