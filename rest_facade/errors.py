"""Every failure the facade answers with, as an OpenAI-shaped JSON error.

Errors are converted once, at this edge: the codec's JsonMappingError, Sanic's own exceptions (unknown
path, wrong method, body too large, malformed HTTP) and anything unexpected all become a
`gateway.errors.GatewayError`, whose class knows the status and the OpenAI `type`.
"""

from __future__ import annotations

import asyncio

from sanic import HTTPResponse, Request
from sanic.exceptions import MethodNotAllowed, NotFound, PayloadTooLarge, RequestTimeout, SanicException
from sanic.handlers import ErrorHandler

from gateway import cycles
from gateway.errors import (
    ClientClosedError,
    GatewayError,
    InternalError,
    InvalidRequestError,
    MethodNotAllowedError,
    NotFoundError,
    RequestTimeoutError,
    RequestTooLargeError,
    ShuttingDownError,
)
from gateway.jsonpb import JsonMappingError
from gateway.logs import get_logger

from .headers import REQUEST_ID, request_id
from .response import Response

JSON = "application/json"

log = get_logger("rest")


def error_response(error: GatewayError, rid: str) -> HTTPResponse:
    headers = {**error.headers, REQUEST_ID: rid} if error.headers else {REQUEST_ID: rid}
    return Response(error.body(), status=error.http_status, headers=headers, content_type=JSON)


def body_error(exc: JsonMappingError, body: bytes) -> InvalidRequestError:
    """The 400 for a body the codec rejected, with the JSON path of the bad value as `param`."""
    if not exc.param:
        if not body:
            return InvalidRequestError("The request body is empty; send a JSON object.")
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as bad:
            return InvalidRequestError(f"The request body is not valid UTF-8 (invalid byte at offset {bad.start}).")
        return InvalidRequestError(exc.message)
    return InvalidRequestError(exc.message, param=exc.param)


def from_sanic(request: Request | None, exc: BaseException) -> GatewayError:
    """The gateway error for an exception raised outside (or escaping) our handlers."""
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, asyncio.CancelledError):
        if request is not None and getattr(request.app.ctx, "draining", False):
            return ShuttingDownError("The gateway is shutting down; retry the request.")
        # Sanic's RequestCancelled: the client went away mid-request, leaving cycles that hold its buffers.
        cycles.abandoned()
        return ClientClosedError("The client closed the request.")
    method = request.method if request is not None else "?"
    path = request.path if request is not None else "?"
    if isinstance(exc, NotFound):
        return NotFoundError(f"Invalid URL ({method} {path}).")
    if isinstance(exc, MethodNotAllowed):
        allowed = sorted(getattr(exc, "allowed_methods", None) or ())
        error = MethodNotAllowedError(
            f"Method {method} is not allowed for {path}" + (f"; use {', '.join(allowed)}." if allowed else ".")
        )
        if allowed:
            error.headers["allow"] = ", ".join(allowed)
        return error
    if isinstance(exc, PayloadTooLarge):
        limit = request.app.config.REQUEST_MAX_SIZE if request is not None else None
        return RequestTooLargeError(
            "The request body is too large" + (f"; the limit is {limit} bytes." if limit else ".")
        )
    if isinstance(exc, RequestTimeout):
        return RequestTimeoutError("The request was not received in time.")
    if isinstance(exc, SanicException):
        status = int(getattr(exc, "status_code", 500) or 500)
        if 400 <= status < 500:
            return InvalidRequestError(str(exc) or "Bad request.", http_status=status)
        return GatewayError(str(exc) or "The gateway could not handle the request.", http_status=status)
    log.error("unexpected error", exc_info=True, method=method, path=path)
    return InternalError("The gateway failed to handle the request.")


class OpenAIErrorHandler(ErrorHandler):
    """Sanic's error handler, answering every error as `{"error": {...}}` with the right status."""

    def default(self, request: Request, exception: Exception) -> HTTPResponse:
        error = from_sanic(request, exception)
        rid = request_id(request.headers) if request is not None else ""
        if request is not None and error.http_status >= 500:
            log.warning("request failed", request_id=rid, status=error.http_status, error=error.message)
        return error_response(error, rid)

    @staticmethod
    def log(request: Request, exception: Exception) -> None:
        return None
