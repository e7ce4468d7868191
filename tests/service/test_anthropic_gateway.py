"""An Anthropic deployment behind a real gateway process: the openai SDK's tool-calling round trip
over REST, streams with and without usage, errors and retries, and gRPC stubs (whose contract is the
same as for every other provider)."""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import openai
import orjson
import pydantic
import pytest

from gateway.jsonpb import MessageCodec
from llm_gateway.v1 import chat_pb2, chat_pb2_grpc
from tests.fakes import anthropic as fake
from tests.fakes.upstream import FakeUpstream, serve
from tests.harness import GatewayProcess
from tests.rest_facade.rest import post, sse_events, sse_json

KEY = "sk-ant-gateway-test-0123456789"
UPSTREAM_MODEL = "claude-sonnet-4-5-20250929"
REQUEST = MessageCodec.for_type(chat_pb2.CreateChatCompletionRequest)
WEATHER: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CLOCK: Any = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
ASK: Any = [{"role": "user", "content": "Weather in Paris, and the time?"}]


def config(upstream: FakeUpstream, **routing: Any) -> dict[str, Any]:
    return {
        "logging": {"level": "INFO"},
        "routing": {"retries": 0, "cooldown_failures": 1_000_000, "backoff_initial": 0.01, **routing},
        "providers": {"claude": {"type": "anthropic", "api_key": KEY, "api_url": upstream.url}},
        "models": {"claude": {"provider": "claude", "model": UPSTREAM_MODEL}},
    }


upstream = pytest.fixture(scope="module", name="upstream")(serve)


@pytest.fixture(autouse=True)
def reset(upstream: FakeUpstream) -> None:
    upstream.received.clear()
    upstream.reply(200, fake.message())


@pytest.fixture(scope="module")
def gateway(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    process = GatewayProcess(config(upstream), tmp_path_factory.mktemp("anthropic")).start()
    yield process
    assert process.stop() == 0
    assert KEY not in process.log_text()


def client(gateway: GatewayProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key="unused", max_retries=0, timeout=20)


def test_openai_sdk_tool_calling_round_trip(gateway: GatewayProcess, upstream: FakeUpstream) -> None:
    upstream.script(
        upstream.replying(
            200,
            fake.message(
                [
                    fake.text("Let me look."),
                    fake.tool_use("toolu_01W", "get_weather", {"city": "Paris"}),
                    fake.tool_use("toolu_01T", "get_time", {}),
                ],
                "tool_use",
            ),
        ),
        upstream.replying(200, fake.message([fake.text("18°C and sunny; it is noon.")])),
    )
    with client(gateway) as sdk:
        first = sdk.chat.completions.create(model="claude", messages=ASK, tools=[WEATHER, CLOCK], tool_choice="auto")
        choice = first.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me look."
        calls = choice.message.tool_calls
        assert calls is not None and [c.function.name for c in calls] == ["get_weather", "get_time"]  # type: ignore[union-attr]
        assert orjson.loads(calls[0].function.arguments) == {"city": "Paris"}  # type: ignore[union-attr]
        assert calls[1].function.arguments == "{}"  # type: ignore[union-attr]
        results = {"get_weather": "18C, sunny", "get_time": "12:00"}
        messages = [
            *ASK,
            choice.message.model_dump(exclude_none=True),
            *(
                {"role": "tool", "tool_call_id": c.id, "content": results[c.function.name]}  # type: ignore[union-attr]
                for c in calls
            ),
        ]
        second = sdk.chat.completions.create(model="claude", messages=messages, tools=[WEATHER, CLOCK])
    assert second.choices[0].message.content == "18°C and sunny; it is noon."
    assert second.choices[0].finish_reason == "stop"
    assert second.usage is not None and second.usage.total_tokens == 30
    sent = upstream.received[-1]
    assert sent.path == "/v1/messages" and sent.headers["x-api-key"] == KEY
    body = sent.json
    assert body["model"] == UPSTREAM_MODEL
    assert body["tools"][0] == {
        "name": "get_weather",
        "description": "Weather for a city.",
        "input_schema": WEATHER["function"]["parameters"],
    }
    assert body["messages"] == [
        {"role": "user", "content": "Weather in Paris, and the time?"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me look."},
                {"type": "tool_use", "id": "toolu_01W", "name": "get_weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "toolu_01T", "name": "get_time", "input": {}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_01W", "content": "18C, sunny"},
                {"type": "tool_result", "tool_use_id": "toolu_01T", "content": "12:00"},
            ],
        },
    ]


def test_openai_sdk_streams_parallel_tool_calls_after_text(gateway: GatewayProcess, upstream: FakeUpstream) -> None:
    events = fake.stream_of(
        [
            fake.text("Checking both. "),
            fake.tool_use("toolu_01W", "get_weather", {"city": "Paris"}),
            fake.tool_use("toolu_01T", "get_time", {}),
        ],
        "tool_use",
    )
    upstream.handler = fake.sse(events, cuts=range(0, 100_000, 50))
    with client(gateway) as sdk:
        chunks = list(
            sdk.chat.completions.create(
                model="claude",
                messages=ASK,
                tools=[WEATHER, CLOCK],
                stream=True,
                stream_options={"include_usage": True},
            )
        )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    calls: dict[int, dict[str, str]] = {}
    for chunk in chunks:
        for call in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            entry = calls.setdefault(call.index, {"id": "", "name": "", "arguments": ""})
            entry["id"] += call.id or ""
            entry["name"] += (call.function.name or "") if call.function else ""
            entry["arguments"] += (call.function.arguments or "") if call.function else ""
    assert text == "Checking both. "
    assert calls == {
        0: {"id": "toolu_01W", "name": "get_weather", "arguments": '{"city":"Paris"}'},
        1: {"id": "toolu_01T", "name": "get_time", "arguments": "{}"},
    }
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 30
    assert upstream.last().json["stream"] is True


def _tokens(gateway: GatewayProcess, kind: str) -> float:
    with urllib.request.urlopen(f"{gateway.base_url}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    pattern = re.compile(rf"^llm_gateway_{kind}_tokens_total\{{([^}}]*)\}} (\S+)$", re.M)
    return sum(float(value) for labels, value in pattern.findall(text) if 'model="claude"' in labels)


def test_a_stream_without_include_usage_has_no_usage_chunk_but_exact_metrics(
    gateway: GatewayProcess, upstream: FakeUpstream
) -> None:
    before = _tokens(gateway, "prompt"), _tokens(gateway, "completion")
    upstream.handler = fake.sse(
        fake.stream_of(
            [fake.text("ok")],
            start_usage={"input_tokens": 40, "output_tokens": 1},
            delta_usage={"output_tokens": 7, "cache_read_input_tokens": 500, "cache_creation_input_tokens": 60},
        )
    )
    reply = post(gateway.base_url, {"model": "claude", "messages": ASK, "stream": True})
    assert reply.status == 200
    chunks = sse_json(reply.body)
    assert chunks and all("usage" not in chunk for chunk in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "ok"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    after = _tokens(gateway, "prompt"), _tokens(gateway, "completion")
    assert (after[0] - before[0], after[1] - before[1]) == (600, 7)  # 40 + 500 cached + 60 cache-written


def test_an_error_event_mid_stream_is_an_error_event_then_done(gateway: GatewayProcess, upstream: FakeUpstream) -> None:
    events = fake.stream_of([fake.text("Hello there")])[:5]
    events.append(("error", fake.error("overloaded_error", "Overloaded")))
    upstream.handler = fake.sse(events, cuts=[len(fake.encode(events[:4]))])
    reply = post(gateway.base_url, {"model": "claude", "messages": ASK, "stream": True})
    assert reply.status == 200
    data = sse_events(reply.body)
    assert data[-1] == b"[DONE]"
    assert orjson.loads(data[-2]) == {
        "error": {"message": "Overloaded", "type": "overloaded_error", "param": None, "code": None}
    }
    text = "".join(orjson.loads(d)["choices"][0]["delta"].get("content", "") for d in data[:-2])
    assert text == "Hello th"


@pytest.fixture
def retrying(upstream: FakeUpstream, gateway_factory: Callable[..., GatewayProcess]) -> Callable[[], GatewayProcess]:
    return lambda: gateway_factory(config(upstream, retries=2))


def test_overloaded_529_is_retried_and_reaches_the_client_as_503(
    upstream: FakeUpstream, retrying: Callable[[], GatewayProcess]
) -> None:
    gateway = retrying()
    overloaded = fake.error("overloaded_error", "Overloaded")
    upstream.script(upstream.replying(529, overloaded))
    with client(gateway) as sdk:
        reply = sdk.chat.completions.create(model="claude", messages=ASK)
        assert reply.choices[0].message.content == "Hello!" and len(upstream.received) == 2
        upstream.received.clear()
        upstream.reply(529, overloaded)
        with pytest.raises(openai.InternalServerError) as caught:
            sdk.chat.completions.create(model="claude", messages=ASK)
    assert caught.value.status_code == 503 and len(upstream.received) == 3
    assert caught.value.body == {"message": "Overloaded", "type": "overloaded_error", "param": None, "code": None}


def test_a_spend_limit_429_is_not_retried_but_a_rate_limit_429_is(
    upstream: FakeUpstream, retrying: Callable[[], GatewayProcess]
) -> None:
    gateway = retrying()
    upstream.reply(
        429,
        fake.error("rate_limit_error", "Workspace API usage limit reached", error_code="enforced_spend_limit_reached"),
    )
    with client(gateway) as sdk:
        with pytest.raises(openai.RateLimitError) as caught:
            sdk.chat.completions.create(model="claude", messages=ASK)
        assert len(upstream.received) == 1
        assert caught.value.code == "enforced_spend_limit_reached"
        upstream.received.clear()
        upstream.reply(429, fake.error("rate_limit_error", "Too many requests"), headers={"retry-after": "0"})
        with pytest.raises(openai.RateLimitError):
            sdk.chat.completions.create(model="claude", messages=ASK)
        assert len(upstream.received) == 3


def test_openai_sdk_structured_output(gateway: GatewayProcess, upstream: FakeUpstream) -> None:
    class Weather(pydantic.BaseModel):
        city: str
        temperature_c: float

    answer = fake.tool_use("toolu_01J", "json_response", {"city": "Paris", "temperature_c": 18.5})
    upstream.reply(200, fake.message([answer], "tool_use"))
    with client(gateway) as sdk:
        reply = sdk.chat.completions.parse(model="claude", messages=ASK, response_format=Weather)
    assert reply.choices[0].message.parsed == Weather(city="Paris", temperature_c=18.5)
    assert reply.choices[0].finish_reason == "stop"
    sent = upstream.last().json
    assert sent["tool_choice"] == {"type": "tool", "name": "json_response"}
    assert sent["tools"][0]["input_schema"]["properties"]["city"] == {"title": "City", "type": "string"}


def test_a_request_that_cannot_map_is_a_400(gateway: GatewayProcess, upstream: FakeUpstream) -> None:
    with client(gateway) as sdk, pytest.raises(openai.BadRequestError) as caught:
        sdk.chat.completions.create(model="claude", messages=ASK, n=2)
    assert caught.value.param == "n" and upstream.received == []


def test_grpc_stubs(gateway: GatewayProcess, upstream: FakeUpstream) -> None:
    upstream.reply(200, fake.message([fake.thinking("Hmm."), fake.text("Bonjour")]))
    request = REQUEST.decode({"model": "claude", "messages": ASK})
    with gateway.channel() as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        reply = stub.CreateChatCompletion(request, timeout=20)
        assert reply.choices[0].message.content == "Bonjour"
        assert orjson.loads(reply.choices[0].message.extra["reasoning_content"]) == "Hmm."
        assert reply.usage.total_tokens == 30
        upstream.handler = fake.sse(fake.stream_of([fake.tool_use("toolu_1", "get_time", {})], "tool_use"))
        request.stream = True
        chunks = list(stub.StreamChatCompletion(request, timeout=20))
        calls = [call for chunk in chunks for choice in chunk.choices for call in choice.delta.tool_calls]
        assert [(call.index, call.function.arguments) for call in calls] == [(0, ""), (0, "{}")]
        assert calls[0].id == "toolu_1" and calls[0].function.name == "get_time"
        upstream.reply(401, fake.error("authentication_error", "invalid x-api-key"))
        with pytest.raises(grpc.RpcError) as caught:
            stub.CreateChatCompletion(request, timeout=20)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
        assert caught.value.details() == "invalid x-api-key"  # type: ignore[attr-defined]


def test_the_key_never_reaches_the_log(gateway: GatewayProcess) -> None:
    assert KEY not in Path(gateway.log_path).read_text()
