"""The OpenAI-compatible provider's stream against a real HTTP upstream: a bad event after good ones, as a
table. The chunks before it still reach the caller; the bad event ends the stream with the right error."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from gateway.call import CallInfo
from gateway.config import Timeouts, parse
from gateway.errors import BadGatewayError, GatewayError, UpstreamError
from llm_gateway.v1 import chat_pb2
from service.providers import build_provider
from tests.fakes.upstream import FakeUpstream, chunks


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstream]:
    server = FakeUpstream().start()
    yield server
    server.stop()


def _read(fake: FakeUpstream) -> tuple[int, GatewayError | None]:
    config = parse({"providers": {"up": {"type": "openai", "api_url": f"{fake.url}/v1", "api_key": "sk-up"}}}, {})
    request = chat_pb2.CreateChatCompletionRequest(
        model="gpt-4o", messages=[chat_pb2.ChatMessage(role="user", content_text="hi")], stream=True
    )

    async def run() -> tuple[int, GatewayError | None]:
        provider = build_provider(config.providers["up"])
        got = 0
        try:
            async for batch in provider.stream(request, "gpt-4o", CallInfo(), Timeouts()):
                got += len(batch)
        except GatewayError as exc:
            return got, exc
        finally:
            await provider.close()
        return got, None

    return asyncio.run(run())


@pytest.mark.parametrize(
    ("event", "kind", "says"),
    [
        (b"not json", BadGatewayError, "sent an invalid stream event: invalid literal"),
        (b"[1, 2]", BadGatewayError, "sent an invalid stream event: not a JSON object"),
        (b'"text"', BadGatewayError, "sent an invalid stream event: not a JSON object"),
        (b'{"error": {"code": 429, "message": "slow down"}}', UpstreamError, ""),
    ],
)
def test_a_bad_event_after_good_ones(fake: FakeUpstream, event: bytes, kind: type[GatewayError], says: str) -> None:
    good: list[Any] = chunks()[:2]
    fake.stream([*good, event], done=False)
    got, error = _read(fake)
    assert got == len(good)
    assert isinstance(error, kind), error
    assert says in error.message
    if isinstance(error, UpstreamError):
        assert error.http_status == 429
