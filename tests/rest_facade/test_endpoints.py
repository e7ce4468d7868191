"""The REST endpoints with real clients (stdlib HTTP, curl, gRPC stubs) against both process modes."""

from __future__ import annotations

import re
import shutil
import subprocess
from typing import Any

import grpc
import orjson
import pytest

from gateway.jsonpb import MessageCodec
from llm_gateway.v1 import chat_pb2, chat_pb2_grpc
from tests.fakes.upstream import FakeUpstream, chunks, completion

from .conftest import CLIENT_KEY, OPENAI_KEY, UPSTREAM_MODEL, Stack
from .rest import call, open_request, post, same_json, sse_events, sse_json

REQUEST = MessageCodec.for_type(chat_pb2.CreateChatCompletionRequest)
COMPLETION = MessageCodec.for_type(chat_pb2.ChatCompletion)
CHUNK = MessageCodec.for_type(chat_pb2.ChatCompletionChunk)
MODELS = MessageCodec.for_type(chat_pb2.ListModelsResponse)

HELLO = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
HEX_ID = re.compile(r"[0-9a-f]{32}")


def test_unary_completion(stack: Stack, fake: FakeUpstream) -> None:
    reply = post(stack.base_url, HELLO)
    assert reply.status == 200
    assert reply.headers["content-type"] == "application/json"
    assert reply.json == completion()
    assert fake.last().path == "/v1/chat/completions"


def test_stream_is_openai_sse(stack: Stack, fake: FakeUpstream) -> None:
    events = chunks()
    fake.stream(events)
    reply = post(stack.base_url, {**HELLO, "stream": True})
    assert reply.status == 200
    assert reply.headers["content-type"] == "text/event-stream"
    assert reply.headers["cache-control"] == "no-cache"
    # No include_usage from the client: the service drops the usage it always asks the upstream for.
    expected = [{k: v for k, v in e.items() if k != "usage"} for e in events if e["choices"]]
    assert sse_json(reply.body) == expected


def test_responses_say_what_answered(stack: Stack, fake: FakeUpstream) -> None:
    answered = {
        "x-llm-gateway-model": "gpt-4o",
        "x-llm-gateway-deployment": f"openai/{UPSTREAM_MODEL}",
        "x-llm-gateway-attempts": "1",
    }
    reply = post(stack.base_url, HELLO)
    assert {k: reply.headers.get(k) for k in answered} == answered
    fake.stream(chunks())
    reply = post(stack.base_url, {**HELLO, "stream": True})
    assert {k: reply.headers.get(k) for k in answered} == answered


def test_stream_chunks_are_flushed_as_they_arrive(stack: Stack, fake: FakeUpstream) -> None:
    """The upstream sends two chunks and then holds the connection: both reach the client before any end."""
    events = chunks()[:2]
    fake.stream(events, done=False, hold=True)
    with open_request(stack.base_url, {**HELLO, "stream": True, "stream_options": {"include_usage": True}}) as conn:
        response = conn.getresponse()
        assert response.status == 200
        for event in events:
            line = response.readline()
            assert line.startswith(b"data: ") and line.endswith(b"\n")
            same_json(event, orjson.loads(line[6:]))
            assert response.readline() == b"\n"
    assert fake.wait_disconnected()


def test_list_models(stack: Stack) -> None:
    reply = call(stack.base_url, "GET", "/v1/models")
    assert reply.status == 200
    body = reply.json
    assert body["object"] == "list"
    owners = {m["id"]: m["owned_by"] for m in body["data"]}
    assert owners == {"gpt-4o": "openai", "gpt-4o-mini": "openai", "slow": "slow", "broken": "down", "dummy": "dummy"}
    assert all(m["object"] == "model" and type(m["created"]) is int for m in body["data"])


def test_list_models_ignores_unknown_query_parameters(stack: Stack) -> None:
    reply = call(stack.base_url, "GET", "/v1/models?limit=5&after=x")
    assert reply.status == 200 and reply.json["object"] == "list"


def test_health_and_readiness(stack: Stack) -> None:
    health = call(stack.base_url, "GET", "/healthz")
    assert (health.status, health.json) == (200, {"status": "ok"})
    ready = call(stack.base_url, "GET", "/readyz")
    assert (ready.status, ready.json) == (200, {"status": "ready"})


def test_request_id_is_echoed_or_generated(stack: Stack, fake: FakeUpstream) -> None:
    given = post(stack.base_url, HELLO, headers={"x-request-id": "req-abc-123"})
    assert given.headers["x-request-id"] == "req-abc-123"
    made = post(stack.base_url, HELLO)
    assert HEX_ID.fullmatch(made.headers["x-request-id"])
    insane = post(stack.base_url, HELLO, headers={"x-request-id": "x" * 500})
    assert HEX_ID.fullmatch(insane.headers["x-request-id"])
    assert insane.headers["x-request-id"] != made.headers["x-request-id"]
    fake.stream(chunks())
    streamed = post(stack.base_url, {**HELLO, "stream": True}, headers={"x-request-id": "req-stream-1"})
    assert streamed.headers["x-request-id"] == "req-stream-1"
    failed = post(stack.base_url, b"{", headers={"x-request-id": "req-bad-1"})
    assert (failed.status, failed.headers["x-request-id"]) == (400, "req-bad-1")
    unknown = call(stack.base_url, "GET", "/nope", headers={"x-request-id": "req-404"})
    assert (unknown.status, unknown.headers["x-request-id"]) == (404, "req-404")


def test_request_id_reaches_the_service_log(stack: Stack) -> None:
    post(stack.base_url, HELLO, headers={"x-request-id": "req-log-7"})
    line = stack.grpc.wait_log(lambda entry: entry.get("request_id") == "req-log-7")
    assert line["msg"] == "chat completion" and line["status"] == 200


def test_trace_context_travels_and_authorization_does_not(stack: Stack, fake: FakeUpstream) -> None:
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    headers = {"traceparent": traceparent, "tracestate": "congo=t61rcWkgMzE", "authorization": f"Bearer {CLIENT_KEY}"}
    assert post(stack.base_url, HELLO, headers=headers).status == 200
    fake.stream(chunks())
    assert post(stack.base_url, {**HELLO, "stream": True}, headers=headers).status == 200
    for sent in fake.received:
        upstream_headers = {k.lower(): v for k, v in sent.headers.items()}
        assert upstream_headers["traceparent"] == traceparent
        assert upstream_headers["tracestate"] == "congo=t61rcWkgMzE"
        assert upstream_headers["authorization"] == f"Bearer {OPENAI_KEY}"  # the provider's key, not the client's
        assert CLIENT_KEY not in repr(sent.headers) and CLIENT_KEY.encode() not in sent.body
    assert CLIENT_KEY not in stack.rest.log_text() + stack.grpc.log_text()


@pytest.mark.parametrize("header", [("x-request-timeout", "0.5"), ("grpc-timeout", "500m")])
def test_client_timeout_header_is_the_deadline(stack: Stack, fake: FakeUpstream, header: tuple[str, str]) -> None:
    fake.hang()
    reply = post(stack.base_url, HELLO, headers=dict([header]))
    assert reply.status == 504
    assert reply.error["type"] == "timeout"
    assert fake.wait_disconnected()


def test_client_timeout_header_bounds_a_stream(stack: Stack, fake: FakeUpstream) -> None:
    fake.stream(chunks()[:2], done=False, hold=True)
    reply = post(stack.base_url, {**HELLO, "stream": True}, headers={"x-request-timeout": "1"})
    assert reply.status == 200
    events = sse_events(reply.body)
    assert events[-1] == b"[DONE]"
    assert orjson.loads(events[-2])["error"]["type"] == "timeout"
    assert fake.wait_disconnected()


def test_client_gone_while_waiting_closes_upstream(stack: Stack, fake: FakeUpstream) -> None:
    fake.hang()
    with open_request(stack.base_url, HELLO):
        fake.last()  # the upstream has the request; the client now goes away
    assert fake.wait_disconnected()


def test_client_gone_mid_stream_closes_upstream(stack: Stack, fake: FakeUpstream) -> None:
    fake.stream(chunks()[:2], done=False, hold=True)
    with open_request(stack.base_url, {**HELLO, "stream": True}) as conn:
        response = conn.getresponse()
        assert response.status == 200
        assert response.readline().startswith(b"data: {")
    assert fake.wait_disconnected()
    assert stack.alive()


def test_curl_streams(stack: Stack, fake: FakeUpstream) -> None:
    curl = shutil.which("curl")
    assert curl, "curl is required (installed by .ci/run)"
    events = chunks()
    fake.stream(events)
    body = orjson.dumps({**HELLO, "stream": True, "stream_options": {"include_usage": True}})
    done = subprocess.run(
        [
            curl,
            "-sN",
            "--fail-with-body",
            "-H",
            "content-type: application/json",
            "--data-binary",
            "@-",
            f"{stack.base_url}/v1/chat/completions",
        ],
        input=body,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    got = sse_json(done.stdout)  # checks the exact `data: ...\n\n` framing and the final [DONE]
    assert len(got) == len(events)
    for event, chunk in zip(events, got, strict=True):
        same_json(event, chunk)


def test_grpc_and_rest_see_the_same_result(stack: Stack, fake: FakeUpstream) -> None:
    request: dict[str, Any] = {
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "temperature": 0.5,
        "vendor": {"x": 1},
    }
    answer = completion(model=UPSTREAM_MODEL, provider_extra={"n": 2**62})
    fake.reply(200, answer)
    events = chunks(model=UPSTREAM_MODEL)
    with grpc.insecure_channel(stack.grpc_address) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        via_grpc = COMPLETION.encode(stub.CreateChatCompletion(REQUEST.decode(request), timeout=10))
        grpc_sent = fake.last().json
        via_rest = post(stack.base_url, request).json
        rest_sent = fake.last().json
        fake.stream(events)
        stream_request = REQUEST.decode({**request, "stream": True})
        grpc_chunks = [CHUNK.encode(c) for c in stub.StreamChatCompletion(stream_request, timeout=10)]
        rest_chunks = sse_json(post(stack.base_url, {**request, "stream": True}).body)
        grpc_models = MODELS.encode(stub.ListModels(chat_pb2.ListModelsRequest(), timeout=10))
    rest_models = call(stack.base_url, "GET", "/v1/models").json
    same_json(orjson.loads(orjson.dumps(via_grpc)), via_rest)
    same_json(answer, via_rest)
    same_json(grpc_sent, rest_sent)
    assert orjson.loads(orjson.dumps(grpc_chunks)) == rest_chunks
    assert len(rest_chunks) == len([e for e in events if e["choices"]])
    assert orjson.loads(orjson.dumps(grpc_models)) == rest_models


def test_nothing_unexpected_was_logged(stack: Stack) -> None:
    """Runs last in this module: disconnects, deadlines and bad requests above are all routine."""
    for process in stack.processes:
        assert [line for line in process.log_lines() if line["level"] == "ERROR"] == []
