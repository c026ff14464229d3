"""Calling a stage's upstream: a whole answer (with the logprobs its scorers need), a scored stage
streamed upstream so its scorers can reject it early (``early_abort``) or so a cancel knows what it
generated (hedging), and the streamed last stage opened up to its first chunk."""

from __future__ import annotations

from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

from app.cascade.assemble import Assembler
from app.cascade.plan import Stage
from app.errors import CascadeBaseError
from app.upstream.client import UpstreamEvents

Json = dict[str, Any]


def ask_logprobs(stage: Stage, body: Json, req: Json) -> Json:
    """Ask the upstream for token logprobs when a scorer of this stage needs them (the reply strips them
    unless the client asked). ``top_logprobs: 1`` too: llama.cpp's server returns no logprobs without it."""
    if stage.needs_logprobs and body.get("logprobs") is not True:
        req["logprobs"] = True
        if "top_logprobs" not in body:
            req["top_logprobs"] = 1
    return req


class EarlyAbort(CascadeBaseError):
    """A stream check rejected the answer before its end; ``partial`` is what had come."""

    def __init__(self, reason: str, partial: Json) -> None:
        super().__init__(reason)
        self.reason = reason
        self.partial = partial


async def collect_streamed(stage: Stage, body: Json, asm: Assembler | None = None) -> Json:
    """Stream a scored stage upstream, checking the growing answer; return the whole completion, or
    raise EarlyAbort (leaving the stream closes the connection, which stops the upstream). ``asm``
    holds what came so far, for whoever cancels the call."""
    up = stage.upstream
    req = ask_logprobs(stage, body, up.prepare(body, stream=True))
    asm = asm if asm is not None else Assembler()
    seen = 0
    async with up.stream(req) as chunks:
        async for chunk in chunks:
            asm.add(chunk)
            text = asm.text(0)
            if len(text) == seen:
                continue
            seen = len(text)
            for check in stage.stream_checks:
                why = check.check_partial(body, text)
                if why is not None:
                    partial = asm.completion()
                    partial.pop("usage", None)  # whatever was reported so far is not the final count
                    raise EarlyAbort(why, partial)
    return asm.completion()


@dataclass(slots=True, eq=False)
class Opened:
    """A streamed stage opened upstream: the stream (held by ``stack``: closing it closes the
    connection) and its first events (what the first read from the socket completed), already read."""

    stack: AsyncExitStack
    chunks: UpstreamEvents
    first: list[tuple[bytes, Json]]

    def partial(self) -> Json:
        """What it sent so far, as a completion without usage (what a cancel charges)."""
        asm = Assembler()
        for _, chunk in self.first:
            asm.add(chunk)
        out = asm.completion()
        out.pop("usage", None)
        return out


async def open_stream(stage: Stage, body: Json) -> Opened:
    """Open the stage's stream and read its first chunk. Raises UpstreamError; closes what it opened
    on any failure (and on cancel)."""
    up = stage.upstream
    stack = AsyncExitStack()
    try:
        chunks = await stack.enter_async_context(up.stream(up.prepare(body, stream=True)))
        first = await chunks.batch()  # at least one chunk: a stream of none fails in ``batch``
    except BaseException:
        await stack.aclose()
        raise
    return Opened(stack, chunks, first)
