"""Graceful drain on SIGTERM, as Kubernetes relies on it, with 2 workers and in both process modes:
/readyz fails and gRPC health says NOT_SERVING at once; requests are still served for
`server.shutdown_delay`; requests in flight then get up to `server.shutdown_grace` to finish; what is
left ends cleanly (a 503, or an error event and [DONE]), never a cut connection; the processes exit 0."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import orjson
import pytest
from google.rpc import status_pb2
from grpc_health.v1 import health_pb2

from gateway.errors import STATUS_DETAILS_KEY
from gateway.jsonpb import MessageCodec
from llm_gateway.v1 import chat_pb2, chat_pb2_grpc
from tests.fakes.upstream import FakeUpstream, chunks

from .conftest import gateway_config
from .rest import Reply, call, open_request, post, sse_events, sse_json
from .stacks import MODES, WorkerStack, start_workers

HELLO = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
PIECES = tuple(f"p{i} " for i in range(10))


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def stacks() -> Iterator[list[WorkerStack]]:
    started: list[WorkerStack] = []
    yield started
    for stack in started:
        stack.kill()


def start(mode: str, fake: FakeUpstream, tmp_path: Path, stacks: list[WorkerStack], **server: Any) -> WorkerStack:
    stack = start_workers(mode, gateway_config(fake, **server), tmp_path)
    stacks.append(stack)
    return stack


def test_stream_in_flight_at_sigterm_finishes_whole(
    mode: str, fake: FakeUpstream, tmp_path: Path, stacks: list[WorkerStack]
) -> None:
    stack = start(mode, fake, tmp_path, stacks)
    fake.stream(chunks(PIECES), delay=0.4)  # about 5 s in all
    with open_request(stack.base_url, {**HELLO, "stream": True}) as conn:
        response = conn.getresponse()
        assert response.status == 200
        first = response.readline() + response.readline()  # the first event: the stream is in flight
        stack.signal(signal.SIGTERM)
        stack.wait_logs("shutting down", stack.workers * len(stack.processes))
        stack.signal(signal.SIGTERM)  # a second SIGTERM does not cut it short
        rest = response.read()
    events = sse_json(first + rest)
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"]) == "".join(PIECES)
    assert not any("error" in e for e in events)
    assert stack.wait() == [0] * len(stack.processes)


def test_requests_during_shutdown_delay_are_served_while_not_ready(
    mode: str, fake: FakeUpstream, tmp_path: Path, stacks: list[WorkerStack]
) -> None:
    stack = start(mode, fake, tmp_path, stacks, shutdown_delay=6)
    ready = call(stack.base_url, "GET", "/readyz")
    assert ready.status == 200 and ready.headers["connection"] == "keep-alive"
    assert stack.health() == health_pb2.HealthCheckResponse.SERVING
    stack.signal(signal.SIGTERM)
    stack.wait_logs("shutting down", stack.workers * len(stack.processes))
    # Each request opens a new connection, which the kernel gives to either worker.
    for _ in range(4):
        ready = call(stack.base_url, "GET", "/readyz")
        assert ready.status == 503 and ready.error["code"] == "shutting_down"
    for service in ("", "llm_gateway.v1.ChatService"):
        assert stack.health(service) == health_pb2.HealthCheckResponse.NOT_SERVING
    replies = [post(stack.base_url, HELLO) for _ in range(4)]
    assert [r.status for r in replies] == [200] * 4
    # So that a load balancer reconnects rather than reuse a connection the drain will close.
    assert [r.headers["connection"] for r in replies] == ["close"] * 4
    assert stack.count_logs("stopped") == 0  # all of it happened inside the delay
    assert stack.wait() == [0] * len(stack.processes)


def test_leftovers_after_the_grace_end_cleanly(
    mode: str, fake: FakeUpstream, tmp_path: Path, stacks: list[WorkerStack]
) -> None:
    stack = start(mode, fake, tmp_path, stacks, shutdown_grace=1)
    fake.stream(chunks()[:2], done=False, hold=True)
    with open_request(stack.base_url, {**HELLO, "stream": True}) as conn:
        stream = conn.getresponse()
        assert stream.status == 200
        first = stream.readline() + stream.readline()
        fake.hang()
        waiting: list[Reply] = []
        thread = threading.Thread(target=lambda: waiting.append(post(stack.base_url, HELLO)))
        thread.start()
        deadline = time.monotonic() + 10
        while len(fake.received) < 2 and time.monotonic() < deadline:  # the fake has no event for this
            time.sleep(0.01)
        assert len(fake.received) == 2  # the unary request is at the upstream too
        stack.signal(signal.SIGTERM)
        thread.join()
        rest = stream.read()
    events = sse_events(first + rest)
    assert events[-1] == b"[DONE]"
    error = orjson.loads(events[-2])["error"]
    assert error["code"] == "shutting_down" and "shutting down" in error["message"]
    assert waiting[0].status == 503 and waiting[0].error["code"] == "shutting_down"
    assert stack.wait() == [0] * len(stack.processes)


def test_grpc_stream_left_after_the_grace_ends_with_shutting_down(
    fake: FakeUpstream, tmp_path: Path, stacks: list[WorkerStack]
) -> None:
    stack = start("remote", fake, tmp_path, stacks, shutdown_grace=1)
    fake.stream(chunks()[:2], done=False, hold=True)
    request = MessageCodec.for_type(chat_pb2.CreateChatCompletionRequest).decode({**HELLO, "stream": True})
    with grpc.insecure_channel(stack.service.grpc_address) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)  # type: ignore[no-untyped-call]
        replies = stub.StreamChatCompletion(request, timeout=30)
        received = [next(replies)]
        stack.signal(signal.SIGTERM)
        with pytest.raises(grpc.RpcError) as failure:
            received.extend(replies)
    error: Any = failure.value
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    details = dict(error.trailing_metadata())[STATUS_DETAILS_KEY]
    assert "shutting_down" in str(status_pb2.Status.FromString(details))
    assert len(received) == 2
    assert stack.wait() == [0] * len(stack.processes)
