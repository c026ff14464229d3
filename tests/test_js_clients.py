"""The Vercel AI SDK's default OpenAI provider (``createOpenAI(...)(id)``, which speaks the Responses API)
under node against the proxy on 127.0.0.1: generateText, streamText, and a tool call run to its answer.

The node project is ``tests/js`` (``ai`` + ``@ai-sdk/openai`` from its committed lockfile), installed by
``scripts/test`` with ``npm ci``. Run alone, the test skips when node or those packages are missing; under
``scripts/test`` (``CASCADE_TEST_REQUIRE_NODE=1``) it fails instead, like the other required tools.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import orjson
import pytest

from tests.conftest import loopback_stack as stack
from tests.conftest import two_stage

pytestmark = [pytest.mark.anyio, pytest.mark.loopback, pytest.mark.slow]

JS = Path(__file__).parent / "js"
REQUIRED = os.environ.get("CASCADE_TEST_REQUIRE_NODE") == "1"


def _node() -> str:
    node = shutil.which("node")
    missing = None
    if node is None:
        missing = "node is not installed"
    elif (
        not (JS / "node_modules" / "ai").is_dir() or not (JS / "node_modules" / "@ai-sdk" / "openai").is_dir()
    ):
        missing = "tests/js has no node_modules (run: cd tests/js && npm ci)"
    if missing is not None:
        if REQUIRED:
            pytest.fail(missing)
        pytest.skip(missing)
    assert node is not None
    return node


async def test_vercel_ai_sdk_default_provider_generate_stream_and_tools() -> None:
    node = _node()
    async with stack(two_stage("agent", "agent")) as (url, fake, _):
        proc = await asyncio.create_subprocess_exec(
            node, "responses.mjs", url, cwd=JS, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        async with asyncio.timeout(120):
            out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()[-3000:]
        paths = {r["path"] for r in fake.requests}
    res = orjson.loads(out.splitlines()[-1])
    # The upstream saw chat completions only: the proxy translated every Responses call.
    assert paths == {"/v1/chat/completions"}
    gen, streamed, tool, stream_tool = res["generate"], res["stream"], res["tool"], res["streamTool"]
    assert (gen["text"], gen["finishReason"]) == ("The answer is 42.", "stop")
    assert gen["usage"]["inputTokens"] > 0 and gen["usage"]["outputTokens"] > 0
    assert "".join(streamed["parts"]) == "The answer is 42."
    assert streamed["finishReason"] == "stop" and streamed["usage"]["totalTokens"] > 0
    assert tool["calls"] == ["test"]
    assert tool["text"] == "The tool said: sunny in test"
    assert [s["finishReason"] for s in tool["steps"]] == ["tool-calls", "stop"]
    assert stream_tool == {"text": "The tool said: sunny in test", "errors": []}
