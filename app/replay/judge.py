"""The replay judge: an oracle upstream for ``learning.judge`` in ``cascade replay --online``.

``JudgedReplay(replay, rows, price_model)`` is the replay upstream (``app.replay.upstream``) plus one
model, ``replay-judge``: it answers the label prompt (``app.learning.labels.JUDGE_PROMPT``: is answer A
as good as answer B?) from the dataset's correctness: "yes" when A is correct or B is not. It finds
the row by the request text and each answer among that row's recorded answers; when it cannot, it
says neither yes nor no (the label call then gives no label).

It is a perfect judge, which a real one is not; what it costs is an estimate: the prompt's tokens
(~chars/4) plus one, at ``price_model``'s mean USD per token in the dataset (recorded cost over
prompt and answer tokens), reported as ``usage.cost``.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import orjson

from app.learning.labels import JUDGE_MAX_CHARS, parse_judge_prompt
from app.learning.rows import Row
from app.replay.dataset import estimate_tokens

JUDGE_MODEL = "replay-judge"

Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def usd_per_token(rows: Sequence[Row], model: str) -> float:
    """Mean recorded cost of ``model`` per (prompt + answer) token in ``rows``."""
    cost = sum(r.answers[model].cost_usd for r in rows if model in r.answers)
    tokens = sum(
        estimate_tokens(r.prompt) + estimate_tokens(r.answers[model].answer)
        for r in rows
        if model in r.answers
    )
    return cost / tokens if tokens else 0.0


class OracleJudge:
    """Answers judge prompts from the rows' correctness (see the module docstring)."""

    def __init__(self, rows: Sequence[Row], usd_per_token: float) -> None:
        self.by_question: dict[str, list[Row]] = {}
        for r in rows:
            self.by_question.setdefault(r.prompt[-JUDGE_MAX_CHARS:], []).append(r)
        self.rate = usd_per_token
        self.calls = 0

    def verdict(self, prompt: str) -> str:
        parts = parse_judge_prompt(prompt)
        if parts is None:
            return "unsure"
        question, a, b = parts
        for row in self.by_question.get(question, []):
            ca, cb = _correct(row, a), _correct(row, b)
            if ca is not None and cb is not None:
                return "yes" if ca or not cb else "no"
        return "unsure"

    def reply(self, request: Mapping[str, Any]) -> dict[str, Any]:
        messages = request.get("messages") or [{}]
        content = messages[-1].get("content") if isinstance(messages[-1], dict) else None
        text = content if isinstance(content, str) else ""
        self.calls += 1
        answer = self.verdict(text)
        pt = estimate_tokens(text)
        return {
            "id": f"chatcmpl-judge-{self.calls}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": JUDGE_MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": answer, "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": pt,
                "completion_tokens": 1,
                "total_tokens": pt + 1,
                "cost": (pt + 1) * self.rate,
            },
        }


def _correct(row: Row, text: str) -> bool | None:
    for rec in row.answers.values():
        if rec.answer[:JUDGE_MAX_CHARS] == text:
            return rec.correct
    return None


class JudgedReplay:
    """ASGI: ``replay-judge`` requests go to the oracle, everything else to the replay upstream."""

    def __init__(self, replay: Any, judge: OracleJudge) -> None:
        self.replay = replay
        self.judge = judge

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.replay(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:
            msg = await receive()
            chunks.append(msg.get("body", b""))
            if msg["type"] == "http.disconnect" or not msg.get("more_body"):
                break
        body = b"".join(chunks)
        try:
            request = orjson.loads(body)
        except orjson.JSONDecodeError:
            request = None
        if isinstance(request, dict) and request.get("model") == JUDGE_MODEL:
            out = orjson.dumps(self.judge.reply(request))
            headers = [(b"content-type", b"application/json")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": out, "more_body": False})
            return
        sent = False

        async def replay_receive() -> Message:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.replay(scope, replay_receive, send)
