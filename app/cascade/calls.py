"""Calling a stage's upstream for a whole answer: the logprobs its scorers need, and a scored stage
streamed upstream so its scorers can reject it early (``early_abort``)."""

from __future__ import annotations

from typing import Any

from app.cascade.assemble import Assembler
from app.cascade.plan import Stage
from app.errors import CascadeBaseError

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


async def collect_streamed(stage: Stage, body: Json) -> Json:
    """Stream a scored stage upstream, checking the growing answer; return the whole completion, or
    raise EarlyAbort (leaving the stream closes the connection, which stops the upstream)."""
    up = stage.upstream
    req = ask_logprobs(stage, body, up.prepare(body, stream=True))
    asm = Assembler()
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
