"""Every failure is OpenAI-shaped, has the right status, and leaves the process running (both modes)."""

from __future__ import annotations

import socket
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest

from tests.fakes.upstream import FakeUpstream, chunks
from tests.harness import GatewayProcess, free_port

from .conftest import MAX_BODY, Stack, gateway_config
from .rest import Reply, call, post, sse_events

HELLO = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}


def assert_error(
    reply: Reply, status: int, error_type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    assert reply.status == status, reply.body
    assert reply.headers["content-type"] == "application/json"
    assert reply.headers["x-request-id"]
    error = reply.error
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == error_type
    assert error["param"] == param
    assert error["code"] == code
    return error


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        pytest.param(b"", None, "empty", id="empty-body"),
        pytest.param(b'{"model": ', None, "parse", id="malformed-json"),
        pytest.param(b"   ", None, "parse", id="whitespace-body"),
        pytest.param(b"[1, 2]", None, "object", id="array-body"),
        pytest.param(b'"text"', None, "object", id="string-body"),
        pytest.param(b"42", None, "object", id="number-body"),
        pytest.param(
            b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
            None,
            "UTF-8",
            id="invalid-utf8",
        ),
        pytest.param({"model": "gpt-4o", "messages": "hi"}, "messages", "expected an array", id="messages-string"),
        pytest.param({"model": 4, "messages": []}, "model", "expected a string", id="model-number"),
        pytest.param(
            {"model": "gpt-4o", "messages": [{"role": "user", "content": 5}]},
            "messages[0].content",
            "",
            id="nested-type",
        ),
        pytest.param({**HELLO, "temperature": "hot"}, "temperature", "a number", id="temperature-string"),
        pytest.param({**HELLO, "n": 1.5}, "n", "an integer", id="n-float"),
        pytest.param({**HELLO, "n": 2**40}, "n", "out of range", id="n-out-of-range"),
        pytest.param({**HELLO, "stream": "yes"}, "stream", "a boolean", id="stream-string"),
        pytest.param({"messages": [{"role": "user", "content": "hi"}]}, "model", "model", id="missing-model"),
        pytest.param(
            {"model": None, "messages": [{"role": "user", "content": "hi"}]}, "model", "model", id="null-model"
        ),
        pytest.param({"model": "gpt-4o"}, "messages", "messages", id="missing-messages"),
        pytest.param({"model": "gpt-4o", "messages": []}, "messages", "messages", id="empty-messages"),
    ],
)
def test_bad_request_body_is_400(stack: Stack, fake: FakeUpstream, body: Any, param: str | None, says: str) -> None:
    for stream in (False, True):
        if stream and isinstance(body, dict):
            body = {**body, "stream": True} if "stream" not in body else body
        error = assert_error(post(stack.base_url, body), 400, "invalid_request_error", param)
        assert says in error["message"]
    assert not fake.received
    assert stack.alive()


def test_unknown_model_is_404_model_not_found(stack: Stack) -> None:
    for body in ({**HELLO, "model": "nope"}, {**HELLO, "model": "nope", "stream": True}):
        error = assert_error(post(stack.base_url, body), 404, "invalid_request_error", "model", "model_not_found")
        assert "nope" in error["message"]


def test_body_over_the_limit_is_413(stack: Stack, fake: FakeUpstream) -> None:
    big = {**HELLO, "messages": [{"role": "user", "content": "x" * (MAX_BODY + 1)}]}
    error = assert_error(post(stack.base_url, big), 413, "invalid_request_error")
    assert str(MAX_BODY) in error["message"]
    assert not fake.received
    just_under = {**HELLO, "messages": [{"role": "user", "content": "x" * (MAX_BODY - 200)}]}
    assert post(stack.base_url, just_under).status == 200


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("GET", "/v1/chat/completions", "POST"),
        ("PUT", "/v1/chat/completions", "POST"),
        ("DELETE", "/v1/models", "GET"),
        ("POST", "/v1/models", "GET"),
        ("POST", "/healthz", "GET"),
    ],
)
def test_unsupported_method_is_405(stack: Stack, method: str, path: str, allow: str) -> None:
    reply = call(stack.base_url, method, path, body=b"{}")
    assert_error(reply, 405, "invalid_request_error", code="method_not_allowed")
    assert reply.headers["allow"] == allow


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/"), ("POST", "/v1/completions"), ("GET", "/v1/models/x/y"), ("POST", "/v2/chat/completions")],
)
def test_unknown_path_is_404(stack: Stack, method: str, path: str) -> None:
    error = assert_error(call(stack.base_url, method, path, body=b"{}"), 404, "invalid_request_error")
    assert path in error["message"]


def test_bad_timeout_header_is_400(stack: Stack) -> None:
    for header in ({"x-request-timeout": "soon"}, {"x-request-timeout": "-1"}, {"grpc-timeout": "5 parsecs"}):
        error = assert_error(post(stack.base_url, HELLO, headers=header), 400, "invalid_request_error")
        assert next(iter(header)) in error["message"]


def test_malformed_http_gets_a_json_400(stack: Stack) -> None:
    parts = urlsplit(stack.base_url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), data
    assert orjson.loads(body)["error"]["type"] == "invalid_request_error"
    assert stack.alive()


def test_upstream_refusing_connections_is_503(stack: Stack) -> None:
    for body in ({**HELLO, "model": "broken"}, {**HELLO, "model": "broken", "stream": True}):
        assert_error(post(stack.base_url, body), 503, "api_error", code="upstream_unavailable")


def test_upstream_sending_garbage_is_502(stack: Stack, fake: FakeUpstream) -> None:
    fake.reply(200, b"<html>oops</html>")
    assert_error(post(stack.base_url, HELLO), 502, "api_error", code="bad_upstream_response")


def test_upstream_silence_is_504(stack: Stack, fake: FakeUpstream) -> None:
    fake.hang()  # the "slow" provider's read_timeout is 1 s
    assert_error(post(stack.base_url, {**HELLO, "model": "slow"}), 504, "timeout", code="upstream_timeout")
    assert fake.wait_disconnected()


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 422, 429, 500, 503])
def test_upstream_status_body_and_rate_limit_headers_pass_through(
    stack: Stack, fake: FakeUpstream, status: int
) -> None:
    body = {"error": {"message": f"upstream says {status}", "type": "some_type", "param": "p", "code": f"c{status}"}}
    headers = {"retry-after": "7", "x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-tokens": "6m0s"}
    fake.reply(status, body, headers=headers)
    for request in (HELLO, {**HELLO, "stream": True}):
        reply = post(stack.base_url, request)
        assert reply.status == status
        assert reply.json == body
        for key, value in headers.items():
            assert reply.headers[key] == value


def test_upstream_non_json_error_body_becomes_openai_shaped(stack: Stack, fake: FakeUpstream) -> None:
    fake.reply(500, b"Internal Server Error")
    reply = post(stack.base_url, HELLO)
    assert reply.status == 500
    assert "500" in reply.error["message"]


def test_failure_after_the_stream_started_is_an_error_event_then_done(stack: Stack, fake: FakeUpstream) -> None:
    events = chunks()
    upstream_error = {
        "error": {"message": "overloaded mid-stream", "type": "server_error", "param": None, "code": None}
    }
    fake.stream([events[0], events[1], upstream_error], done=False)
    reply = post(stack.base_url, {**HELLO, "stream": True})
    assert reply.status == 200
    data = sse_events(reply.body)
    assert data[-1] == b"[DONE]"
    assert [orjson.loads(d)["choices"][0]["delta"] for d in data[:2]] == [
        events[0]["choices"][0]["delta"],
        events[1]["choices"][0]["delta"],
    ]
    assert orjson.loads(data[2]) == upstream_error
    assert len(data) == 4


def test_upstream_cut_mid_stream_is_an_error_event_not_a_silent_200(stack: Stack, fake: FakeUpstream) -> None:
    fake.stream(chunks()[:2], done=False)  # the connection ends without [DONE]
    reply = post(stack.base_url, {**HELLO, "stream": True})
    assert reply.status == 200
    data = sse_events(reply.body)
    assert data[-1] == b"[DONE]"
    error = orjson.loads(data[-2])["error"]
    assert error["type"] == "api_error" and error["message"]


def test_process_survives_everything(stack: Stack) -> None:
    assert stack.alive()
    assert call(stack.base_url, "GET", "/healthz").status == 200
    assert post(stack.base_url, {**HELLO, "model": "dummy"}).status == 200


def test_facade_without_its_grpc_service(fake: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> None:
    """A facade-only process (GRPC_TARGET from the environment) whose gRPC service is down: alive, not
    ready, and 503 for calls."""
    target = f"127.0.0.1:{free_port()}"
    facade = GatewayProcess(gateway_config(fake), tmp_path_factory.mktemp("orphan"), env={"GRPC_TARGET": target})
    facade.start(wait_grpc=False)
    try:
        assert call(facade.base_url, "GET", "/healthz").status == 200
        assert_error(call(facade.base_url, "GET", "/readyz"), 503, "api_error", code="upstream_unavailable")
        assert post(facade.base_url, HELLO).status == 503
        assert post(facade.base_url, {**HELLO, "stream": True}).status == 503
        assert call(facade.base_url, "GET", "/v1/models").status == 503
        assert facade.process is not None and facade.process.poll() is None
        assert facade.wait_log(lambda e: e["msg"] == "grpc call failed")["code"] == "UNAVAILABLE"
    finally:
        facade.stop()
