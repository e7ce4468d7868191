"""One trace per request, checked with an in-memory exporter on a gateway served in this process."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from gateway import tracing
from gateway.config import parse
from gateway.jsonpb import MessageCodec
from gateway.runner import serve
from llm_gateway.v1 import chat_pb2, chat_pb2_grpc
from tests.fakes.upstream import FakeUpstream, chunks
from tests.harness import free_port

REQUEST = MessageCodec.for_type(chat_pb2.CreateChatCompletionRequest)
CLIENT_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN_ID = "00f067aa0ba902b7"


class InProcessGateway:
    def __init__(self, upstream: FakeUpstream, tmp_path: Path) -> None:
        self.port, self.grpc_port = free_port(), free_port()
        config = {
            "server": {"host": "127.0.0.1", "port": self.port, "grpc_port": self.grpc_port},
            "providers": {"openai": {"api_key": "k", "api_url": f"{upstream.url}/v1"}},
            "models": {"gpt-4o": "openai"},
        }
        self.config = parse(config, {})
        self.loop = asyncio.new_event_loop()
        self.stop_event: asyncio.Event | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.ready = threading.Event()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def main() -> None:
            self.stop_event = asyncio.Event()
            self.loop.call_soon(self.ready.set)
            await serve(self.config, grpc_only=True, stop=self.stop_event)

        self.loop.run_until_complete(main())

    def start(self) -> InProcessGateway:
        self.thread.start()
        self.ready.wait(10)
        with grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=10)
        return self

    def stop(self) -> None:
        assert self.stop_event is not None
        self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(10)


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    tracing.configure(memory, batch=False)
    yield memory
    tracing.shutdown()


@pytest.fixture
def gateway(upstream: FakeUpstream, tmp_path: Path, exporter: InMemorySpanExporter) -> Iterator[InProcessGateway]:
    process = InProcessGateway(upstream, tmp_path).start()
    yield process
    process.stop()


def _call(gateway: InProcessGateway, stream: bool) -> None:
    metadata = (("traceparent", f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01"),)
    request = REQUEST.decode(
        {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.5, "stream": stream}
    )
    with grpc.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        if stream:
            list(stub.StreamChatCompletion(request, metadata=metadata, timeout=10))
        else:
            stub.CreateChatCompletion(request, metadata=metadata, timeout=10)


@pytest.mark.parametrize("stream", [False, True])
def test_grpc_request_makes_one_trace(
    gateway: InProcessGateway, upstream: FakeUpstream, exporter: InMemorySpanExporter, stream: bool
) -> None:
    if stream:
        upstream.stream(chunks())
    _call(gateway, stream)
    spans = {span.kind: span for span in exporter.get_finished_spans()}
    server, client = spans[SpanKind.SERVER], spans[SpanKind.CLIENT]
    assert server.context is not None and client.context is not None and client.parent is not None
    # The client's traceparent is continued...
    assert format(server.context.trace_id, "032x") == CLIENT_TRACE_ID
    assert server.parent is not None and format(server.parent.span_id, "016x") == CLIENT_SPAN_ID
    # ...the upstream call is a child of the service span...
    assert client.parent.span_id == server.context.span_id
    assert client.context.trace_id == server.context.trace_id
    # ...and the upstream request carries the client span as its traceparent.
    sent = upstream.last().headers["traceparent"]
    assert sent == f"00-{CLIENT_TRACE_ID}-{format(client.context.span_id, '016x')}-01"
    rpc = "StreamChatCompletion" if stream else "CreateChatCompletion"
    assert server.name == f"llm_gateway.v1.ChatService/{rpc}"
    attributes = dict(server.attributes or {})
    assert attributes["gen_ai.request.model"] == "gpt-4o"
    assert attributes["gen_ai.request.temperature"] == 0.5
    assert attributes["gen_ai.usage.input_tokens"] == (9 if stream else 11)
    assert attributes["gen_ai.usage.output_tokens"] == (3 if stream else 7)
    assert attributes["gen_ai.response.finish_reasons"] == ("stop",)
    client_attributes = dict(client.attributes or {})
    assert client_attributes["http.response.status_code"] == 200
    assert client_attributes["url.full"] == f"{upstream.url}/v1/chat/completions"
    assert client_attributes["gen_ai.provider.name"] == "openai"


def test_failed_upstream_marks_spans(
    gateway: InProcessGateway, upstream: FakeUpstream, exporter: InMemorySpanExporter
) -> None:
    upstream.reply(429, {"error": {"message": "slow down", "type": "requests", "param": None, "code": None}})
    with pytest.raises(grpc.RpcError):
        _call(gateway, stream=False)
    spans = {span.kind: span for span in exporter.get_finished_spans()}
    assert dict(spans[SpanKind.CLIENT].attributes or {})["http.response.status_code"] == 429
    assert not spans[SpanKind.SERVER].status.is_ok


def test_tracing_is_off_without_configuration() -> None:
    assert tracing.TRACER is None
    assert not tracing.enabled_by_environment({})
    assert tracing.enabled_by_environment({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    assert not tracing.enabled_by_environment(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_SDK_DISABLED": "true"}
    )
