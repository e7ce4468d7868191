"""Golden round trips through a live gateway and the fake upstream, in both process modes:

- REST JSON -> proto -> upstream JSON equals the sent JSON, apart from `model`;
- upstream JSON -> proto -> client JSON equals what the upstream sent;
- every SSE chunk likewise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.fakes.upstream import FakeUpstream, chunks

from .conftest import UPSTREAM_MODEL, Stack
from .rest import post, same_json, sse_json

GOLDEN = Path(__file__).parent / "golden"


def corpus(kind: str) -> list[Any]:
    files = sorted((GOLDEN / kind).glob("*.json"))
    assert files, f"no golden {kind}"
    return [pytest.param(orjson.loads(f.read_bytes()), id=f.stem) for f in files]


@pytest.mark.parametrize("sent", corpus("requests"))
def test_request_reaches_upstream_unchanged(stack: Stack, fake: FakeUpstream, sent: dict[str, Any]) -> None:
    if sent.get("stream"):
        fake.stream(chunks())
    reply = post(stack.base_url, sent)
    assert reply.status == 200, reply.body
    upstream = fake.last().json
    assert upstream["model"] == UPSTREAM_MODEL  # the route's upstream name replaces the client's
    same_json({**sent, "model": UPSTREAM_MODEL}, upstream)


@pytest.mark.parametrize("answer", corpus("responses"))
def test_response_reaches_client_unchanged(stack: Stack, fake: FakeUpstream, answer: dict[str, Any]) -> None:
    fake.reply(200, answer)
    reply = post(stack.base_url, {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})
    assert reply.status == 200, reply.body
    assert reply.headers["content-type"] == "application/json"
    same_json(answer, reply.json)


@pytest.mark.parametrize("events", corpus("streams"))
def test_stream_chunks_reach_client_unchanged(stack: Stack, fake: FakeUpstream, events: list[Any]) -> None:
    fake.stream(events)
    request = {
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    reply = post(stack.base_url, request)
    assert reply.status == 200, reply.body
    assert reply.headers["content-type"] == "text/event-stream"
    got = sse_json(reply.body)
    if not any(event.get("usage") for event in events):
        # The upstream reported no usage although the client asked: the gateway counts it and says so.
        *got, estimated = got
        assert estimated["choices"] == [] and estimated["usage"]["x_llm_gateway_estimated"] is True, estimated
    assert len(got) == len(events)
    for upstream_chunk, client_chunk in zip(events, got, strict=True):
        same_json(upstream_chunk, client_chunk)
