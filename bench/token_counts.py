"""Record llama.cpp's own prompt-token counts for a fixed set of chat requests, and compare the proxy's
estimate (``app.protocol.estimate_prompt_tokens``) with them.

The proxy estimates tokens when an upstream reports no usage (llama.cpp servers in streams). The truth
is the server's ``usage.prompt_tokens`` for the same request: its chat template and, with tools, the
template's tool preamble and the tools' JSON included. ``tests/fixtures/llamacpp_prompt_tokens.json``
holds those counts, recorded with this script against the local model servers (``scripts/models up``,
or any llama-cpp-python / llama.cpp server), and ``tests/test_token_estimate.py`` checks the estimate
against them without any server.

    .venv/bin/python bench/token_counts.py --record smollm2=http://127.0.0.1:8091 \\
        --record qwen2.5=http://127.0.0.1:8092        # ask the servers, rewrite the fixture
    .venv/bin/python bench/token_counts.py            # the estimate against the recorded counts
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.protocol import estimate_prompt_tokens  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "llamacpp_prompt_tokens.json"

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
SEARCH = {
    "type": "function",
    "function": {
        "name": "search_docs",
        "description": "Search the product documentation and return the best matching passages",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string"},
                "limit": {"type": "integer", "minimum": 1, "maximum": 20},
            },
            "required": ["query"],
        },
    },
}
CALC = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string"}},
            "required": ["expression"],
        },
    },
}
PARAGRAPH = (
    "The mitochondrion is a double-membrane-bound organelle found in most eukaryotic organisms. "
    "Mitochondria generate most of the cell's supply of adenosine triphosphate (ATP), which is used as a "
    "source of chemical energy. They were first discovered by Albert von Kolliker in 1857 in the "
    "voluntary muscles of insects. Summarise this in one sentence."
)
CODE = (
    "Why does this fail?\n\n```python\ndef mean(xs):\n    return sum(xs) / len(xs)\n\n"
    "print(mean([]))\n```\nIt raises ZeroDivisionError."
)


def _msgs(*pairs: tuple[str, str]) -> list[dict[str, Any]]:
    return [{"role": r, "content": c} for r, c in pairs]


CASES: dict[str, dict[str, Any]] = {
    "one_line": {"messages": _msgs(("user", "What is the capital of France?"))},
    "with_system": {
        "messages": _msgs(
            ("system", "You are a terse assistant. Answer in one word."), ("user", "Capital of Peru?")
        )
    },
    "multi_turn": {
        "messages": _msgs(
            ("user", "Hi! Can you help me plan a trip?"),
            ("assistant", "Of course. Where would you like to go, and for how long?"),
            ("user", "Lisbon, four days in May. What should I see?"),
        )
    },
    "paragraph": {"messages": _msgs(("user", PARAGRAPH))},
    "code": {"messages": _msgs(("user", CODE))},
    "json_content": {
        "messages": _msgs(
            ("user", 'Fix this JSON: {"name": "Ana", "age": 31, "tags": ["a", "b",], "ok": true}')
        )
    },
    "non_english": {
        "messages": _msgs(
            ("user", "Quelle est la différence entre « savoir » et « connaître » ? 请用中文回答。")
        )
    },
    "one_tool": {"messages": _msgs(("user", "What's the weather in Paris?")), "tools": [WEATHER]},
    "three_tools": {
        "messages": _msgs(("system", "Use the tools when they help."), ("user", "What is 17 * 23?")),
        "tools": [WEATHER, SEARCH, CALC],
    },
    "tool_round_trip": {
        "messages": [
            {"role": "user", "content": "What's the weather in Paris?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21, "sky": "clear"}'},
        ],
        "tools": [WEATHER],
    },
}


def record(servers: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "about": "usage.prompt_tokens of llama-cpp-python servers (GGUF chat templates) for each request; "
        "recorded by bench/token_counts.py",
        "servers": {},
        "cases": CASES,
        "counts": {},
    }
    with httpx.Client(timeout=300) as client:
        for family, url in servers.items():
            models = client.get(url + "/v1/models").json()["data"]
            out["servers"][family] = models[0]["id"]
            counts: dict[str, int] = {}
            for name, case in CASES.items():
                body = {"model": models[0]["id"], **case, "max_tokens": 1, "temperature": 0}
                r = client.post(url + "/v1/chat/completions", json=body)
                r.raise_for_status()
                counts[name] = r.json()["usage"]["prompt_tokens"]
            out["counts"][family] = counts
    return out


def compare(data: dict[str, Any]) -> list[tuple[str, str, int, int]]:
    rows = []
    for family, counts in data["counts"].items():
        for name, true in counts.items():
            rows.append((family, name, true, estimate_prompt_tokens(data["cases"][name])))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--record", action="append", default=[], metavar="FAMILY=URL")
    args = ap.parse_args()
    if args.record:
        data = record(dict(s.split("=", 1) for s in args.record))
        FIXTURE.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    data = json.loads(FIXTURE.read_text())
    print(f"{'family':10} {'case':18} {'llama.cpp':>9} {'estimate':>8} {'ratio':>6}")
    for family, name, true, est in compare(data):
        print(f"{family:10} {name:18} {true:9d} {est:8d} {est / true:6.2f}")


if __name__ == "__main__":
    main()
