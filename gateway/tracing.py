"""OpenTelemetry tracing, configured the standard way and free when off.

Tracing is on when OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set, or
OTEL_TRACES_EXPORTER names an exporter (`otlp`, `console`); the OTLP/HTTP exporter reads the rest of
its settings (headers, timeout, ...) from the standard variables itself. OTEL_SDK_DISABLED=true wins.

When tracing is off `TRACER` is None and the request path only tests that: no span objects, no
context switches, no propagation work.

A request makes one trace: the REST server span, the ChatService server span (in-process, or across
the gRPC hop through the `traceparent` metadata), and the upstream HTTP client span. Attributes follow
the OpenTelemetry GenAI semantic conventions (gen_ai.*).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from typing import TYPE_CHECKING

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:  # the SDK (about 3 MB per worker) is imported only when tracing is turned on
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

TRACER: Tracer | None = None
_provider: TracerProvider | None = None
_PROPAGATOR = TraceContextTextMapPropagator()

__all__ = ["TRACER", "Span", "SpanKind", "configure", "enabled_by_environment", "extract", "inject", "shutdown"]


def enabled_by_environment(environ: Mapping[str, str] = os.environ) -> bool:
    if environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    exporter = environ.get("OTEL_TRACES_EXPORTER", "").lower()
    if exporter == "none":
        return False
    return bool(
        exporter or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def configure(exporter: SpanExporter | None = None, *, batch: bool = True) -> None:
    """Turn tracing on with `exporter`, or with the exporter the environment names; else leave it off."""
    global TRACER, _provider
    if exporter is None and not enabled_by_environment():
        return
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    if exporter is None:
        if os.environ.get("OTEL_TRACES_EXPORTER", "").lower() == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            exporter = ConsoleSpanExporter()
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "llm-gateway")})
    _provider = TracerProvider(resource=resource)
    _provider.add_span_processor(BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter))
    TRACER = _provider.get_tracer("llm_gateway")


def shutdown() -> None:
    global TRACER, _provider
    if _provider is not None:
        _provider.shutdown()
    TRACER = _provider = None


def extract(carrier: Mapping[str, str]) -> otel_context.Context | None:
    """The parent context for a server span: the current span if there is one (in-process), else the
    caller's traceparent."""
    if trace.get_current_span().get_span_context().is_valid:
        return None
    return _PROPAGATOR.extract(carrier)


def inject(carrier: MutableMapping[str, str], span: Span) -> None:
    """Write `span` as the traceparent (and tracestate) of an outgoing request."""
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
