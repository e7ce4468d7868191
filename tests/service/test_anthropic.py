"""The Anthropic provider against a fake Messages API on loopback: golden request and response
translations, event streams cut into network reads at awkward places, and error mapping."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.call import CallInfo
from gateway.config import Timeouts, parse
from gateway.errors import BadGatewayError, InvalidRequestError, UpstreamError
from gateway.jsonpb import MessageCodec
from llm_gateway.v1 import chat_pb2
from service.providers import build_provider
from service.providers.anthropic import completion, request_body
from service.retry import retryable
from tests.fakes import anthropic as fake
from tests.fakes.upstream import FakeUpstream, serve
from tests.service.streams import drain

REQUEST = MessageCodec.for_type(chat_pb2.CreateChatCompletionRequest)
COMPLETION = MessageCodec.for_type(chat_pb2.ChatCompletion)
CHUNK = MessageCodec.for_type(chat_pb2.ChatCompletionChunk)
GOLDEN = Path(__file__).parent / "golden" / "anthropic"
KEY = "sk-ant-test-0123456789"
HELLO = {"model": "claude", "messages": [{"role": "user", "content": "Hello"}]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}},
]


upstream = pytest.fixture(scope="module", name="upstream")(serve)


@pytest.fixture(autouse=True)
def reset(upstream: FakeUpstream) -> None:
    upstream.received.clear()
    upstream.reply(200, fake.message())


def provider_config(upstream: FakeUpstream, **spec: Any) -> Any:
    spec = {"type": "anthropic", "api_url": upstream.url, "api_key": KEY, **spec}
    return parse({"providers": {"claude": spec}}, {}).providers["claude"]


def complete(upstream: FakeUpstream, body: dict[str, Any] = HELLO, **spec: Any) -> dict[str, Any]:
    async def run() -> dict[str, Any]:
        provider = build_provider(provider_config(upstream, **spec))
        try:
            reply = await provider.complete(REQUEST.decode(body), "claude-sonnet-4-5", CallInfo(), Timeouts())
            return orjson.loads(COMPLETION.dumps(reply))  # type: ignore[no-any-return]
        finally:
            await provider.close()

    return asyncio.run(run())


def stream(upstream: FakeUpstream, body: dict[str, Any] = HELLO) -> tuple[list[list[dict[str, Any]]], Exception | None]:
    """The batches of chunks (as JSON) the provider yields, and the error it ended with, if any."""
    request = REQUEST.decode({**body, "stream": True})
    batches, error = drain(provider_config(upstream), request, "claude-sonnet-4-5", Timeouts(total=20))
    assert all(batches), "a batch is never empty"
    return [[orjson.loads(CHUNK.dumps(chunk)) for chunk in batch] for batch in batches], error


def flat(batches: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    return [chunk for batch in batches for chunk in batch]


def assembled(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """What a client puts together from the deltas, as the openai SDK does."""
    out: dict[str, Any] = {"content": "", "reasoning": "", "tools": {}, "finish": [], "usage": None, "roles": []}
    for chunk in chunks:
        if chunk.get("usage"):
            out["usage"] = chunk["usage"]
        for choice in chunk["choices"]:
            delta = choice["delta"]
            out["content"] += delta.get("content") or ""
            out["reasoning"] += delta.get("reasoning_content") or ""
            if "role" in delta:
                out["roles"].append(delta["role"])
            for call in delta.get("tool_calls") or []:
                tool = out["tools"].setdefault(call["index"], {"id": None, "name": None, "arguments": ""})
                tool["id"] = call.get("id") or tool["id"]
                tool["name"] = call.get("function", {}).get("name") or tool["name"]
                tool["arguments"] += call.get("function", {}).get("arguments") or ""
            if choice.get("finish_reason"):
                out["finish"].append(choice["finish_reason"])
    return out


# ---------------------------------------------------------------------------------------- golden


@pytest.mark.parametrize("path", sorted((GOLDEN / "requests").glob("*.json")), ids=lambda p: p.stem)
def test_request_translation_golden(path: Path) -> None:
    case = orjson.loads(path.read_bytes())
    body = request_body(REQUEST.decode(case["openai"]), case["upstream_model"], stream=False)
    assert orjson.loads(orjson.dumps(body)) == case["anthropic"]


@pytest.mark.parametrize("path", sorted((GOLDEN / "responses").glob("*.json")), ids=lambda p: p.stem)
def test_response_translation_golden(path: Path) -> None:
    case = orjson.loads(path.read_bytes())
    got = orjson.loads(COMPLETION.dumps(completion(case["anthropic"], case.get("json_tool"))))
    assert got.pop("created") > 0
    expected = dict(case["openai"])
    expected.pop("created")
    assert got == expected


def test_golden_translations_reach_the_upstream(upstream: FakeUpstream) -> None:
    """The request the fake receives is the golden one, and the reply the golden answer."""
    case = orjson.loads((GOLDEN / "requests" / "tool_round_trip.json").read_bytes())
    answer = orjson.loads((GOLDEN / "responses" / "tool_use_after_text.json").read_bytes())
    upstream.reply(200, answer["anthropic"])
    got = complete(upstream, case["openai"])
    sent = upstream.last().json
    assert sent == {**case["anthropic"], "model": "claude-sonnet-4-5"}
    got.pop("created")
    assert got == {key: value for key, value in answer["openai"].items() if key != "created"}


# ---------------------------------------------------------------------------------------- unary


def test_unary_sends_the_key_version_and_path(upstream: FakeUpstream) -> None:
    reply = complete(upstream)
    assert reply["choices"][0]["message"]["content"] == "Hello!"
    sent = upstream.last()
    assert sent.path == "/v1/messages"
    assert sent.headers["x-api-key"] == KEY
    assert sent.headers["anthropic-version"] == "2023-06-01"
    assert "anthropic-beta" not in sent.headers and "Authorization" not in sent.headers
    assert "stream" not in sent.json


def test_version_beta_and_a_v1_api_url_are_configurable(upstream: FakeUpstream) -> None:
    complete(
        upstream,
        api_url=f"{upstream.url}/v1",
        anthropic_version="2026-10-21",
        anthropic_beta=["prompt-caching-2024-07-31", "output-128k-2025-02-19"],
    )
    sent = upstream.last()
    assert sent.path == "/v1/messages"
    assert sent.headers["anthropic-version"] == "2026-10-21"
    assert sent.headers["anthropic-beta"] == "prompt-caching-2024-07-31,output-128k-2025-02-19"


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("claude-sonnet-4-5-20250929", 64000),
        ("claude-opus-4-1-20250805", 32000),
        ("claude-3-5-haiku-latest", 8192),
        ("claude-3-haiku-20240307", 4096),
        ("some-future-model", 4096),
    ],
)
def test_max_tokens_defaults_per_model(model: str, expected: int) -> None:
    assert request_body(REQUEST.decode(HELLO), model, stream=False)["max_tokens"] == expected
    with_limit = REQUEST.decode({**HELLO, "max_tokens": 77})
    assert request_body(with_limit, model, stream=False)["max_tokens"] == 77


@pytest.mark.parametrize(
    ("choice", "parallel", "expected"),
    [
        ("auto", None, {"type": "auto"}),
        ("none", None, {"type": "none"}),
        ("required", None, {"type": "any"}),
        ({"type": "function", "function": {"name": "get_time"}}, None, {"type": "tool", "name": "get_time"}),
        ("required", False, {"type": "any", "disable_parallel_tool_use": True}),
        (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
        ("none", False, {"type": "none"}),
        (None, True, None),
    ],
)
def test_tool_choice_mapping(choice: Any, parallel: bool | None, expected: dict[str, Any] | None) -> None:
    body: dict[str, Any] = {**HELLO, "tools": TOOLS}
    if choice is not None:
        body["tool_choice"] = choice
    if parallel is not None:
        body["parallel_tool_calls"] = parallel
    assert request_body(REQUEST.decode(body), "claude", stream=False).get("tool_choice") == expected


@pytest.mark.parametrize(
    ("stop_reason", "finish_reason"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
        ("pause_turn", "pause_turn"),
        ("model_context_window_exceeded", "model_context_window_exceeded"),
    ],
)
def test_every_stop_reason(upstream: FakeUpstream, stop_reason: str, finish_reason: str) -> None:
    upstream.reply(200, fake.message(stop_reason=stop_reason))
    assert complete(upstream)["choices"][0]["finish_reason"] == finish_reason
    upstream.handler = fake.sse(fake.stream_of([fake.text("Hi")], stop_reason))
    batches, error = stream(upstream)
    assert error is None
    assert assembled(flat(batches))["finish"] == [finish_reason]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({**HELLO, "n": 2}, "n"),
        ({**HELLO, "logprobs": True}, "logprobs"),
        ({**HELLO, "response_format": {"type": "json_object"}, "tools": TOOLS}, "response_format"),
        (
            {**HELLO, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format.json_schema",
        ),
        ({"model": "c", "messages": [{"role": "function", "name": "f", "content": "x"}]}, "messages[0].role"),
        (
            {
                "model": "c",
                "messages": [
                    {"role": "user", "content": "x"},
                    {
                        "role": "assistant",
                        "tool_calls": [{"id": "a", "type": "function", "function": {"name": "f", "arguments": "{"}}],
                    },
                ],
            },
            "messages[1].tool_calls[0].function.arguments",
        ),
        (
            {
                "model": "c",
                "messages": [
                    {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}
                ],
            },
            "messages[0].content[0].type",
        ),
        ({**HELLO, "tool_choice": {"type": "function"}, "tools": TOOLS}, "tool_choice"),
    ],
)
def test_what_cannot_map_is_a_400_that_never_reaches_the_upstream(
    upstream: FakeUpstream, body: dict[str, Any], param: str
) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        complete(upstream, body)
    assert caught.value.param == param and caught.value.http_status == 400
    _, error = stream(upstream, body)
    assert isinstance(error, InvalidRequestError) and error.param == param
    assert upstream.received == []


def test_an_invalid_response_is_a_bad_gateway(upstream: FakeUpstream) -> None:
    upstream.reply(200, {"type": "message", "content": "not a list"})
    with pytest.raises(BadGatewayError):
        complete(upstream)


# ---------------------------------------------------------------------------------------- errors


ERROR_CASES = [
    # upstream status, Anthropic error, client status, retried
    (400, fake.error("invalid_request_error", "messages: field required"), 400, False),
    (401, fake.error("authentication_error", "invalid x-api-key"), 401, False),
    (402, fake.error("billing_error", "credit balance too low"), 402, False),
    (403, fake.error("permission_error", "no access to model"), 403, False),
    (404, fake.error("not_found_error", "model: claude-9"), 404, False),
    (413, fake.error("request_too_large", "request exceeds the maximum size"), 413, False),
    (429, fake.error("rate_limit_error", "Number of request tokens has exceeded your rate limit"), 429, True),
    (
        429,
        fake.error(
            "rate_limit_error",
            "You have reached your specified workspace API usage limits",
            error_code="enforced_spend_limit_reached",
        ),
        429,
        False,
    ),
    (500, fake.error("api_error", "Internal server error"), 500, True),
    (504, fake.error("timeout_error", "Request timed out"), 504, True),
    (529, fake.error("overloaded_error", "Overloaded"), 503, True),
]


@pytest.mark.parametrize(("status", "body", "client_status", "retried"), ERROR_CASES, ids=lambda v: str(v)[:20])
def test_error_bodies_become_openai_errors(
    upstream: FakeUpstream, status: int, body: dict[str, Any], client_status: int, retried: bool
) -> None:
    upstream.reply(status, body, headers={"retry-after": "3", "request-id": "req_1"})
    with pytest.raises(UpstreamError) as caught:
        complete(upstream)
    error = caught.value
    assert error.http_status == client_status
    assert error.headers == {"retry-after": "3"}
    expected_code = body["error"].get("details", {}).get("error_code")
    assert orjson.loads(error.body()) == {
        "error": {
            "message": body["error"]["message"],
            "type": body["error"]["type"],
            "param": None,
            "code": expected_code,
        }
    }
    assert error.message == body["error"]["message"] and error.type == body["error"]["type"]
    assert retryable(error) is retried
    # The same before a stream's first event.
    _, streamed = stream(upstream)
    assert isinstance(streamed, UpstreamError) and streamed.http_status == client_status
    assert streamed.body() == error.body()


def test_an_error_body_of_another_shape_passes_through(upstream: FakeUpstream) -> None:
    upstream.reply(502, b"<html>bad gateway</html>")
    with pytest.raises(UpstreamError) as caught:
        complete(upstream)
    assert caught.value.http_status == 502 and caught.value.upstream_body == b"<html>bad gateway</html>"
    assert orjson.loads(caught.value.body())["error"]["type"] == "api_error"


# ---------------------------------------------------------------------------------------- streams


PARALLEL = fake.stream_of(
    [
        fake.text("I'll check both. "),
        fake.tool_use("toolu_01W", "get_weather", {"city": "Paris", "unit": "celsius"}),
        fake.tool_use("toolu_01T", "get_time", {}),
    ],
    "tool_use",
)


def replay(upstream: FakeUpstream, events: list[fake.Event] | bytes, cuts: Any = None) -> list[list[dict[str, Any]]]:
    """The batches for these events, written in one piece or cut at the byte offsets `cuts`."""
    upstream.handler = fake.sse(events, cuts=cuts)
    batches, error = stream(upstream)
    assert error is None, error
    return batches


def _without_ids(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{key: value for key, value in chunk.items() if key != "created"} for chunk in chunks]


def test_parallel_tool_calls_after_a_text_block(upstream: FakeUpstream) -> None:
    chunks = flat(replay(upstream, PARALLEL))
    got = assembled(chunks)
    assert got["roles"] == ["assistant"] and got["content"] == "I'll check both. "
    assert got["tools"] == {
        0: {"id": "toolu_01W", "name": "get_weather", "arguments": '{"city":"Paris","unit":"celsius"}'},
        1: {"id": "toolu_01T", "name": "get_time", "arguments": "{}"},  # no arguments: "{}", never ""
    }
    assert got["finish"] == ["tool_calls"]
    first_tool_chunk = next(c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("tool_calls"))
    assert first_tool_chunk["choices"][0]["delta"]["tool_calls"][0] == {
        "index": 0,
        "id": "toolu_01W",
        "type": "function",
        "function": {"name": "get_weather", "arguments": ""},
    }
    # The stream's last chunk is the usage chunk, with no choices, after the finish reason.
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 30
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert all(chunk["id"] == "msg_01FakeFakeFake" and chunk["object"] == "chat.completion.chunk" for chunk in chunks)


def test_events_cut_at_awkward_places_read_the_same(upstream: FakeUpstream) -> None:
    events = fake.stream_of(
        [fake.text("Grüße, 世界 🌍!"), fake.tool_use("toolu_1", "get_weather", {"city": "Zürich"})], piece=100
    )
    payload = fake.encode(events)
    expected = _without_ids(flat(replay(upstream, events)))
    awkward = [
        payload.index(b"event:") + 3,  # inside a field name
        payload.index(b"\n\n") + 1,  # between the two newlines that end an event
        payload.index(b"data: ") + 5,  # between "data:" and its space
        payload.index("Grüße".encode()) + 3,  # inside a two-byte UTF-8 character
        payload.index("🌍".encode()) + 2,  # inside a four-byte one
        payload.index(b"input_json_delta") + 4,
        payload.index(b'"partial_json":"') + 10,
        len(payload) - 1,  # the final blank line's last newline alone
    ]
    batches = replay(upstream, payload, awkward)
    assert len(batches) > 1  # the cuts reached the provider as separate reads
    assert _without_ids(flat(batches)) == expected


@pytest.mark.parametrize("size", [5, 13, 64])
def test_events_cut_into_reads_of_any_size(upstream: FakeUpstream, size: int) -> None:
    payload = fake.encode(PARALLEL)
    batches = replay(upstream, payload, range(0, len(payload), size))
    assert _without_ids(flat(batches)) == _without_ids(flat(replay(upstream, PARALLEL)))


def test_several_events_in_one_read_come_as_one_batch(upstream: FakeUpstream) -> None:
    batches = replay(upstream, PARALLEL)
    assert len(batches) == 1 and len(batches[0]) > 10


def test_thinking_becomes_reasoning_content_and_whole_blocks_to_send_back(upstream: FakeUpstream) -> None:
    redacted = {"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3pzix"}
    events = fake.stream_of([fake.thinking("Let me add 2 and 2.", "EqQBCkYIBRgCKkD"), redacted, fake.text("4")])
    chunks = flat(replay(upstream, events))
    got = assembled(chunks)
    assert got["reasoning"] == "Let me add 2 and 2." and got["content"] == "4"
    assert got["finish"] == ["stop"]
    blocks = [
        block for chunk in chunks for choice in chunk["choices"] for block in choice["delta"].get("thinking_blocks", [])
    ]
    assert blocks == [
        {"type": "thinking", "thinking": "Let me add 2 and 2.", "signature": "EqQBCkYIBRgCKkD"},
        redacted,
    ]
    # What came back goes back: the next turn replays the blocks first, signatures and all.
    turn = {"role": "assistant", "content": got["content"], "thinking_blocks": blocks}
    body = request_body(REQUEST.decode({"model": "c", "messages": [*HELLO["messages"], turn]}), "c", stream=False)
    assert body["messages"][1]["content"] == [*blocks, {"type": "text", "text": "4"}]


def test_cache_usage_arriving_only_in_message_delta_is_counted_once(upstream: FakeUpstream) -> None:
    events = fake.stream_of(
        [fake.text("ok")],
        start_usage={"input_tokens": 5, "output_tokens": 1},
        delta_usage={
            "input_tokens": 5,
            "cache_creation_input_tokens": 1000,
            "cache_read_input_tokens": 3000,
            "output_tokens": 20,
        },
    )
    usage = assembled(flat(replay(upstream, events)))["usage"]
    assert usage["prompt_tokens"] == 4005 and usage["completion_tokens"] == 20 and usage["total_tokens"] == 4025
    assert usage["prompt_tokens_details"] == {"cached_tokens": 3000}


def test_usage_from_message_start_is_merged_with_message_delta(upstream: FakeUpstream) -> None:
    events = fake.stream_of(
        [fake.text("ok")],
        start_usage={
            "input_tokens": 50,
            "cache_creation_input_tokens": 7,
            "cache_read_input_tokens": 100,
            "output_tokens": 1,
        },
        delta_usage={"output_tokens": 12},
    )
    usage = assembled(flat(replay(upstream, events)))["usage"]
    assert usage["prompt_tokens"] == 157 and usage["completion_tokens"] == 12 and usage["total_tokens"] == 169
    assert usage["prompt_tokens_details"] == {"cached_tokens": 100}


def test_ping_and_unknown_events_are_ignored(upstream: FakeUpstream) -> None:
    events = fake.stream_of([fake.text("Hi")])
    noisy = [
        *events[:2],
        ("ping", {"type": "ping"}),
        ("some_future_event", {"type": "some_future_event", "x": 1}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "citations_delta"}}),
        *events[2:-1],
        ("ping", {"type": "ping"}),
        events[-1],
    ]
    assert _without_ids(flat(replay(upstream, noisy))) == _without_ids(flat(replay(upstream, events)))


def test_an_error_event_after_the_200_ends_the_stream_with_the_error(upstream: FakeUpstream) -> None:
    events = fake.stream_of([fake.text("Hello there, this is long")])[:5]
    events.append(("error", fake.error("overloaded_error", "Overloaded")))
    upstream.handler = fake.sse(events, cuts=[len(fake.encode(events[:3]))])
    batches, error = stream(upstream)
    assert assembled(flat(batches))["content"] == "Hello th"  # what came before the error reached the client
    assert isinstance(error, UpstreamError) and error.http_status == 503
    assert orjson.loads(error.body())["error"] == {
        "message": "Overloaded",
        "type": "overloaded_error",
        "param": None,
        "code": None,
    }


def test_a_stream_that_ends_before_message_stop_is_a_bad_gateway(upstream: FakeUpstream) -> None:
    upstream.handler = fake.sse(fake.stream_of([fake.text("Hi")])[:-2])
    batches, error = stream(upstream)
    assert isinstance(error, BadGatewayError)
    assert assembled(flat(batches))["content"] == "Hi"


def test_an_invalid_event_is_a_bad_gateway(upstream: FakeUpstream) -> None:
    upstream.handler = fake.sse(fake.encode(fake.stream_of([fake.text("Hi")])[:2]) + b"event: x\ndata: {oops\n\n")
    _, error = stream(upstream)
    assert isinstance(error, BadGatewayError)


def test_a_json_response_format_streams_as_content(upstream: FakeUpstream) -> None:
    answer = {"city": "Paris", "temperature_c": 18}
    events = fake.stream_of([fake.tool_use("toolu_01J", "json_response", answer)], "tool_use")
    upstream.handler = fake.sse(events)
    schema = {"name": "weather", "schema": {"type": "object"}}
    body = {**HELLO, "response_format": {"type": "json_schema", "json_schema": schema}}
    batches, error = stream(upstream, body)
    assert error is None
    got = assembled(flat(batches))
    assert orjson.loads(got["content"]) == answer and got["tools"] == {} and got["finish"] == ["stop"]
    sent = upstream.last().json
    assert sent["tool_choice"] == {"type": "tool", "name": "json_response"}
    assert [tool["name"] for tool in sent["tools"]] == ["json_response"]
