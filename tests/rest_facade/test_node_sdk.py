"""The official openai Node SDK (tests/node): one unary and one streaming call, in both process modes."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import orjson
import pytest

from tests.fakes.upstream import FakeUpstream, chunks

from .conftest import Stack

NODE_DIR = Path(__file__).resolve().parent.parent / "node"


@pytest.fixture(scope="module")
def node() -> str:
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        pytest.fail("node and npm are required for the Node SDK test (CI installs them): install Node.js >= 18")
    if not (NODE_DIR / "node_modules" / "openai" / "package.json").exists():
        done = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, f"npm ci failed in {NODE_DIR}:\n{done.stdout}\n{done.stderr}"
    return node


def test_node_sdk_unary_and_stream(stack: Stack, fake: FakeUpstream, node: str) -> None:
    fake.by_stream_flag()
    done = subprocess.run(
        [node, "sdk_check.mjs", f"{stack.base_url}/v1", "gpt-4o"],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    result = orjson.loads(done.stdout.strip().splitlines()[-1])
    assert result["unary"]["content"] == "Hello!"
    assert result["unary"]["usage"]["total_tokens"] == 18
    assert result["unary"]["request_id"]
    assert result["stream"] == {
        "text": "Hello!",
        "chunks": len(chunks()),
        "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12},
        "finish": "stop",
    }
    assert [r.json.get("stream") for r in fake.received] == [None, True]
