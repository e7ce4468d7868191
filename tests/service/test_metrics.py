"""Token and operations metrics are exact: every path counted exactly once, read from /metrics."""

from __future__ import annotations

import http.client
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from gateway import metrics
from gateway.jsonpb import MessageCodec
from llm_gateway.v1 import chat_pb2, chat_pb2_grpc
from tests.fakes.upstream import FakeUpstream, chunks
from tests.harness import GatewayProcess

REQUEST = MessageCodec.for_type(chat_pb2.CreateChatCompletionRequest)
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(gateway: GatewayProcess) -> Samples:
    with urllib.request.urlopen(f"{gateway.base_url}/metrics", timeout=5) as response:
        return parse(response.read())


def parse(exposition: bytes) -> Samples:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(exposition.decode())
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name` over the samples whose labels include `labels`."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


def tokens(samples: Samples, **labels: str) -> tuple[float, float, float]:
    return (
        value(samples, "llm_gateway_prompt_tokens_total", **labels),
        value(samples, "llm_gateway_completion_tokens_total", **labels),
        value(samples, "llm_gateway_total_tokens_total", **labels),
    )


@pytest.fixture
def fakes() -> Iterator[dict[str, FakeUpstream]]:
    servers = {name: FakeUpstream().start() for name in ("main", "spare")}
    yield servers
    for server in servers.values():
        server.stop()


def _config(fakes: dict[str, FakeUpstream], **server: Any) -> dict[str, Any]:
    return {
        "server": server,
        "routing": {"retries": 1, "backoff_initial": 0.01, "backoff_max": 0.02, "cooldown_failures": 1000},
        "providers": {name: {"type": "openai", "api_url": f"{fake.url}/v1"} for name, fake in fakes.items()},
        "models": {
            "gpt": {"provider": "main", "fallback": ["backup"]},
            "backup": {"provider": "spare", "model": "spare-model"},
        },
    }


@pytest.fixture
def start(fakes: dict[str, FakeUpstream], gateway_factory: Callable[..., GatewayProcess]) -> Callable[..., Any]:
    def start(**server: Any) -> tuple[GatewayProcess, chat_pb2_grpc.ChatServiceStub]:
        gateway = gateway_factory(_config(fakes, **server))
        return gateway, chat_pb2_grpc.ChatServiceStub(gateway.channel())

    return start


def _request(**extra: Any) -> chat_pb2.CreateChatCompletionRequest:
    return REQUEST.decode({"model": "gpt", "messages": [{"role": "user", "content": "hi"}], **extra})


def test_unary_and_streams_counted_once(fakes: dict[str, FakeUpstream], start: Callable[..., Any]) -> None:
    gateway, stub = start()
    stub.CreateChatCompletion(_request(), timeout=10)  # usage 11 / 7 / 18
    fakes["main"].stream(chunks())  # usage 9 / 3 / 12
    list(stub.StreamChatCompletion(_request(stream=True), timeout=10))  # client did not ask for usage
    list(stub.StreamChatCompletion(_request(stream=True, stream_options={"include_usage": True}), timeout=10))
    samples = scrape(gateway)
    assert tokens(samples, model="gpt", provider="main") == (11 + 9 + 9, 7 + 3 + 3, 18 + 12 + 12)
    assert value(samples, "llm_gateway_requests_total", model="gpt", provider="main", outcome="200") == 3
    assert value(samples, "llm_gateway_request_duration_seconds_count", model="gpt", stream="true") == 2
    assert value(samples, "llm_gateway_time_to_first_token_seconds_count", model="gpt") == 2
    assert value(samples, "llm_gateway_upstream_duration_seconds_count", model="gpt") == 3
    assert value(samples, "llm_gateway_overhead_seconds_count", model="gpt") == 3
    assert value(samples, "llm_gateway_requests_in_flight", model="gpt") == 0
    assert (
        value(samples, "llm_gateway_grpc_server_handled_total", grpc_method="StreamChatCompletion", grpc_code="OK") == 2
    )
    assert value(samples, "llm_gateway_grpc_server_handling_seconds_count", grpc_method="CreateChatCompletion") == 1


def test_fallback_and_retry_counted_once_against_what_answered(
    fakes: dict[str, FakeUpstream], start: Callable[..., Any]
) -> None:
    gateway, stub = start()
    fakes["main"].reply(503, {"error": {"message": "down", "type": "server_error"}})
    fakes["spare"].script(fakes["spare"].replying(500, {"error": {"message": "hiccup", "type": "server_error"}}))
    stub.CreateChatCompletion(_request(), timeout=10)
    samples = scrape(gateway)
    assert tokens(samples, model="gpt", provider="spare") == (11, 7, 18)
    assert tokens(samples, provider="main") == (0, 0, 0)
    assert tokens(samples) == (11, 7, 18)
    assert value(samples, "llm_gateway_requests_total", model="gpt", outcome="200") == 1
    assert value(samples, "llm_gateway_upstream_errors_total", provider="main", type="http_503") == 2
    assert value(samples, "llm_gateway_upstream_errors_total", provider="spare", type="http_500") == 1
    assert value(samples, "llm_gateway_fallbacks_total", model="gpt", fallback="backup") == 1
    assert value(samples, "llm_gateway_retries_total", model="gpt", deployment="main/gpt") == 1
    assert value(samples, "llm_gateway_retries_total", model="backup", deployment="spare/spare-model") == 1
    assert value(samples, "llm_gateway_deployment_state", model="gpt", deployment="main/gpt") == 0


@pytest.mark.parametrize("drain", [False, True])
def test_cancelled_stream(fakes: dict[str, FakeUpstream], start: Callable[..., Any], drain: bool) -> None:
    gateway, stub = start(drain_cancelled_streams=drain)
    fakes["main"].stream(chunks(), delay=0.05, hold=not drain)
    call = stub.StreamChatCompletion(_request(stream=True), timeout=30)
    next(call)
    call.cancel()
    deadline = time.monotonic() + 10
    # The service counts the request, then the gRPC layer counts the RPC: wait for both.
    while (
        value(samples := scrape(gateway), "llm_gateway_requests_total", outcome="499") < 1
        or value(samples, "llm_gateway_grpc_server_handled_total", grpc_code="CANCELLED") < 1
    ):
        assert time.monotonic() < deadline, "the cancelled stream was never counted"
        time.sleep(0.05)
    # Drained: the provider's final usage. Closed: no usage arrived, so the gateway counted what had streamed
    # (the prompt, and the role chunk's empty text), marked as estimated.
    reported = tokens(samples, model="gpt", provider="main", usage="reported")
    estimated = tokens(samples, model="gpt", provider="main", usage="estimated")
    assert (reported, estimated) == (((9, 3, 12), (0, 0, 0)) if drain else ((0, 0, 0), (8, 0, 8)))
    assert value(samples, "llm_gateway_requests_in_flight") == 0
    assert value(samples, "llm_gateway_grpc_server_handled_total", grpc_code="CANCELLED") == 1
    if not drain:
        assert fakes["main"].wait_disconnected()


def test_a_stream_whose_client_leaves_while_a_write_waits_is_cancelled_not_unknown(
    fakes: dict[str, FakeUpstream], start: Callable[..., Any]
) -> None:
    """The client reads one message and stops: the server's writes wait on HTTP/2 flow control until the
    client cancels, so the cancellation lands in the handler's write, not in the service. The servicer's
    generator is then closed (GeneratorExit), and that is the client leaving too."""
    gateway, stub = start()
    fakes["main"].stream(chunks(tuple("x" * 16_000 for _ in range(1000))), together=True)
    call = stub.StreamChatCompletion(_request(stream=True), timeout=30)
    next(call)
    time.sleep(0.5)  # the whole upstream body has arrived; the server waits for window to write
    call.cancel()
    deadline = time.monotonic() + 10
    while value(samples := scrape(gateway), "llm_gateway_requests_total", outcome="499") < 1:
        assert time.monotonic() < deadline, "the cancelled stream was never counted"
        time.sleep(0.05)
    deadline = time.monotonic() + 5
    while value(samples, "llm_gateway_grpc_server_handled_total", grpc_method="StreamChatCompletion") < 1:
        assert time.monotonic() < deadline, "the RPC was never counted"
        time.sleep(0.05)
        samples = scrape(gateway)
    assert value(samples, "llm_gateway_grpc_server_handled_total", grpc_code="UNKNOWN") == 0
    assert value(samples, "llm_gateway_grpc_server_handled_total", grpc_code="CANCELLED") == 1


def test_labels_are_never_empty(fakes: dict[str, FakeUpstream], start: Callable[..., Any]) -> None:
    gateway, stub = start()
    for model in ("no-such-model", ""):
        with pytest.raises(grpc.RpcError):
            stub.CreateChatCompletion(REQUEST.decode({"model": model, "messages": [{"role": "user", "content": "x"}]}))
    samples = scrape(gateway)
    assert value(samples, "llm_gateway_requests_total", model="unknown", provider="none", outcome="404") == 1
    assert value(samples, "llm_gateway_requests_total", model="unknown", provider="none", outcome="400") == 1
    for (name, labels), _ in samples.items():
        if name.startswith("llm_gateway_"):
            assert all(v for k, v in labels if k in ("model", "provider")), (name, labels)


def _post_many(gateway: GatewayProcess, count: int) -> None:
    body = b'{"model": "gpt", "messages": [{"role": "user", "content": "hi"}]}'
    for _ in range(count):  # new connections, so both workers serve some
        request = urllib.request.Request(
            f"{gateway.base_url}/v1/chat/completions", data=body, headers={"content-type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200


def test_two_workers_sum(fakes: dict[str, FakeUpstream], gateway_factory: Callable[..., GatewayProcess]) -> None:
    gateway = gateway_factory(_config(fakes), args=("--workers", "2"))
    _post_many(gateway, 20)
    pids = {line["pid"] for line in gateway.log_lines() if line.get("msg") == "chat completion" and "pid" in line}
    assert len(pids) == 2  # both workers served some
    # The scraped worker's own values are current; the other worker's arrive within FLUSH_INTERVAL.
    # One kept-alive connection scrapes one worker only, so the other's counts must come from its timer.
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=5)
    deadline = time.monotonic() + 10 * metrics.FLUSH_INTERVAL
    while True:
        connection.request("GET", "/metrics")
        samples = parse(connection.getresponse().read())
        if value(samples, "llm_gateway_requests_total", model="gpt", outcome="200") >= 20:
            break
        assert time.monotonic() < deadline, "a worker's counts never reached /metrics"
        time.sleep(0.05)
    connection.close()
    assert tokens(samples, model="gpt", provider="main") == (20 * 11, 20 * 7, 20 * 18)
    assert value(samples, "llm_gateway_requests_total", model="gpt", outcome="200") == 20
    assert value(samples, "llm_gateway_request_duration_seconds_count", model="gpt") == 20
    assert value(samples, "llm_gateway_requests_in_flight", model="gpt") == 0


def test_two_workers_write_their_last_counts_when_they_stop(
    fakes: dict[str, FakeUpstream], gateway_factory: Callable[..., GatewayProcess], tmp_path: Path
) -> None:
    """Workers write metric values to their files on a timer: what the last requests counted must still
    be written when a worker stops, or a directory kept across restarts would lose it."""
    directory = tmp_path / "multiproc"
    directory.mkdir()
    gateway = gateway_factory(_config(fakes), args=("--workers", "2"), env={"PROMETHEUS_MULTIPROC_DIR": str(directory)})
    _post_many(gateway, 30)
    assert gateway.stop() == 0  # right after the last answer, well inside one flush interval
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    samples: Samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in registry.collect()
        for sample in family.samples
    }
    assert value(samples, "llm_gateway_requests_total", model="gpt", outcome="200") == 30
    assert tokens(samples, model="gpt", provider="main") == (30 * 11, 30 * 7, 30 * 18)
    assert value(samples, "llm_gateway_request_duration_seconds_count", model="gpt") == 30
    assert value(samples, "llm_gateway_request_duration_seconds_bucket", model="gpt", le="+Inf") == 30
