"""The one exception hierarchy of the gateway.

Each class knows its gRPC code, HTTP status and OpenAI error `type`, so mapping an error at either
edge is a lookup, never an if-chain:

    GatewayError                      500 UNKNOWN            api_error
    ├── InvalidRequestError           400 INVALID_ARGUMENT   invalid_request_error
    │   ├── RequestTimeoutError       408 INVALID_ARGUMENT   invalid_request_error
    │   └── RequestTooLargeError      413 INVALID_ARGUMENT   invalid_request_error
    ├── AuthenticationError           401 UNAUTHENTICATED    authentication_error
    │   └── InvalidApiKeyError        401 UNAUTHENTICATED    invalid_request_error, code invalid_api_key
    ├── PermissionDeniedError         403 PERMISSION_DENIED  permission_error
    ├── NotFoundError                 404 NOT_FOUND          invalid_request_error
    ├── ConflictError                 409 ALREADY_EXISTS     invalid_request_error
    ├── FailedPreconditionError       400 FAILED_PRECONDITION invalid_request_error
    │   └── ModelNotFoundError        404 NOT_FOUND          invalid_request_error, code model_not_found
    ├── MethodNotAllowedError         405 UNIMPLEMENTED      invalid_request_error
    ├── RateLimitError                429 RESOURCE_EXHAUSTED rate_limit_error
    │   └── InsufficientQuotaError    429 RESOURCE_EXHAUSTED insufficient_quota (a spent budget; not retried)
    ├── ClientClosedError             499 CANCELLED          api_error
    ├── InternalError                 500 INTERNAL           server_error
    ├── UpstreamError                 the upstream's status, passed through with its body
    ├── BadGatewayError               502 UNAVAILABLE        api_error (upstream sent garbage)
    ├── UpstreamUnavailableError      503 UNAVAILABLE        api_error (refused, DNS, reset)
    │   ├── ShuttingDownError         503 UNAVAILABLE        api_error, code shutting_down
    │   └── BudgetUnavailableError    503 UNAVAILABLE        api_error, code budget_unavailable
    └── UpstreamTimeoutError          504 DEADLINE_EXCEEDED  timeout

Across the gRPC wire an error travels as a `google.rpc.Status` whose details hold an
`llm_gateway.v1.ErrorDetail`, in the standard `grpc-status-details-bin` trailer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grpc
import orjson
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

from llm_gateway.v1 import chat_pb2

STATUS_DETAILS_KEY = "grpc-status-details-bin"

# grpc-gateway's runtime/errors.go table.
HTTP_STATUS_BY_GRPC_CODE: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}

_GRPC_CODE_BY_HTTP_STATUS: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    409: grpc.StatusCode.ABORTED,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    500: grpc.StatusCode.INTERNAL,
    501: grpc.StatusCode.UNIMPLEMENTED,
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}

_OPENAI_TYPE_BY_HTTP_STATUS: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


def grpc_code_for_http_status(status: int) -> grpc.StatusCode:
    code = _GRPC_CODE_BY_HTTP_STATUS.get(status)
    if code is not None:
        return code
    return grpc.StatusCode.FAILED_PRECONDITION if 400 <= status < 500 else grpc.StatusCode.UNKNOWN


class GatewayError(Exception):
    grpc_code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    http_status: int = 500
    type: str = "api_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        http_status: int | None = None,
        upstream_body: bytes = b"",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if http_status is not None:
            self.http_status = http_status
        self.upstream_body = upstream_body
        self.headers = dict(headers or {})

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def body(self) -> bytes:
        """The OpenAI-shaped JSON body a REST client gets: the upstream's own when it sent one (with
        any of message, type, param and code it left out added, so SDKs always find them)."""
        if self.upstream_body:
            error = _openai_error(self.upstream_body)
            if error is not None:
                missing = _ERROR_KEYS.difference(error)
                if not missing:
                    return self.upstream_body
                defaults = self.to_dict()["error"]
                value = orjson.loads(self.upstream_body)
                value["error"] = {**error, **{key: defaults[key] for key in _ERROR_KEYS if key in missing}}
                return orjson.dumps(value)
        return orjson.dumps(self.to_dict())

    # ---------------------------------------------------------------- gRPC wire form

    def to_detail(self) -> chat_pb2.ErrorDetail:
        detail = chat_pb2.ErrorDetail(
            http_status=self.http_status, type=self.type, upstream_body=self.upstream_body, headers=self.headers
        )
        if self.param is not None:
            detail.param = self.param
        if self.code is not None:
            detail.code = self.code
        return detail

    def grpc_details(self) -> list[Message]:
        """The messages packed into the google.rpc.Status details: the ErrorDetail, then any standard ones."""
        return [self.to_detail()]

    def grpc_trailers(self) -> tuple[tuple[str, bytes], ...]:
        details = []
        for message in self.grpc_details():
            packed = any_pb2.Any()
            packed.Pack(message)
            details.append(packed)
        status = status_pb2.Status(code=self.grpc_code.value[0], message=self.message, details=details)
        return ((STATUS_DETAILS_KEY, status.SerializeToString()),)

    @classmethod
    def from_grpc(cls, code: grpc.StatusCode, message: str, trailers: Any = None) -> GatewayError:
        """Rebuild the error a gRPC call failed with; works for any server, ours or not."""
        detail = _detail_from_trailers(trailers)
        if detail is None:
            return _ERROR_CLASS_BY_GRPC_CODE.get(code, GatewayError)(message)
        error_class = _ERROR_CLASS_BY_GRPC_CODE.get(code, GatewayError)
        error = error_class(
            message,
            param=detail.param if detail.HasField("param") else None,
            code=detail.code if detail.HasField("code") else None,
            http_status=detail.http_status or None,
            upstream_body=detail.upstream_body,
            headers=detail.headers,
        )
        error.type = detail.type or error.type
        return error


class InvalidRequestError(GatewayError):
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    http_status = 400
    type = "invalid_request_error"


class RequestTimeoutError(InvalidRequestError):
    """The client took too long to send its request."""

    http_status = 408


class RequestTooLargeError(InvalidRequestError):
    http_status = 413


class AuthenticationError(GatewayError):
    grpc_code = grpc.StatusCode.UNAUTHENTICATED
    http_status = 401
    type = "authentication_error"


class PermissionDeniedError(GatewayError):
    grpc_code = grpc.StatusCode.PERMISSION_DENIED
    http_status = 403
    type = "permission_error"


class NotFoundError(GatewayError):
    grpc_code = grpc.StatusCode.NOT_FOUND
    http_status = 404
    type = "invalid_request_error"


class ConflictError(GatewayError):
    grpc_code = grpc.StatusCode.ALREADY_EXISTS
    http_status = 409
    type = "invalid_request_error"


class FailedPreconditionError(GatewayError):
    """The request is well-formed but the gateway's state refuses it (a config key revoked over the API)."""

    grpc_code = grpc.StatusCode.FAILED_PRECONDITION
    http_status = 400
    type = "invalid_request_error"


class ModelNotFoundError(NotFoundError):
    code = "model_not_found"


class MethodNotAllowedError(GatewayError):
    grpc_code = grpc.StatusCode.UNIMPLEMENTED
    http_status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class InvalidApiKeyError(AuthenticationError):
    """A missing or unknown gateway API key, shaped as OpenAI's."""

    type = "invalid_request_error"
    code = "invalid_api_key"


class RateLimitError(GatewayError):
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 429
    type = "rate_limit_error"
    # The gateway's own limits set these; gRPC callers then get google.rpc.RetryInfo and QuotaFailure.
    retry_after: float | None = None  # seconds
    quota_subject: str = ""  # "key:<name>" or "model:<name>"
    quota_description: str = ""

    def grpc_details(self) -> list[Message]:
        details = super().grpc_details()
        if self.retry_after is not None:
            delay = duration_pb2.Duration()
            delay.FromMilliseconds(max(0, round(self.retry_after * 1000)))
            details.append(error_details_pb2.RetryInfo(retry_delay=delay))
        if self.quota_subject:
            violation = error_details_pb2.QuotaFailure.Violation(
                subject=self.quota_subject, description=self.quota_description
            )
            details.append(error_details_pb2.QuotaFailure(violations=[violation]))
        return details


class InsufficientQuotaError(RateLimitError):
    """A spent budget, shaped as OpenAI's: no RetryInfo, and `x-should-retry: false` so SDKs do not retry."""

    type = "insufficient_quota"
    code = "insufficient_quota"

    def __init__(self, message: str, subject: str, description: str) -> None:
        super().__init__(message, headers={"x-should-retry": "false"})
        self.quota_subject, self.quota_description = subject, description


class ClientClosedError(GatewayError):
    grpc_code = grpc.StatusCode.CANCELLED
    http_status = 499


class InternalError(GatewayError):
    grpc_code = grpc.StatusCode.INTERNAL
    http_status = 500
    type = "server_error"


class BadGatewayError(GatewayError):
    grpc_code = grpc.StatusCode.UNAVAILABLE
    http_status = 502
    code = "bad_upstream_response"


class UpstreamUnavailableError(GatewayError):
    grpc_code = grpc.StatusCode.UNAVAILABLE
    http_status = 503
    code = "upstream_unavailable"


class ShuttingDownError(UpstreamUnavailableError):
    code = "shutting_down"


class BudgetUnavailableError(UpstreamUnavailableError):
    """Budgets cannot be checked (the state backend is down, with budgets.when_state_down: deny)."""

    code = "budget_unavailable"


class UpstreamTimeoutError(GatewayError):
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED
    http_status = 504
    type = "timeout"
    code = "upstream_timeout"


class UpstreamError(GatewayError):
    """The upstream answered with an error status; its status and body reach the client unchanged."""

    def __init__(self, status: int, body: bytes, headers: Mapping[str, str] | None = None) -> None:
        message, param, code, kind = _parse_openai_error(body)
        super().__init__(
            message or f"The upstream provider answered with HTTP {status}.",
            param=param,
            code=code,
            http_status=status,
            upstream_body=body,
            headers=headers,
        )
        self.type = kind or _OPENAI_TYPE_BY_HTTP_STATUS.get(status, "api_error")
        self.grpc_code = grpc_code_for_http_status(status)


_ERROR_CLASS_BY_GRPC_CODE: dict[grpc.StatusCode, type[GatewayError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequestError,
    grpc.StatusCode.FAILED_PRECONDITION: InvalidRequestError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidRequestError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: RateLimitError,
    grpc.StatusCode.CANCELLED: ClientClosedError,
    grpc.StatusCode.INTERNAL: InternalError,
    grpc.StatusCode.DATA_LOSS: InternalError,
    grpc.StatusCode.UNAVAILABLE: UpstreamUnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: UpstreamTimeoutError,
    grpc.StatusCode.UNIMPLEMENTED: MethodNotAllowedError,
}


def _detail_from_trailers(trailers: Any) -> chat_pb2.ErrorDetail | None:
    for key, value in trailers or ():
        if key == STATUS_DETAILS_KEY:
            status = status_pb2.Status.FromString(value)
            for packed in status.details:
                detail = chat_pb2.ErrorDetail()
                if packed.Unpack(detail):
                    return detail
    return None


_ERROR_KEYS = frozenset(("message", "type", "param", "code"))


def _openai_error(body: bytes) -> dict[str, Any] | None:
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    error = value.get("error") if isinstance(value, dict) else None
    return error if isinstance(error, dict) else None


def _parse_openai_error(body: bytes) -> tuple[str | None, str | None, str | None, str | None]:
    """message, param, code and type of an OpenAI error body; Nones for anything else."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None, None, None, None
    if isinstance(value, list) and value and isinstance(value[0], dict):  # Gemini may wrap errors in a list
        value = value[0]
    error = value.get("error") if isinstance(value, dict) else None
    if isinstance(error, str):
        return error, None, None, None
    if not isinstance(error, dict):
        return None, None, None, None

    def text(key: str) -> str | None:
        item = error.get(key)
        return str(item) if item is not None else None

    return text("message"), text("param"), text("code"), text("type")
