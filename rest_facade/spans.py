"""The REST server span of a request, the root of the gateway's part of a trace (only when tracing is on).

It continues the client's `traceparent`, is the current span while the handler runs (so the in-process
ChatService span is its child), and replaces the client's `traceparent` in the call metadata (so the
ChatService behind a gRPC channel continues it too).
"""

from __future__ import annotations

from dataclasses import replace

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer
from sanic import Request

from gateway import tracing
from gateway.call import CallInfo

_TRACE_KEYS = ("traceparent", "tracestate")


class ServerSpan:
    __slots__ = ("_token", "span")

    def __init__(self, tracer: Tracer, request: Request, route_path: str) -> None:
        self.span = tracer.start_span(
            f"{request.method} {route_path}",
            context=tracing.extract(request.headers),
            kind=SpanKind.SERVER,
            attributes={
                "http.request.method": request.method,
                "http.route": route_path,
                "url.path": request.path,
                "url.scheme": request.scheme,
            },
        )
        self._token = otel_context.attach(trace.set_span_in_context(self.span))

    def carry(self, call: CallInfo) -> CallInfo:
        """The call with this span as its traceparent."""
        carrier: dict[str, str] = {}
        tracing.inject(carrier, self.span)
        metadata = tuple((k, v) for k, v in call.metadata if k not in _TRACE_KEYS) + tuple(carrier.items())
        return replace(call, metadata=metadata)

    def end(self, status: int, request_id: str) -> None:
        self.span.set_attribute("http.response.status_code", status)
        self.span.set_attribute("llm_gateway.request_id", request_id)
        if status >= 500:
            self.span.set_status(Status(StatusCode.ERROR))
        self.span.end()
        otel_context.detach(self._token)
