"""The official openai Python SDK, sync and async, against a live gateway in both process modes."""

from __future__ import annotations

import asyncio
from typing import Any

import openai
import pytest

from tests.fakes.upstream import FakeUpstream, chunks, completion

from .conftest import CLIENT_KEY, OPENAI_KEY, Stack

MESSAGES: Any = [{"role": "user", "content": "Say hello"}]
TOOLS: Any = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
# retry-after-ms makes the SDK's retries immediate instead of its 0.5 s+ backoff.
FAST_RETRY = {"retry-after": "0", "retry-after-ms": "1"}


def sync_client(stack: Stack, max_retries: int = 0) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=CLIENT_KEY, max_retries=max_retries, timeout=20)


def async_client(stack: Stack, max_retries: int = 0) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{stack.base_url}/v1", api_key=CLIENT_KEY, max_retries=max_retries, timeout=20)


def tool_call_completion() -> dict[str, Any]:
    body = completion()
    body["choices"][0]["finish_reason"] = "tool_calls"
    body["choices"][0]["message"] = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
        ],
    }
    return body


def test_sync_unary(stack: Stack, fake: FakeUpstream) -> None:
    with sync_client(stack) as client:
        reply = client.chat.completions.create(model="gpt-4o", messages=MESSAGES, temperature=0)
    assert reply.choices[0].message.content == "Hello!"
    assert reply.usage is not None and reply.usage.total_tokens == 18
    sent = fake.last()
    assert sent.json["messages"] == MESSAGES
    assert sent.headers["Authorization"] == f"Bearer {OPENAI_KEY}"


def test_sync_stream(stack: Stack, fake: FakeUpstream) -> None:
    fake.stream(chunks())
    with sync_client(stack) as client:
        stream = client.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
        got = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in got if c.choices) == "Hello!"
    assert got[-1].usage is not None and got[-1].usage.total_tokens == 12
    assert [c.choices[0].finish_reason for c in got if c.choices][-1] == "stop"


def test_sync_tools(stack: Stack, fake: FakeUpstream) -> None:
    fake.reply(200, tool_call_completion())
    with sync_client(stack) as client:
        reply = client.chat.completions.create(model="gpt-4o", messages=MESSAGES, tools=TOOLS, tool_choice="auto")
    call = reply.choices[0].message.tool_calls
    assert call is not None and call[0].function.name == "get_weather"  # type: ignore[union-attr]
    assert call[0].function.arguments == '{"city":"Paris"}'  # type: ignore[union-attr]
    assert reply.choices[0].message.content is None
    assert fake.last().json["tools"] == TOOLS and fake.last().json["tool_choice"] == "auto"


def test_sync_with_raw_response(stack: Stack) -> None:
    with sync_client(stack) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o", messages=MESSAGES, extra_headers={"x-request-id": "sdk-raw-1"}
        )
    assert raw.status_code == 200
    assert raw.headers["x-request-id"] == "sdk-raw-1"
    assert raw.headers["content-type"] == "application/json"
    assert raw.parse().choices[0].message.content == "Hello!"


def test_sync_models(stack: Stack) -> None:
    with sync_client(stack) as client:
        ids = {m.id for m in client.models.list()}
    assert {"gpt-4o", "dummy"} <= ids


def test_sync_error_classes(stack: Stack, fake: FakeUpstream) -> None:
    with sync_client(stack) as client:
        with pytest.raises(openai.NotFoundError) as not_found:
            client.chat.completions.create(model="no-such-model", messages=MESSAGES)
        assert not_found.value.code == "model_not_found" and not_found.value.param == "model"
        with pytest.raises(openai.BadRequestError) as bad:
            client.chat.completions.create(model="gpt-4o", messages="not a list")  # type: ignore[arg-type]
        assert bad.value.param == "messages" and bad.value.status_code == 400
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True, extra_body={"n": "x"})
        fake.reply(
            429,
            {"error": {"message": "slow down", "type": "requests", "param": None, "code": "rate_limit"}},
            headers=FAST_RETRY,
        )
        with pytest.raises(openai.RateLimitError) as limited:
            client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        assert limited.value.status_code == 429 and limited.value.body == {
            "message": "slow down",
            "type": "requests",
            "param": None,
            "code": "rate_limit",
        }
        assert limited.value.response.headers["retry-after"] == "0"
        fake.reply(
            502, {"error": {"message": "bad gateway upstream", "type": "server_error", "param": None, "code": None}}
        )
        with pytest.raises(openai.APIStatusError) as upstream_5xx:
            client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        assert upstream_5xx.value.status_code == 502
        with pytest.raises(openai.APIStatusError) as down:
            client.chat.completions.create(model="broken", messages=MESSAGES)
        assert down.value.status_code == 503 and isinstance(down.value, openai.InternalServerError)


def test_sync_error_mid_stream_raises(stack: Stack, fake: FakeUpstream) -> None:
    error = {"error": {"message": "overloaded", "type": "server_error", "param": None, "code": None}}
    fake.stream([chunks()[0], error], done=False)
    with sync_client(stack) as client:
        stream = client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
        with pytest.raises(openai.APIError, match="overloaded"):
            for _ in stream:
                pass


@pytest.mark.parametrize(("status", "retried"), [(429, True), (503, True), (400, False), (404, False)])
def test_sync_retries(stack: Stack, fake: FakeUpstream, status: int, retried: bool) -> None:
    """The SDK retries what OpenAI says is retryable (429, 5xx) and nothing else; max_retries=2 -> 3 attempts."""
    fake.reply(status, {"error": {"message": "no", "type": "x", "param": None, "code": None}}, headers=FAST_RETRY)
    with sync_client(stack, max_retries=2) as client, pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert info.value.status_code == status
    assert len(fake.received) == (3 if retried else 1)


def test_async_unary_stream_tools_and_errors(stack: Stack, fake: FakeUpstream) -> None:
    async def scenario() -> None:
        async with async_client(stack) as client:
            reply = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
            assert reply.choices[0].message.content == "Hello!"

            fake.stream(chunks())
            stream = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
            text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            assert text == "Hello!"

            fake.reply(200, tool_call_completion())
            tools = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, tools=TOOLS)
            assert tools.choices[0].message.tool_calls[0].function.name == "get_weather"  # type: ignore[index,union-attr]

            fake.reply(200, completion())
            raw = await client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES)
            assert raw.headers["x-request-id"] and raw.parse().choices[0].message.content == "Hello!"

            with pytest.raises(openai.NotFoundError):
                await client.chat.completions.create(model="no-such-model", messages=MESSAGES, stream=True)
            with pytest.raises(openai.BadRequestError):
                await client.chat.completions.create(model="gpt-4o", messages=[])

        fake.received.clear()
        fake.reply(
            429, {"error": {"message": "later", "type": "requests", "param": None, "code": None}}, headers=FAST_RETRY
        )
        async with async_client(stack, max_retries=1) as retrying:
            with pytest.raises(openai.RateLimitError):
                await retrying.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        assert len(fake.received) == 2

    asyncio.run(scenario())


def test_async_concurrent_streams(stack: Stack, fake: FakeUpstream) -> None:
    fake.stream(chunks(), delay=0.005)

    async def one(client: openai.AsyncOpenAI) -> str:
        stream = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def scenario() -> list[str]:
        async with async_client(stack) as client:
            return await asyncio.gather(*(one(client) for _ in range(16)))

    assert asyncio.run(scenario()) == ["Hello!"] * 16
