"""The OpenAI-compatible provider's stream against a real HTTP upstream: a bad event after good ones, as a
table. The chunks before it still reach the caller; the bad event ends the stream with the right error."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from gateway.config import Timeouts, parse
from gateway.errors import BadGatewayError, GatewayError, UpstreamError
from llm_gateway.v1 import chat_pb2
from tests.fakes.upstream import FakeUpstream, chunks
from tests.service.streams import drain


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

    batches, error = drain(config.providers["up"], request, "gpt-4o", Timeouts())
    return sum(len(batch) for batch in batches), error


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
