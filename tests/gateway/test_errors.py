"""The error hierarchy: each class's gRPC code, HTTP status and OpenAI type, and the wire round trip."""

from __future__ import annotations

import grpc
import orjson
import pytest

from gateway import errors
from gateway.errors import GatewayError, UpstreamError


@pytest.mark.parametrize(
    ("error_class", "code", "status", "kind"),
    [
        (errors.InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error"),
        (errors.RequestTooLargeError, grpc.StatusCode.INVALID_ARGUMENT, 413, "invalid_request_error"),
        (errors.AuthenticationError, grpc.StatusCode.UNAUTHENTICATED, 401, "authentication_error"),
        (errors.PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED, 403, "permission_error"),
        (errors.NotFoundError, grpc.StatusCode.NOT_FOUND, 404, "invalid_request_error"),
        (errors.ModelNotFoundError, grpc.StatusCode.NOT_FOUND, 404, "invalid_request_error"),
        (errors.MethodNotAllowedError, grpc.StatusCode.UNIMPLEMENTED, 405, "invalid_request_error"),
        (errors.RateLimitError, grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "rate_limit_error"),
        (errors.ClientClosedError, grpc.StatusCode.CANCELLED, 499, "api_error"),
        (errors.InternalError, grpc.StatusCode.INTERNAL, 500, "server_error"),
        (errors.BadGatewayError, grpc.StatusCode.UNAVAILABLE, 502, "api_error"),
        (errors.UpstreamUnavailableError, grpc.StatusCode.UNAVAILABLE, 503, "api_error"),
        (errors.UpstreamTimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED, 504, "timeout"),
    ],
)
def test_each_error_knows_its_mapping(
    error_class: type[GatewayError], code: grpc.StatusCode, status: int, kind: str
) -> None:
    error = error_class("went wrong", param="messages")
    assert (error.grpc_code, error.http_status, error.type) == (code, status, kind)
    body = orjson.loads(error.body())
    assert body == {"error": {"message": "went wrong", "type": kind, "param": "messages", "code": error.code}}
    back = GatewayError.from_grpc(code, "went wrong", error.grpc_trailers())
    assert (back.http_status, back.type, back.param, back.code) == (status, kind, "messages", error.code)


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (400, grpc.StatusCode.INVALID_ARGUMENT),
        (401, grpc.StatusCode.UNAUTHENTICATED),
        (403, grpc.StatusCode.PERMISSION_DENIED),
        (404, grpc.StatusCode.NOT_FOUND),
        (408, grpc.StatusCode.DEADLINE_EXCEEDED),
        (409, grpc.StatusCode.ABORTED),
        (418, grpc.StatusCode.FAILED_PRECONDITION),
        (422, grpc.StatusCode.INVALID_ARGUMENT),
        (429, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (500, grpc.StatusCode.INTERNAL),
        (502, grpc.StatusCode.UNAVAILABLE),
        (503, grpc.StatusCode.UNAVAILABLE),
        (504, grpc.StatusCode.DEADLINE_EXCEEDED),
        (529, grpc.StatusCode.UNKNOWN),
    ],
)
def test_upstream_status_picks_the_grpc_code(status: int, code: grpc.StatusCode) -> None:
    body = orjson.dumps({"error": {"message": "m", "type": "t", "param": None, "code": "c"}})
    error = UpstreamError(status, body, {"retry-after": "3"})
    assert error.grpc_code == code
    assert error.body() == body  # an upstream's OpenAI body passes through byte for byte
    back = GatewayError.from_grpc(code, "m", error.grpc_trailers())
    assert (back.http_status, back.upstream_body, back.headers) == (status, body, {"retry-after": "3"})


def test_upstream_body_missing_keys_gets_them() -> None:
    error = UpstreamError(429, b'{"error": {"message": "slow down", "type": "requests", "extra": 1}}')
    assert orjson.loads(error.body()) == {
        "error": {"message": "slow down", "type": "requests", "param": None, "code": None, "extra": 1}
    }


@pytest.mark.parametrize("body", [b"<html>Bad Gateway</html>", b"", b"[1]", b'{"detail": "nope"}'])
def test_non_openai_upstream_bodies_become_openai_errors(body: bytes) -> None:
    error = UpstreamError(502, body)
    assert orjson.loads(error.body()) == {
        "error": {
            "message": "The upstream provider answered with HTTP 502.",
            "type": "api_error",
            "param": None,
            "code": None,
        }
    }


def test_gemini_list_wrapped_errors_are_understood() -> None:
    body = b'[{"error": {"code": 400, "message": "API key not valid", "status": "INVALID_ARGUMENT"}}]'
    assert UpstreamError(400, body).message == "API key not valid"


def test_errors_from_other_grpc_servers() -> None:
    error = GatewayError.from_grpc(grpc.StatusCode.UNAVAILABLE, "connection refused", ())
    assert (error.http_status, type(error)) == (503, errors.UpstreamUnavailableError)
