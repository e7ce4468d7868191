"""With tracing on, a REST request makes one trace: REST server span -> ChatService span -> upstream
client span, continuing the client's traceparent, in both process modes (served in this process, on
threads, so one in-memory exporter sees every span; the remote mode still crosses a real gRPC hop)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from gateway import tracing
from gateway.config import parse
from gateway.runner import serve
from tests.fakes.upstream import FakeUpstream, chunks
from tests.harness import free_port

from .conftest import MODES, gateway_config
from .rest import call, post

CLIENT_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN_ID = "00f067aa0ba902b7"
HELLO = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}


class ThreadGateway:
    """gateway.runner.serve on its own thread and event loop."""

    def __init__(self, config: dict[str, Any], grpc_only: bool = False) -> None:
        self.config = parse(config, {})
        self.grpc_only = grpc_only
        self.loop = asyncio.new_event_loop()
        self.stop_event: asyncio.Event | None = None
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def main() -> None:
            self.stop_event = asyncio.Event()
            self.loop.call_soon(self.started.set)
            await serve(self.config, grpc_only=self.grpc_only, stop=self.stop_event)

        self.loop.run_until_complete(main())

    def start(self) -> ThreadGateway:
        self.thread.start()
        assert self.started.wait(10)
        return self

    def stop(self) -> None:
        assert self.stop_event is not None
        self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(15)


def _wait_ready(base_url: str) -> None:
    for _ in range(200):
        try:
            if call(base_url, "GET", "/readyz", timeout=1).status == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{base_url} not ready")


@pytest.fixture(scope="module")
def exporter() -> Iterator[InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    tracing.configure(memory, batch=False)
    yield memory
    tracing.shutdown()


@pytest.fixture(scope="module", params=MODES)
def base_url(request: pytest.FixtureRequest, fake: FakeUpstream, exporter: InMemorySpanExporter) -> Iterator[str]:
    rest_port, grpc_port = free_port(), free_port()
    server = {"host": "127.0.0.1", "port": rest_port, "grpc_port": grpc_port}
    started: list[ThreadGateway] = []
    if request.param == "inprocess":
        started.append(ThreadGateway(gateway_config(fake, **server)).start())
    else:
        started.append(ThreadGateway(gateway_config(fake, **server), grpc_only=True).start())
        facade = {"host": "127.0.0.1", "port": rest_port, "grpc_target": f"127.0.0.1:{grpc_port}"}
        started.append(ThreadGateway(gateway_config(fake, **facade)).start())
    url = f"http://127.0.0.1:{rest_port}"
    _wait_ready(url)
    yield url
    for gateway in reversed(started):
        gateway.stop()


def rest_span(exporter: InMemorySpanExporter) -> ReadableSpan:
    """The REST span; it ends just after the last byte of a stream went out, so it may trail the reply."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for span in exporter.get_finished_spans():
            if span.kind == SpanKind.SERVER and span.name == "POST /v1/chat/completions":
                return span
        time.sleep(0.01)  # the exporter offers no event to wait on
    raise AssertionError("no REST span")


def _hex(number: int, width: int) -> str:
    return format(number, f"0{width}x")


@pytest.mark.parametrize("stream", [False, True])
def test_rest_request_makes_one_trace(
    base_url: str, fake: FakeUpstream, exporter: InMemorySpanExporter, stream: bool
) -> None:
    if stream:
        fake.stream(chunks())
    exporter.clear()
    reply = post(
        base_url,
        {**HELLO, "stream": stream},
        headers={"traceparent": f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01", "x-request-id": "trace-1"},
    )
    assert reply.status == 200
    rest = rest_span(exporter)
    spans: list[ReadableSpan] = list(exporter.get_finished_spans())
    service = next(s for s in spans if s.kind == SpanKind.SERVER and s.name.startswith("llm_gateway.v1.ChatService/"))
    client = next(s for s in spans if s.kind == SpanKind.CLIENT)
    for span in (rest, service, client):
        assert span.context is not None and _hex(span.context.trace_id, 32) == CLIENT_TRACE_ID
    assert rest.parent is not None and _hex(rest.parent.span_id, 16) == CLIENT_SPAN_ID
    assert rest.context is not None and service.parent is not None
    assert service.parent.span_id == rest.context.span_id
    assert service.context is not None and client.parent is not None
    assert client.parent.span_id == service.context.span_id
    attributes = dict(rest.attributes or {})
    assert attributes["http.response.status_code"] == 200
    assert attributes["http.route"] == "/v1/chat/completions"
    assert attributes["llm_gateway.request_id"] == "trace-1"


def test_failed_request_marks_the_rest_span(base_url: str, fake: FakeUpstream, exporter: InMemorySpanExporter) -> None:
    fake.reply(503, {"error": {"message": "down", "type": "server_error", "param": None, "code": None}})
    exporter.clear()
    assert post(base_url, HELLO).status == 503
    rest = rest_span(exporter)
    assert dict(rest.attributes or {})["http.response.status_code"] == 503
    assert not rest.status.is_ok
