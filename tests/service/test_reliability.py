"""Retries, fallbacks, timeouts, cooldowns and load balancing, proven against a fault-injecting fake
upstream: real HTTP servers on loopback, driven by the test, and a real gateway process."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.jsonpb import MessageCodec
from llm_gateway.v1 import chat_pb2, chat_pb2_grpc
from tests.fakes.upstream import FakeUpstream, chunks, completion
from tests.harness import GatewayProcess

REQUEST = MessageCodec.for_type(chat_pb2.CreateChatCompletionRequest)
UNARY = REQUEST.decode({"model": "main", "messages": [{"role": "user", "content": "hi"}]})
STREAM = REQUEST.decode({"model": "main", "messages": [{"role": "user", "content": "hi"}], "stream": True})
RATE_LIMITED = {"error": {"message": "slow down", "type": "requests", "param": None, "code": "rate_limit_exceeded"}}


@pytest.fixture
def fakes() -> Iterator[dict[str, FakeUpstream]]:
    servers = {name: FakeUpstream().start() for name in ("a", "b", "backup")}
    yield servers
    for server in servers.values():
        server.stop()


def _config(fakes: dict[str, FakeUpstream], **routing: Any) -> dict[str, Any]:
    timeouts = {"first_token": 1.0, "total": 3.0}
    return {
        "routing": {"retries": 2, "backoff_initial": 0.01, "backoff_max": 0.05, **routing},
        "providers": {name: {"type": "openai", "api_url": f"{fake.url}/v1"} for name, fake in fakes.items()},
        "models": {
            "main": {
                "deployments": [
                    {"provider": "a", "name": "a", "timeouts": timeouts},
                    {"provider": "b", "name": "b", "weight": 0, "timeouts": timeouts},
                ],
                "fallback": ["spare"],
            },
            "solo": {"deployments": [{"provider": "a", "name": "solo-a", "timeouts": timeouts}]},
            "spare": {"provider": "backup", "model": "spare-upstream"},
        },
    }


@pytest.fixture
def start(fakes: dict[str, FakeUpstream], gateway_factory: Callable[..., GatewayProcess]) -> Callable[..., Any]:
    def start(**routing: Any) -> chat_pb2_grpc.ChatServiceStub:
        gateway = gateway_factory(_config(fakes, **routing), args=("--grpc-only",))
        channel = gateway.channel()
        return chat_pb2_grpc.ChatServiceStub(channel)

    return start


def _unary(
    stub: chat_pb2_grpc.ChatServiceStub, request: chat_pb2.CreateChatCompletionRequest = UNARY, timeout: float = 20
) -> tuple[chat_pb2.ChatCompletion, dict[str, str]]:
    response, call = stub.CreateChatCompletion.with_call(request, timeout=timeout)
    return response, dict(call.initial_metadata())


def _deployment_state(gateway: GatewayProcess, model: str, deployment: str) -> float:
    families = text_string_to_metric_families(httpx.get(f"{gateway.base_url}/metrics", timeout=10).text)
    return next(
        sample.value
        for family in families
        for sample in family.samples
        if sample.name == "llm_gateway_deployment_state" and sample.labels == {"model": model, "deployment": deployment}
    )


def _served(metadata: dict[str, str]) -> tuple[str, str, str]:
    """What answered: the model, the deployment, and after how many attempts."""
    return metadata["x-llm-gateway-model"], metadata["x-llm-gateway-deployment"], metadata["x-llm-gateway-attempts"]


def test_retry_on_500_then_success(fakes: dict[str, FakeUpstream], start: Callable[..., Any]) -> None:
    stub = start()
    fakes["a"].script(fakes["a"].replying(500, {"error": {"message": "boom", "type": "server_error"}}))
    fakes["b"].script(fakes["b"].replying(502, b"bad gateway", content_type="text/plain"))
    response, metadata = _unary(stub)
    assert response.choices[0].message.content == "Hello!"
    assert metadata["x-llm-gateway-attempts"] == "3"
    assert metadata["x-llm-gateway-model"] == "main"
    assert len(fakes["a"].received) + len(fakes["b"].received) == 3
    assert not fakes["backup"].received


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 422])
def test_client_errors_are_not_retried(fakes: dict[str, FakeUpstream], start: Callable[..., Any], status: int) -> None:
    stub = start()
    fakes["a"].reply(status, {"error": {"message": f"no {status}", "type": "invalid_request_error"}})
    with pytest.raises(grpc.RpcError) as info:
        _unary(stub)
    assert info.value.details() == f"no {status}"
    assert len(fakes["a"].received) == 1
    assert not fakes["b"].received and not fakes["backup"].received


def test_retry_after_is_honoured(fakes: dict[str, FakeUpstream], start: Callable[..., Any]) -> None:
    stub = start()
    fakes["a"].script(fakes["a"].replying(429, RATE_LIMITED, headers={"retry-after": "1"}))
    request = REQUEST.decode({"model": "solo", "messages": [{"role": "user", "content": "hi"}]})
    _, metadata = _unary(stub, request)
    first, second = fakes["a"].received
    assert second.at - first.at >= 0.95
    assert metadata["x-llm-gateway-attempts"] == "2"


def test_retry_after_beyond_the_deadline_is_not_waited_for(
    fakes: dict[str, FakeUpstream], start: Callable[..., Any]
) -> None:
    stub = start()
    fakes["a"].reply(429, RATE_LIMITED, headers={"retry-after": "30"})
    request = REQUEST.decode({"model": "solo", "messages": [{"role": "user", "content": "hi"}]})
    with pytest.raises(grpc.RpcError) as info:
        _unary(stub, request, timeout=5)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info.value.details() == "slow down"
    assert len(fakes["a"].received) == 1


@pytest.mark.parametrize(
    "fault",
    [
        "hang",
        "trickle",
        "cut",
        "invalid_json",
        "html",
        "503",
        "refused",
    ],
)
def test_each_fault_is_retried_on_the_other_deployment(
    fakes: dict[str, FakeUpstream], start: Callable[..., Any], fault: str
) -> None:
    a, b = fakes["a"], fakes["b"]
    handlers = {
        "hang": a.hanging(),
        "trickle": a.trickling(completion(), delay=0.2),
        "cut": a.cutting(completion()),
        "invalid_json": a.replying(200, b'{"id": "x", "choices": [tru'),
        "html": a.replying(200, b"<html><body>Welcome</body></html>", content_type="text/html"),
        "503": a.replying(503, b"Service Unavailable", content_type="text/plain"),
    }
    if fault == "refused":
        a.stop()
    else:
        a.handler = handlers[fault]
    b.reply(200, completion("from b"))
    stub = start(retries=1)
    response, metadata = _unary(stub)
    assert response.choices[0].message.content == "from b"
    assert metadata["x-llm-gateway-deployment"] == "b"
    assert metadata["x-llm-gateway-attempts"] == "2"


def test_fallback_when_every_deployment_fails(fakes: dict[str, FakeUpstream], start: Callable[..., Any]) -> None:
    stub = start(retries=1)
    for name in ("a", "b"):
        fakes[name].reply(503, {"error": {"message": "down", "type": "server_error"}})
    fakes["backup"].reply(200, completion("from the spare"))
    response, metadata = _unary(stub)
    assert response.choices[0].message.content == "from the spare"
    assert _served(metadata) == ("spare", "backup/spare-upstream", "3")
    assert fakes["backup"].last().json["model"] == "spare-upstream"


def test_exhausted_retries_return_the_last_error(fakes: dict[str, FakeUpstream], start: Callable[..., Any]) -> None:
    stub = start(retries=1)
    for name in ("a", "b", "backup"):
        fakes[name].reply(500, {"error": {"message": f"{name} is down", "type": "server_error"}})
    with pytest.raises(grpc.RpcError) as info:
        _unary(stub)
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert info.value.details() == "backup is down"
    assert len(fakes["a"].received) + len(fakes["b"].received) == 2
    assert len(fakes["backup"].received) == 2


def test_stream_failing_before_its_first_chunk_falls_back(
    fakes: dict[str, FakeUpstream], start: Callable[..., Any]
) -> None:
    stub = start(retries=1)
    fakes["a"].handler = fakes["a"].streaming([], done=False, drop=True)
    fakes["b"].reply(429, RATE_LIMITED)
    fakes["backup"].stream(chunks(("spare",)))
    call = stub.StreamChatCompletion(STREAM, timeout=20)
    text = "".join(c.choices[0].delta.content for c in call if c.choices)
    assert text == "spare"
    assert dict(call.initial_metadata())["x-llm-gateway-model"] == "spare"


@pytest.mark.parametrize("drop", [True, False], ids=["half-stream-then-drop", "no-done"])
def test_stream_failing_after_its_first_chunk_is_not_spliced(
    fakes: dict[str, FakeUpstream], start: Callable[..., Any], drop: bool
) -> None:
    stub = start(retries=2)
    fakes["a"].handler = fakes["a"].streaming(chunks()[:3], done=False, drop=drop, delay=0.05)
    fakes["backup"].stream(chunks(("spliced",)))
    received = []
    with pytest.raises(grpc.RpcError) as info:
        for chunk in stub.StreamChatCompletion(STREAM, timeout=20):
            received.append(chunk)
    assert len(received) == 3
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(fakes["a"].received) == 1
    assert not fakes["b"].received and not fakes["backup"].received


def test_cooldown_skips_a_failing_deployment_then_tries_it_again(
    fakes: dict[str, FakeUpstream], start: Callable[..., Any]
) -> None:
    stub = start(retries=1, cooldown_failures=2, cooldown_window=60, cooldown_seconds=1.5)
    a = fakes["a"]
    a.reply(500, {"error": {"message": "a is down", "type": "server_error"}})
    for _ in range(2):  # a fails twice (each request then succeeds on b): a cools down
        _, metadata = _unary(stub)
        assert metadata["x-llm-gateway-deployment"] == "b"
    assert len(a.received) == 2
    _, metadata = _unary(stub)  # a is skipped: b answers at once, although a has all the weight
    assert metadata["x-llm-gateway-attempts"] == "1" and metadata["x-llm-gateway-deployment"] == "b"
    assert len(a.received) == 2
    a.reply(200, completion("a is back"))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # after the cooldown, a gets a trial request, and heals
        response, metadata = _unary(stub)
        if metadata["x-llm-gateway-deployment"] == "a":
            break
        time.sleep(0.1)
    assert response.choices[0].message.content == "a is back"
    _, metadata = _unary(stub)
    assert metadata["x-llm-gateway-deployment"] == "a"


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_seed_config_three_503s_then_the_upstream_recovers_the_next_request_succeeds(
    fakes: dict[str, FakeUpstream], gateway_factory: Callable[..., GatewayProcess], stream: bool
) -> None:
    # The seed config's shape: one provider, one deployment per model, routing at its defaults.
    upstream = fakes["a"]
    config = {
        "providers": {"openai": {"api_url": f"{upstream.url}/v1", "api_key": "sk-test", "is_openai_compatible": True}},
        "models": {"gpt-4o-mini": "openai"},
    }
    gateway = gateway_factory(config)
    down = {"error": {"message": "overloaded", "type": "server_error", "param": None, "code": None}}
    upstream.script(*(upstream.replying(503, down) for _ in range(3)))
    upstream.by_stream_flag()
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    url = f"{gateway.base_url}/v1/chat/completions"
    first = httpx.post(url, json=body, timeout=30)
    assert first.status_code == 503
    assert first.json()["error"]["message"] == "overloaded"  # the upstream's own error
    assert len(upstream.received) == 3
    assert _deployment_state(gateway, "gpt-4o-mini", "openai/gpt-4o-mini") == 1  # cooling down

    second = httpx.post(url, json=body, timeout=30)
    assert second.status_code == 200, second.text
    assert ("data: [DONE]" in second.text) if stream else second.json()["choices"][0]["message"]["content"]
    assert len(upstream.received) == 4
    assert _deployment_state(gateway, "gpt-4o-mini", "openai/gpt-4o-mini") == 0  # the trial closed the breaker


def test_cooldown_keeps_avoiding_a_failing_deployment_while_another_is_healthy(
    fakes: dict[str, FakeUpstream], gateway_factory: Callable[..., GatewayProcess]
) -> None:
    config = _config(fakes, retries=1, cooldown_failures=2, cooldown_seconds=30)
    config["models"]["main"]["deployments"][1]["weight"] = 1
    config["models"]["main"]["load_balancing"] = "least_inflight"  # a tie goes to a: it is tried until benched
    gateway = gateway_factory(config, args=("--grpc-only",))
    stub = chat_pb2_grpc.ChatServiceStub(gateway.channel())
    fakes["a"].reply(503, {"error": {"message": "a is down", "type": "server_error"}})
    served = [_unary(stub)[1] for _ in range(20)]
    assert {m["x-llm-gateway-deployment"] for m in served} == {"b"}
    assert len(fakes["a"].received) == 2  # its two failures benched it; it got no trial while b was healthy
    assert [m["x-llm-gateway-attempts"] for m in served] == ["2", "2"] + ["1"] * 18
    assert not fakes["backup"].received


def test_when_the_whole_chain_cools_down_the_soonest_to_recover_gets_the_request(
    fakes: dict[str, FakeUpstream], start: Callable[..., Any]
) -> None:
    stub = start(retries=1, cooldown_failures=1, cooldown_seconds=30)
    a, b, backup = fakes["a"], fakes["b"], fakes["backup"]
    for name, fake in fakes.items():
        fake.reply(500, {"error": {"message": f"{name} is down", "type": "server_error"}})
    with pytest.raises(grpc.RpcError) as info:  # a, b, then the fallback fail, in that order: all cool down
        _unary(stub)
    assert info.value.details() == "backup is down"
    assert (len(a.received), len(b.received), len(backup.received)) == (1, 1, 1)

    # a cooled first, so it ends first: its trial fails, and the client gets a's own error.
    with pytest.raises(grpc.RpcError) as info:
        _unary(stub)
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert info.value.details() == "a is down"
    assert (len(a.received), len(b.received), len(backup.received)) == (2, 1, 1)

    # a cools down again, from now: b's cooldown ends first. b has recovered: its trial heals it.
    b.reply(200, completion("b is back"))
    response, metadata = _unary(stub)
    assert response.choices[0].message.content == "b is back"
    assert _served(metadata) == ("main", "b", "1")
    b.stream(chunks(("healthy",)))
    call = stub.StreamChatCompletion(STREAM, timeout=20)
    assert "".join(c.choices[0].delta.content for c in call if c.choices) == "healthy"
    assert dict(call.initial_metadata())["x-llm-gateway-deployment"] == "b"
    assert (len(a.received), len(backup.received)) == (2, 1)


def test_when_a_fallback_recovers_first_the_model_is_served_by_its_trial(
    fakes: dict[str, FakeUpstream], start: Callable[..., Any]
) -> None:
    stub = start(retries=0, cooldown_failures=1, cooldown_seconds=30)
    for fake in fakes.values():
        fake.script(fake.replying(503, {"error": {"message": "busy", "type": "server_error"}}))
    spare = REQUEST.decode({"model": "spare", "messages": [{"role": "user", "content": "hi"}]})
    for request in (spare, UNARY, UNARY):  # the spare's deployment cools down first, then a, then b
        with pytest.raises(grpc.RpcError) as info:
            _unary(stub, request)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE and info.value.details() == "busy"
    assert [len(fake.received) for fake in fakes.values()] == [1, 1, 1]
    response, metadata = _unary(stub)
    assert response.choices[0].message.content == "Hello!"
    assert _served(metadata) == ("spare", "backup/spare-upstream", "1")
    assert [len(fake.received) for fake in fakes.values()] == [1, 1, 2]


def test_weighted_balancing_follows_the_weights(fakes: dict[str, FakeUpstream], start: Callable[..., Any]) -> None:
    stub = start()
    for _ in range(20):
        _unary(stub)
    assert len(fakes["a"].received) == 20 and not fakes["b"].received  # b has weight 0


def test_least_inflight_spreads_concurrent_requests(
    fakes: dict[str, FakeUpstream], gateway_factory: Callable[..., GatewayProcess]
) -> None:
    config = _config(fakes)
    config["models"]["main"]["load_balancing"] = "least_inflight"
    for fake in (fakes["a"], fakes["b"]):
        fake.handler = fake.trickling(completion(), delay=0.002)
    gateway = gateway_factory(config, args=("--grpc-only",))
    stub = chat_pb2_grpc.ChatServiceStub(gateway.channel())
    threads = [threading.Thread(target=_unary, args=(stub,)) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(fakes["a"].received) == 3 and len(fakes["b"].received) == 3


def test_client_cancel_during_backoff_cancels_the_retry(
    fakes: dict[str, FakeUpstream], start: Callable[..., Any]
) -> None:
    stub = start()
    fakes["a"].reply(429, RATE_LIMITED, headers={"retry-after": "2"})
    request = REQUEST.decode({"model": "solo", "messages": [{"role": "user", "content": "hi"}]})
    future = stub.CreateChatCompletion.future(request, timeout=20)
    fakes["a"].last()  # the first attempt has arrived; the gateway now waits 2 s before the next
    time.sleep(0.3)
    future.cancel()
    time.sleep(2.5)
    assert len(fakes["a"].received) == 1


def test_a_stream_past_its_deadline_leaves_balancing_state_clean(
    fakes: dict[str, FakeUpstream], gateway_factory: Callable[..., GatewayProcess]
) -> None:
    config = _config(fakes)
    config["models"]["main"]["load_balancing"] = "least_inflight"
    config["models"]["main"]["deployments"][1]["weight"] = 1
    gateway = gateway_factory(config, args=("--grpc-only",))
    stub = chat_pb2_grpc.ChatServiceStub(gateway.channel())
    fakes["a"].stream(chunks(), delay=1.0)  # slower than the client's deadline
    with pytest.raises(grpc.RpcError) as info:  # a tie goes to the first deployment, a
        list(stub.StreamChatCompletion(STREAM, timeout=1.5))
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert len(fakes["a"].received) == 1 and not fakes["b"].received
    fakes["a"].reply(200, completion())
    # Had the timed-out stream kept counting as in flight on a, least_inflight would now send everything to b.
    served = {_unary(stub)[1]["x-llm-gateway-deployment"] for _ in range(3)}
    assert served == {"a"}
