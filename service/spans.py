"""The spans of one chat request: the ChatService server span and the upstream HTTP client span.

Only built when tracing is on (gateway.tracing.TRACER is set). The client span reaches the upstream
as the `traceparent` of a CallInfo copy, which providers forward as a header.
"""

from __future__ import annotations

from dataclasses import replace

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer

from gateway import tracing
from gateway.call import CallInfo
from gateway.config import Deployment
from gateway.errors import GatewayError
from llm_gateway.v1 import chat_pb2

from .accounting import RequestRecord

_SERVICE = chat_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name
_TRACE_KEYS = ("traceparent", "tracestate")


class RequestSpans:
    def __init__(
        self,
        tracer: Tracer,
        rpc: str,
        request: chat_pb2.CreateChatCompletionRequest | chat_pb2.CreateEmbeddingRequest,
        call: CallInfo,
    ):
        self._tracer = tracer
        parent = tracing.extract(dict(call.metadata))
        self.server = tracer.start_span(f"{_SERVICE}/{rpc}", context=parent, kind=SpanKind.SERVER)
        self.server.set_attributes(
            {
                "rpc.system": "grpc",
                "rpc.service": _SERVICE,
                "rpc.method": rpc,
                "gen_ai.operation.name": "embeddings" if rpc == "CreateEmbedding" else "chat",
                "gen_ai.request.model": request.model,
            }
        )
        for field, attribute in (
            ("temperature", "gen_ai.request.temperature"),
            ("top_p", "gen_ai.request.top_p"),
            ("max_tokens", "gen_ai.request.max_tokens"),
            ("max_completion_tokens", "gen_ai.request.max_tokens"),
            ("seed", "gen_ai.request.seed"),
        ):
            if field in request.DESCRIPTOR.fields_by_name and request.HasField(field):
                self.server.set_attribute(attribute, getattr(request, field))
        self.client: trace.Span | None = None

    def upstream(self, model: str, deployment: Deployment, provider_type: str, url: str, call: CallInfo) -> CallInfo:
        """Start an attempt's client span; return the call to hand the provider, carrying its traceparent."""
        self.server.set_attribute("gen_ai.provider.name", provider_type)
        self.client = self._tracer.start_span(
            f"chat {deployment.upstream_model}",
            context=trace.set_span_in_context(self.server),
            kind=SpanKind.CLIENT,
            attributes={
                "gen_ai.operation.name": "chat",
                "gen_ai.provider.name": provider_type,
                "gen_ai.request.model": deployment.upstream_model,
                "http.request.method": "POST",
                "url.full": url,
                "llm_gateway.model": model,
                "llm_gateway.deployment": deployment.name,
            },
        )
        carrier: dict[str, str] = {}
        tracing.inject(carrier, self.client)
        metadata = tuple((k, v) for k, v in call.metadata if k not in _TRACE_KEYS) + tuple(carrier.items())
        return replace(call, metadata=metadata)

    def attempt_failed(self, error: GatewayError) -> None:
        if self.client is not None:
            self.client.set_attribute("http.response.status_code", error.http_status)
            self.client.set_status(Status(StatusCode.ERROR, error.message))
            self.client.set_attribute("error.type", error.type)
            self.client.end()
            self.client = None

    def finish(self, record: RequestRecord, response_model: str = "", finish_reasons: tuple[str, ...] = ()) -> None:
        attributes: dict[str, str | int | tuple[str, ...]] = {"llm_gateway.request_id": record.request_id}
        if record.usage is not None:
            attributes["gen_ai.usage.input_tokens"] = record.usage.prompt_tokens
            attributes["gen_ai.usage.output_tokens"] = record.usage.completion_tokens
        if response_model:
            attributes["gen_ai.response.model"] = response_model
        if finish_reasons:
            attributes["gen_ai.response.finish_reasons"] = finish_reasons
        error = record.error
        if self.client is not None:
            if error is None or record.in_upstream:
                self.client.set_attribute("http.response.status_code", error.http_status if error else 200)
            self._end(self.client, attributes, record)
        self._end(self.server, attributes, record)

    @staticmethod
    def _end(span: trace.Span, attributes: dict[str, str | int | tuple[str, ...]], record: RequestRecord) -> None:
        span.set_attributes(attributes)
        if record.error is not None:
            span.set_status(Status(StatusCode.ERROR, record.error.message))
            span.set_attribute("error.type", record.error.type)
        span.end()
