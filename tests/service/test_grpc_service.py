"""The gRPC ChatService as internal callers use it: generated stubs against a real gateway process,
with fake OpenAI, Gemini and Ollama upstreams on loopback."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import orjson
import pytest
from google.rpc import status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from gateway.config import parse
from gateway.errors import STATUS_DETAILS_KEY
from gateway.jsonpb import MessageCodec
from llm_gateway.v1 import chat_pb2, chat_pb2_grpc
from tests.fakes.upstream import FakeUpstream, chunks, completion
from tests.harness import GatewayProcess, free_port

REQUEST = MessageCodec.for_type(chat_pb2.CreateChatCompletionRequest)
COMPLETION = MessageCodec.for_type(chat_pb2.ChatCompletion)
CHUNK = MessageCodec.for_type(chat_pb2.ChatCompletionChunk)

OPENAI_KEY = "sk-test-openai-0123456789"
GEMINI_KEY = "gm-test-gemini-9876543210"


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstream]:
    server = FakeUpstream().start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def reset(fake: FakeUpstream) -> None:
    fake.received.clear()
    fake.disconnected.clear()
    fake.reply(200, completion())


@pytest.fixture(scope="module")
def gateway(fake: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    config = {
        "logging": {"level": "DEBUG"},
        # Errors map one to one here; retries, fallbacks and cooldowns have tests of their own.
        "routing": {"retries": 0, "cooldown_failures": 1000},
        "providers": {
            "openai": {
                "api_key": OPENAI_KEY,
                "api_url": f"{fake.url}/v1",
                "is_openai_compatible": True,
                "read_timeout": 2,
            },
            "gemini": {"api_key": "${TEST_GEMINI_KEY}", "api_url": fake.url, "is_openai_compatible": True},
            "ollama": {"api_url": fake.url, "is_openai_compatible": True},
            "vllm": {"type": "openai", "api_url": f"{fake.url}/vllm/v1"},
            "down": {"type": "openai", "api_url": f"http://127.0.0.1:{free_port()}/v1"},
        },
        "models": {
            "gpt-4o": "openai",
            "gemini-2.0-flash": "gemini",
            "llama3.2": "ollama",
            "local": {"provider": "vllm", "model": "meta-llama/Llama-3-8B"},
            "broken": "down",
        },
    }
    process = GatewayProcess(
        config, tmp_path_factory.mktemp("grpc"), env={"TEST_GEMINI_KEY": GEMINI_KEY}, args=("--grpc-only",)
    )
    process.start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def stub(gateway: GatewayProcess) -> Iterator[chat_pb2_grpc.ChatServiceStub]:
    with gateway.channel() as channel:
        yield chat_pb2_grpc.ChatServiceStub(channel)


FULL_REQUEST: dict[str, Any] = {
    "model": "gpt-4o",
    "messages": [
        {"role": "developer", "content": "You are terse."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in this image?"},
                {"type": "image_url", "image_url": {"url": "https://x/y.png", "detail": "low"}},
            ],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "lookup", "arguments": '{"q": "cat", "n": 3}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "a cat"},
    ],
    "temperature": 0,
    "top_p": 0.5,
    "n": 2,
    "stop": ["END", "STOP"],
    "seed": 9007199254740993,
    "logit_bias": {"50256": -100, "15496": 5},
    "tools": [
        {
            "type": "function",
            "function": {
                "name": "lookup",
                "description": "Search.",
                "strict": True,
                "parameters": {
                    "type": "object",
                    "properties": {"q": {"type": "string"}, "n": {"type": "integer", "maximum": 10}},
                    "required": ["q", "n"],
                    "additionalProperties": False,
                },
            },
        }
    ],
    "tool_choice": {"type": "function", "function": {"name": "lookup"}},
    "response_format": {
        "type": "json_schema",
        "json_schema": {"name": "answer", "strict": True, "schema": {"type": "object"}},
    },
    "metadata": {"team": "search"},
    "reasoning_effort": "low",
    "vendor_extension": {"nested": [1, 2.5, None, True]},
}


def _status_detail(error: grpc.RpcError) -> chat_pb2.ErrorDetail:
    for key, value in error.trailing_metadata() or ():  # type: ignore[attr-defined]
        if key == STATUS_DETAILS_KEY:
            status = status_pb2.Status.FromString(value)
            detail = chat_pb2.ErrorDetail()
            assert status.details[0].Unpack(detail)
            return detail
    raise AssertionError("no status details")


def test_unary_request_reaches_upstream_faithfully(stub: Any, fake: FakeUpstream) -> None:
    reply = stub.CreateChatCompletion(REQUEST.decode(FULL_REQUEST), timeout=10)
    sent = fake.last()
    assert sent.method == "POST"
    assert sent.path == "/v1/chat/completions"
    assert sent.headers["Authorization"] == f"Bearer {OPENAI_KEY}"
    assert sent.json == FULL_REQUEST  # nothing lost, ints intact, unknown keys kept
    assert sent.json["seed"] == 9007199254740993
    assert type(sent.json["temperature"]) in (int, float) and sent.json["temperature"] == 0
    assert reply.choices[0].message.content == "Hello!"
    assert reply.usage.total_tokens == 18


def test_unary_response_keeps_unknown_fields_and_integers(stub: Any, fake: FakeUpstream) -> None:
    body = completion(provider_extra={"latency": 12, "big": 2**62}, created=1700000001)
    body["choices"][0]["message"]["reasoning_content"] = "thinking..."
    body["usage"]["queue_time"] = 3
    fake.reply(200, body)
    reply = stub.CreateChatCompletion(
        chat_pb2.CreateChatCompletionRequest(
            model="gpt-4o", messages=[chat_pb2.ChatMessage(role="user", content_text="hi")]
        ),
        timeout=10,
    )
    assert orjson.loads(COMPLETION.dumps(reply)) == body
    assert reply.extra["provider_extra"] == '{"latency":12,"big":4611686018427387904}'


@pytest.mark.parametrize(
    ("model", "path", "auth", "upstream_model"),
    [
        ("gemini-2.0-flash", "/v1beta/openai/chat/completions", f"Bearer {GEMINI_KEY}", "gemini-2.0-flash"),
        ("llama3.2", "/v1/chat/completions", None, "llama3.2"),
        ("local", "/vllm/v1/chat/completions", None, "meta-llama/Llama-3-8B"),
    ],
)
def test_providers_by_configuration(
    stub: Any, fake: FakeUpstream, model: str, path: str, auth: str | None, upstream_model: str
) -> None:
    request = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    stub.CreateChatCompletion(REQUEST.decode(request), timeout=10)
    sent = fake.last()
    assert sent.path == path
    assert sent.headers.get("Authorization") == auth
    assert sent.json == {**request, "model": upstream_model}


def test_stream_mirrors_upstream_and_strips_unrequested_usage(stub: Any, fake: FakeUpstream) -> None:
    events = chunks()
    fake.stream(events)
    request = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    got = [orjson.loads(CHUNK.dumps(c)) for c in stub.StreamChatCompletion(REQUEST.decode(request), timeout=10)]
    sent = fake.last().json
    assert sent["stream_options"] == {"include_usage": True}  # usage is always captured
    expected = [{k: v for k, v in e.items() if k != "usage"} for e in events if e["choices"]]
    assert got == expected


def test_stream_keeps_usage_for_a_client_that_asked(stub: Any, fake: FakeUpstream) -> None:
    events = chunks()
    fake.stream(events)
    request = {
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    got = [orjson.loads(CHUNK.dumps(c)) for c in stub.StreamChatCompletion(REQUEST.decode(request), timeout=10)]
    assert got == events
    assert fake.last().json == {**request}


def _request(stream: bool = True, **extra: Any) -> chat_pb2.CreateChatCompletionRequest:
    return REQUEST.decode(
        {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "stream": stream, **extra}
    )


def _batched(stub: Any, request: chat_pb2.CreateChatCompletionRequest) -> tuple[list[list[dict[str, Any]]], Any]:
    call = stub.StreamChatCompletionBatches(request, timeout=10)
    batches = [[orjson.loads(CHUNK.dumps(c)) for c in batch.chunks] for batch in call]
    return batches, dict(call.initial_metadata())


def test_batched_stream_sends_what_arrived_together_as_one_message(stub: Any, fake: FakeUpstream) -> None:
    events = chunks()
    fake.stream(events, together=True)
    plain = [orjson.loads(CHUNK.dumps(c)) for c in stub.StreamChatCompletion(_request(), timeout=10)]
    fake.stream(events, together=True)
    batches, metadata = _batched(stub, _request())
    assert batches == [plain]  # one upstream read, one message; the same chunks, usage stripped alike
    assert plain == [{k: v for k, v in e.items() if k != "usage"} for e in events if e["choices"]]
    assert (metadata["x-llm-gateway-model"], metadata["x-llm-gateway-attempts"]) == ("gpt-4o", "1")
    fake.stream(events, together=True)
    assert _batched(stub, _request(stream_options={"include_usage": True}))[0] == [events]


def test_batched_stream_sends_a_chunk_that_arrives_alone_at_once(stub: Any, fake: FakeUpstream) -> None:
    events = chunks()
    fake.stream(events, delay=0.05)  # every event in a read of its own
    batches, _ = _batched(stub, _request(stream_options={"include_usage": True}))
    assert batches == [[event] for event in events]


def test_batched_stream_errors_are_the_plain_streams(stub: Any, fake: FakeUpstream) -> None:
    for call in (stub.StreamChatCompletion, stub.StreamChatCompletionBatches):
        with pytest.raises(grpc.RpcError) as info:
            list(call(REQUEST.decode({"model": "nope", "messages": [{"role": "user", "content": "x"}]}), timeout=5))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert _status_detail(info.value).code == "model_not_found"


def test_chunks_read_with_a_bad_event_still_arrive_before_the_error(stub: Any, fake: FakeUpstream) -> None:
    error = {"error": {"message": "overloaded", "type": "server_error", "param": None, "code": None}}
    first = chunks()[0]
    for rpc in ("StreamChatCompletion", "StreamChatCompletionBatches"):
        fake.stream([first, error], done=False, together=True)
        received: list[Any] = []
        with pytest.raises(grpc.RpcError) as info:
            for message in getattr(stub, rpc)(_request(), timeout=10):
                received.append(message)
        assert info.value.details() == "overloaded"
        got = received if rpc == "StreamChatCompletion" else [c for batch in received for c in batch.chunks]
        assert [orjson.loads(CHUNK.dumps(c))["choices"] for c in got] == [first["choices"]]


@pytest.mark.parametrize(
    ("status", "code", "error_type"),
    [
        (400, grpc.StatusCode.INVALID_ARGUMENT, "invalid_request_error"),
        (401, grpc.StatusCode.UNAUTHENTICATED, "invalid_request_error"),
        (404, grpc.StatusCode.NOT_FOUND, "invalid_request_error"),
        (429, grpc.StatusCode.RESOURCE_EXHAUSTED, "requests"),
        (500, grpc.StatusCode.INTERNAL, "server_error"),
    ],
)
def test_upstream_errors_carry_status_and_body(
    stub: Any, fake: FakeUpstream, status: int, code: grpc.StatusCode, error_type: str
) -> None:
    body = {
        "error": {"message": f"upstream says {status}", "type": error_type, "param": None, "code": f"code_{status}"}
    }
    fake.reply(status, body, headers={"retry-after": "7"} if status == 429 else None)
    request = REQUEST.decode({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})
    for call in (stub.CreateChatCompletion, lambda r, timeout: list(stub.StreamChatCompletion(r, timeout=timeout))):
        with pytest.raises(grpc.RpcError) as info:
            call(request, timeout=10)
        assert info.value.code() == code
        assert info.value.details() == f"upstream says {status}"
        detail = _status_detail(info.value)
        assert detail.http_status == status
        assert orjson.loads(detail.upstream_body) == body
        assert detail.type == error_type
        if status == 429:
            assert detail.headers["retry-after"] == "7"


def test_unknown_model_is_not_found(stub: Any) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.CreateChatCompletion(
            REQUEST.decode({"model": "nope", "messages": [{"role": "user", "content": "x"}]}), timeout=5
        )
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    detail = _status_detail(info.value)
    assert (detail.http_status, detail.code, detail.param) == (404, "model_not_found", "model")


def test_missing_messages_is_invalid_argument(stub: Any) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.CreateChatCompletion(chat_pb2.CreateChatCompletionRequest(model="gpt-4o"), timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _status_detail(info.value).param == "messages"


def test_refused_connection_is_unavailable(stub: Any) -> None:
    request = REQUEST.decode({"model": "broken", "messages": [{"role": "user", "content": "x"}]})
    with pytest.raises(grpc.RpcError) as info:
        stub.CreateChatCompletion(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert _status_detail(info.value).http_status == 503


def test_upstream_silence_is_deadline_exceeded(stub: Any, fake: FakeUpstream) -> None:
    fake.hang()  # the openai provider's read_timeout is 2 s
    request = REQUEST.decode({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]})
    with pytest.raises(grpc.RpcError) as info:
        stub.CreateChatCompletion(request, timeout=20)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert _status_detail(info.value).http_status == 504
    assert fake.wait_disconnected()


def test_client_deadline_cancels_upstream(stub: Any, fake: FakeUpstream) -> None:
    fake.hang()
    request = REQUEST.decode({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]})
    with pytest.raises(grpc.RpcError) as info:
        stub.CreateChatCompletion(request, timeout=0.5)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert fake.wait_disconnected(5)


def test_client_cancel_mid_stream_closes_upstream(stub: Any, fake: FakeUpstream) -> None:
    fake.stream(chunks()[:2], done=False, hold=True)
    request = REQUEST.decode({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], "stream": True})
    call = stub.StreamChatCompletion(request, timeout=30)
    first = next(call)
    assert first.choices[0].delta.role == "assistant"
    call.cancel()
    assert fake.wait_disconnected(5)


def test_dummy_model_needs_no_upstream(stub: Any, fake: FakeUpstream) -> None:
    request = REQUEST.decode({"model": "dummy", "messages": [{"role": "user", "content": "one two three"}]})
    reply = stub.CreateChatCompletion(request, timeout=5)
    assert reply.usage.prompt_tokens == 3
    assert reply.choices[0].message.content == reply.choices[0].message.content.strip()
    assert reply.usage.completion_tokens == len(reply.choices[0].message.content.split())
    pieces = list(stub.StreamChatCompletion(request, timeout=5))
    assert len(pieces) > 3
    assert "".join(c.choices[0].delta.content for c in pieces if c.choices) == reply.choices[0].message.content
    assert not fake.received


def test_list_models(stub: Any) -> None:
    models = stub.ListModels(chat_pb2.ListModelsRequest(), timeout=5)
    ids = {m.id: m.owned_by for m in models.data}
    assert models.object == "list"
    assert ids["gpt-4o"] == "openai" and ids["dummy"] == "dummy" and ids["local"] == "vllm"


def test_health_and_reflection(gateway: GatewayProcess) -> None:
    with gateway.channel() as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(service="llm_gateway.v1.ChatService"), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for r in responses for s in r.list_services_response.service}
        assert "llm_gateway.v1.ChatService" in names


def test_access_log_and_no_secrets(stub: Any, gateway: GatewayProcess, fake: FakeUpstream) -> None:
    metadata = (("x-request-id", "req-log-1"), ("authorization", "Bearer client-secret-token"))
    stub.CreateChatCompletion(
        REQUEST.decode({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}),
        metadata=metadata,
        timeout=5,
    )
    line = gateway.wait_log(lambda entry: entry.get("request_id") == "req-log-1")
    assert line["level"] == "INFO" and line["msg"] == "chat completion"
    assert (line["model"], line["provider"], line["status"]) == ("gpt-4o", "openai", 200)
    assert (line["prompt_tokens"], line["completion_tokens"], line["total_tokens"]) == (11, 7, 18)
    assert line["latency_ms"] >= 0 and "time" in line
    assert "authorization" not in {
        k.lower() for k in fake.last().headers if fake.last().headers[k].endswith("client-secret-token")
    }
    text = gateway.log_text()
    assert OPENAI_KEY not in text and GEMINI_KEY not in text and "client-secret-token" not in text


def test_concurrent_streams(stub: Any, fake: FakeUpstream) -> None:
    fake.stream(chunks(), delay=0.01)
    request = REQUEST.decode({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], "stream": True})
    results: list[int] = []

    def run() -> None:
        results.append(len(list(stub.StreamChatCompletion(request, timeout=20))))

    threads = [threading.Thread(target=run) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [5] * 8


def test_sigterm_stops_cleanly(tmp_path: Path) -> None:
    process = GatewayProcess(None, tmp_path, args=("--grpc-only",)).start()
    started = time.monotonic()
    assert process.stop() == 0
    assert time.monotonic() - started < 10


def test_stream_that_drops_midway_ends_with_an_error_after_its_chunks(stub: Any, fake: FakeUpstream) -> None:
    fake.stream(chunks()[:2], done=False)  # two events, then the connection closes without [DONE]
    request = REQUEST.decode({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], "stream": True})
    received = []
    with pytest.raises(grpc.RpcError) as info:
        for chunk in stub.StreamChatCompletion(request, timeout=10):
            received.append(chunk)
    assert len(received) == 2
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert _status_detail(info.value).http_status == 502


def test_error_event_inside_a_stream(stub: Any, fake: FakeUpstream) -> None:
    error = {"error": {"message": "overloaded", "type": "server_error", "param": None, "code": None}}
    fake.stream([chunks()[0], error], done=False)
    request = REQUEST.decode({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], "stream": True})
    with pytest.raises(grpc.RpcError) as info:
        list(stub.StreamChatCompletion(request, timeout=10))
    assert info.value.details() == "overloaded"
    assert orjson.loads(_status_detail(info.value).upstream_body) == error


@pytest.mark.parametrize("body", [b"<html>Bad Gateway</html>", b"[1, 2]", b'{"choices": "nope"}'])
def test_invalid_upstream_body_is_bad_gateway(stub: Any, fake: FakeUpstream, body: bytes) -> None:
    fake.reply(200, body)
    request = REQUEST.decode({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]})
    with pytest.raises(grpc.RpcError) as info:
        stub.CreateChatCompletion(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    detail = _status_detail(info.value)
    assert (detail.http_status, detail.code) == (502, "bad_upstream_response")


def test_upstream_html_error_page_gets_an_openai_shaped_error(stub: Any, fake: FakeUpstream) -> None:
    fake.reply(503, b"<html>Service Unavailable</html>")
    request = REQUEST.decode({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]})
    with pytest.raises(grpc.RpcError) as info:
        stub.CreateChatCompletion(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "503" in info.value.details()
    assert _status_detail(info.value).http_status == 503


def test_drained_cancelled_stream_counts_the_final_usage(upstream: FakeUpstream, gateway_factory: Any) -> None:
    upstream.stream(chunks(), delay=0.05)
    config = {
        "server": {"drain_cancelled_streams": True},
        "providers": {"openai": {"api_key": "k", "api_url": f"{upstream.url}/v1"}},
        "models": {"gpt-4o": "openai"},
    }
    gateway = gateway_factory(config, args=("--grpc-only",))
    request = REQUEST.decode({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], "stream": True})
    with gateway.channel() as channel:
        call = chat_pb2_grpc.ChatServiceStub(channel).StreamChatCompletion(
            request, metadata=(("x-request-id", "drained-1"),), timeout=30
        )
        next(call)
        call.cancel()
    line = gateway.wait_log(lambda entry: entry.get("request_id") == "drained-1")
    assert line["status"] == 499
    assert (line["prompt_tokens"], line["completion_tokens"], line["total_tokens"]) == (9, 3, 12)


def test_dummy_latency_is_configurable(gateway_factory: Any) -> None:
    config = {"providers": {"dummy": {"latency_ms": 300}}, "models": {"slow-dummy": "dummy"}}
    gateway = gateway_factory(config, args=("--grpc-only",))
    request = REQUEST.decode({"model": "slow-dummy", "messages": [{"role": "user", "content": "x"}]})
    with gateway.channel() as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        stub.CreateChatCompletion(request, metadata=(("x-request-id", "slow-1"),), timeout=10)
        list(stub.StreamChatCompletion(request, metadata=(("x-request-id", "slow-2"),), timeout=10))
    # The added latency shows in the service's own record of the request. uvloop's timers have millisecond
    # resolution, so each of the stream's nine sleeps may end a fraction of a millisecond early.
    for rid in ("slow-1", "slow-2"):
        assert gateway.wait_log(lambda entry, rid=rid: entry.get("request_id") == rid)["upstream_ms"] >= 295
    assert parse({}, {}).providers["dummy"].latency_ms == 0  # none by default


@pytest.mark.parametrize("n", [0, -1, 129, 2_000_000])
def test_n_is_bounded(stub: Any, n: int) -> None:
    request = REQUEST.decode({"model": "dummy", "messages": [{"role": "user", "content": "x"}], "n": n})
    with pytest.raises(grpc.RpcError) as info:
        stub.CreateChatCompletion(request, timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _status_detail(info.value).param == "n"
