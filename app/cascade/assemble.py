"""Rebuild a ``chat.completion`` from ``chat.completion.chunk`` events (a scored stage streamed upstream
so it could be aborted early is scored, and replayed, as one whole answer). The chunks arrive with
their shape checked (``app.upstream.shapes``): a malformed one is an upstream protocol error there."""

from __future__ import annotations

from typing import Any

Json = dict[str, Any]


class Assembler:
    __slots__ = ("_choices", "created", "id", "model", "system_fingerprint", "usage")

    def __init__(self) -> None:
        self._choices: dict[int, Json] = {}
        self.id: str | None = None
        self.model: str | None = None
        self.created: int | None = None
        self.system_fingerprint: str | None = None
        self.usage: Json | None = None

    def add(self, chunk: Json) -> None:
        self.id = self.id or chunk.get("id")
        self.model = self.model or chunk.get("model")
        self.created = self.created or chunk.get("created")
        self.system_fingerprint = self.system_fingerprint or chunk.get("system_fingerprint")
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        for ch in chunk.get("choices") or ():
            if not isinstance(ch, dict):
                continue
            idx = ch.get("index", 0)
            acc = self._choices.get(idx)
            if acc is None:
                acc = self._choices[idx] = {
                    "index": idx,
                    "content": [],
                    "refusal": [],
                    "tools": {},
                    "finish_reason": None,
                    "logprobs": None,
                }
            delta = ch.get("delta") or {}
            if isinstance(delta.get("content"), str):
                acc["content"].append(delta["content"])
            if isinstance(delta.get("refusal"), str):
                acc["refusal"].append(delta["refusal"])
            for tc in delta.get("tool_calls") or ():
                self._tool_delta(acc["tools"], tc)
            if ch.get("finish_reason") is not None:
                acc["finish_reason"] = ch["finish_reason"]
            lp = ch.get("logprobs")
            if isinstance(lp, dict) and isinstance(lp.get("content"), list):
                if acc["logprobs"] is None:
                    acc["logprobs"] = {"content": [], "refusal": None}
                acc["logprobs"]["content"].extend(lp["content"])

    @staticmethod
    def _tool_delta(tools: dict[int, Json], tc: Json) -> None:
        k = tc.get("index", len(tools))
        cur = tools.get(k)
        fn = tc.get("function") or {}
        if cur is None:
            cur = tools[k] = {
                "id": tc.get("id"),
                "type": tc.get("type") or "function",
                "function": {"name": "", "arguments": ""},
            }
        if tc.get("id"):
            cur["id"] = tc["id"]
        if isinstance(fn.get("name"), str):
            cur["function"]["name"] += fn["name"]
        if isinstance(fn.get("arguments"), str):
            cur["function"]["arguments"] += fn["arguments"]

    def text(self, index: int = 0) -> str:
        acc = self._choices.get(index)
        return "".join(acc["content"]) if acc else ""

    def completion(self) -> Json:
        choices = []
        for idx in sorted(self._choices):
            acc = self._choices[idx]
            msg: Json = {
                "role": "assistant",
                "content": "".join(acc["content"]) if acc["content"] or not acc["tools"] else None,
                "refusal": "".join(acc["refusal"]) or None,
            }
            if acc["tools"]:
                msg["tool_calls"] = [acc["tools"][k] for k in sorted(acc["tools"])]
            choices.append(
                {
                    "index": idx,
                    "message": msg,
                    "finish_reason": acc["finish_reason"] or "stop",
                    "logprobs": acc["logprobs"],
                }
            )
        out: Json = {
            "id": self.id or "",
            "object": "chat.completion",
            "created": self.created or 0,
            "model": self.model or "",
            "choices": choices
            or [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "", "refusal": None},
                    "finish_reason": "stop",
                    "logprobs": None,
                }
            ],
        }
        if self.usage is not None:
            out["usage"] = self.usage
        if self.system_fingerprint:
            out["system_fingerprint"] = self.system_fingerprint
        return out
