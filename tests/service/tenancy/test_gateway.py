"""Keys, model access and limits through a real gateway process: REST (curl-like httpx, the openai
SDK) and gRPC stubs, state in the process."""

from __future__ import annotations

import contextlib
import hashlib
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import httpx
import openai
import orjson
import pytest
import yaml
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.errors import STATUS_DETAILS_KEY
from llm_gateway.v1 import chat_pb2, chat_pb2_grpc
from tests.harness import GatewayProcess, free_port, run_cli
from tests.service.tenancy.upstream import HELD, HUNG, UsageUpstream, hold

ALPHA = "sk-gw-alpha-5f1c9e0a7d"
BETA = "sk-gw-beta-8b2d4c6e1f"
SMALL = "sk-gw-small-3a9f7e5c1b"
TPM = "sk-gw-tpm-0d4b8f2a6c"
ONE = "sk-gw-one-7e1a3c5b9d"
GONE = "sk-gw-grpc-one-2c4e6a8b0f"
WRONG = "sk-gw-wrong-9f8e7d6c5b"
PROVIDER_KEY = "sk-provider-secret-4e5f6a"
SECRETS = (ALPHA, BETA, SMALL, TPM, ONE, GONE, WRONG, PROVIDER_KEY)


def tenancy_config(upstream: UsageUpstream, level: str = "INFO") -> dict[str, Any]:
    return {
        "logging": {"level": level},
        "routing": {"retries": 0},
        "providers": {"openai": {"type": "openai", "api_url": upstream.url, "api_key": PROVIDER_KEY}},
        "models": {"gpt-4o": "openai", "mini": "openai", HELD: "openai", HUNG: "openai"},
        "auth": {
            "keys": [
                {"name": "alpha", "key": ALPHA, "models": ["gpt-4o", HELD, "dummy"], "metadata": {"team": "search"}},
                {"name": "beta", "key_sha256": hashlib.sha256(BETA.encode()).hexdigest(), "models": ["mini"]},
                {"name": "small", "key": SMALL, "limits": {"rpm": 2}},
                {"name": "tpm", "key": TPM, "limits": {"tpm": 500}},
                {"name": "one", "key": ONE, "limits": {"max_parallel": 1}},
                {"name": "grpc-one", "key": GONE, "limits": {"max_parallel": 1, "rpm": 1000, "tpm": 100000}},
            ]
        },
        "limits": {"default_max_tokens": 100, "gpt-4o": {"rpm": 1000, "tpm": 1_000_000}},
    }


@pytest.fixture(scope="module")
def gateway(upstream: UsageUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    process = GatewayProcess(tenancy_config(upstream, level="DEBUG"), tmp_path_factory.mktemp("tenancy")).start()
    yield process
    assert process.stop() == 0


@pytest.fixture
def rest(gateway: GatewayProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.base_url, timeout=10) as client:
        yield client


@pytest.fixture
def stub(gateway: GatewayProcess) -> Iterator[Any]:
    with gateway.channel() as channel:
        yield chat_pb2_grpc.ChatServiceStub(channel)


def chat(model: str = "gpt-4o", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "Hello"}], **extra}


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def grpc_request(model: str = "gpt-4o") -> chat_pb2.CreateChatCompletionRequest:
    return chat_pb2.CreateChatCompletionRequest(
        model=model, messages=[chat_pb2.ChatMessage(role="user", content_text="Hello")]
    )


def eventually(check: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.05)


def details(error: grpc.RpcError) -> list[Any]:
    for key, value in error.trailing_metadata() or ():  # type: ignore[attr-defined]
        if key == STATUS_DETAILS_KEY:
            out = []
            for packed in status_pb2.Status.FromString(value).details:
                for kind in (chat_pb2.ErrorDetail, error_details_pb2.RetryInfo, error_details_pb2.QuotaFailure):
                    if packed.Is(kind.DESCRIPTOR):
                        message = kind()
                        packed.Unpack(message)
                        out.append(message)
            return out
    raise AssertionError("no status details")


# ---------------------------------------------------------------- keys


def test_a_missing_or_unknown_key_is_401_invalid_api_key(rest: httpx.Client) -> None:
    for headers in ({}, bearer(WRONG), {"api-key": WRONG}, {"authorization": ALPHA}, {"authorization": "Basic eDp5"}):
        reply = rest.post("/v1/chat/completions", json=chat(), headers=headers)
        assert reply.status_code == 401, headers
        error = reply.json()["error"]
        assert error["type"] == "invalid_request_error" and error["code"] == "invalid_api_key"
        assert error["param"] is None and WRONG not in reply.text and ALPHA not in reply.text
    assert rest.get("/v1/models").status_code == 401


def test_probes_and_docs_stay_open(rest: httpx.Client, gateway: GatewayProcess) -> None:
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.yaml", "/swagger/"):
        assert rest.get(path).status_code == 200, path
    with gateway.channel() as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in answers[0].list_services_response.service}
        assert "llm_gateway.v1.ChatService" in names


def test_bearer_and_api_key_both_work_and_the_key_never_goes_upstream(
    rest: httpx.Client, upstream: UsageUpstream
) -> None:
    upstream.fake.received.clear()
    for headers in (bearer(ALPHA), {"api-key": ALPHA}, {"Authorization": f"bearer {ALPHA}"}):
        reply = rest.post("/v1/chat/completions", json=chat(), headers=headers)
        assert reply.status_code == 200, reply.text
    for received in upstream.fake.received:
        assert received.headers.get("Authorization") == f"Bearer {PROVIDER_KEY}"
        assert ALPHA not in str(received.headers) and ALPHA.encode() not in received.body
    # key_sha256: the config holds only the digest.
    assert rest.post("/v1/chat/completions", json=chat("mini"), headers={"api-key": BETA}).status_code == 200


def test_models_are_listed_and_allowed_per_key(rest: httpx.Client, stub: Any) -> None:
    listed = rest.get("/v1/models", headers=bearer(ALPHA)).json()
    assert [m["id"] for m in listed["data"]] == ["gpt-4o", HELD, "dummy"]
    assert [m["id"] for m in rest.get("/v1/models", headers=bearer(BETA)).json()["data"]] == ["mini"]
    assert len(rest.get("/v1/models", headers=bearer(SMALL)).json()["data"]) == 5  # every model
    grpc_listed = stub.ListModels(chat_pb2.ListModelsRequest(), metadata=(("authorization", f"Bearer {BETA}"),))
    assert [m.id for m in grpc_listed.data] == ["mini"]
    # A model the key may not use is a 404 model_not_found, word for word an unknown model's.
    denied = rest.post("/v1/chat/completions", json=chat("gpt-4o"), headers=bearer(BETA))
    unknown = rest.post("/v1/chat/completions", json=chat("no-such-model"), headers=bearer(BETA))
    assert denied.status_code == unknown.status_code == 404
    assert denied.json()["error"]["code"] == "model_not_found"
    assert denied.text.replace("gpt-4o", "X") == unknown.text.replace("no-such-model", "X")


# ---------------------------------------------------------------- limits and headers


def test_every_chat_response_carries_the_ratelimit_headers(rest: httpx.Client, stub: Any) -> None:
    reply = rest.post("/v1/chat/completions", json=chat(max_tokens=50), headers=bearer(GONE))
    assert reply.status_code == 200
    headers = reply.headers
    assert headers["x-ratelimit-limit-requests"] == "1000"  # the key's and the model's are both 1000
    assert 900 < int(headers["x-ratelimit-remaining-requests"]) < 1000
    assert headers["x-ratelimit-limit-tokens"] == "100000"  # the key's, tighter than the model's
    assert headers["x-ratelimit-reset-requests"].endswith("ms")
    with rest.stream("POST", "/v1/chat/completions", json=chat(stream=True), headers=bearer(GONE)) as streamed:
        assert streamed.status_code == 200
        assert streamed.headers["x-ratelimit-limit-tokens"] == "100000"
        assert b"[DONE]" in streamed.read()
    metadata = (("authorization", f"Bearer {GONE}"),)
    _, call = stub.CreateChatCompletion.with_call(grpc_request(), metadata=metadata, timeout=10)
    initial = dict(call.initial_metadata())
    assert initial["x-ratelimit-limit-requests"] == "1000" and "x-ratelimit-reset-tokens" in initial
    stream = stub.StreamChatCompletion(grpc_request(), metadata=metadata, timeout=10)
    assert "x-ratelimit-remaining-tokens" in dict(stream.initial_metadata())
    assert list(stream)


def test_openai_sdk_sees_rate_limit_and_authentication_errors(gateway: GatewayProcess) -> None:
    client = openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key=SMALL, max_retries=0)
    for _ in range(2):
        client.chat.completions.create(model="mini", messages=[{"role": "user", "content": "Hi"}])
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="mini", messages=[{"role": "user", "content": "Hi"}])
    error = caught.value
    assert error.status_code == 429 and error.code == "rate_limit_exceeded" and error.type == "requests"
    assert error.body["message"].startswith("Rate limit reached for small on requests per min (RPM): Limit 2, Used 2, ")
    assert int(error.response.headers["retry-after"]) in (29, 30)
    assert 0 < int(error.response.headers["retry-after-ms"]) <= 30_000
    with pytest.raises(openai.AuthenticationError) as denied:
        openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key=WRONG, max_retries=0).models.list()
    assert denied.value.code == "invalid_api_key"


def test_a_request_too_large_is_not_retried_by_the_sdk(gateway: GatewayProcess, rest: httpx.Client) -> None:
    client = openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key=TPM, max_retries=3)
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hi"}], max_tokens=900)
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert caught.value.body["message"].startswith("Request too large for tpm on tokens per min (TPM): Limit 500,")
    metrics = rest.get("/metrics").text
    assert 'llm_gateway_rate_limited_total{key="tpm",kind="too_large",scope="key"} 1.0' in metrics
    assert 'llm_gateway_key_requests_total{key="tpm",model="gpt-4o",outcome="429"} 1.0' in metrics  # no retry
    # Within the bucket it passes, and the reservation is settled with the provider's usage.
    assert rest.post("/v1/chat/completions", json=chat(max_tokens=300), headers=bearer(TPM)).status_code == 200


def test_grpc_sees_unauthenticated_and_resource_exhausted_with_details(stub: Any, rest: httpx.Client) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.CreateChatCompletion(grpc_request(), metadata=(("authorization", f"Bearer {WRONG}"),), timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    (detail,) = details(caught.value)
    assert (detail.http_status, detail.type, detail.code) == (401, "invalid_request_error", "invalid_api_key")
    with pytest.raises(grpc.RpcError) as caught:
        stub.ListModels(chat_pb2.ListModelsRequest(), timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as caught:
        stub.CreateChatCompletion(grpc_request("mini"), metadata=(("authorization", f"Bearer {ALPHA}"),), timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    # The SMALL key's two requests a minute are spent by the SDK test, or here.
    metadata = (("authorization", f"Bearer {SMALL}"),)
    codes = []
    for _ in range(3):
        try:
            stub.CreateChatCompletion(grpc_request("mini"), metadata=metadata, timeout=10)
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as error:
            codes.append(error.code())
            last = error
    assert codes[-1] == grpc.StatusCode.RESOURCE_EXHAUSTED
    detail, retry, quota = details(last)
    assert detail.http_status == 429 and detail.type == "requests" and detail.code == "rate_limit_exceeded"
    assert 0 < int(detail.headers["retry-after-ms"]) <= 30_000
    assert 0 < retry.retry_delay.ToMilliseconds() <= 30_000
    assert quota.violations[0].subject == "key:small"
    assert quota.violations[0].description == "requests per min (RPM)"


def test_a_slot_is_released_when_a_rest_stream_is_cancelled(gateway: GatewayProcess, upstream: UsageUpstream) -> None:
    def status() -> int:
        with httpx.Client(base_url=gateway.base_url, timeout=10) as client:
            return client.post("/v1/chat/completions", json=chat(), headers=bearer(ONE)).status_code

    with contextlib.ExitStack() as stack:
        _held = hold(stack, gateway.base_url, bearer(ONE))  # in flight, holding the key's one slot
        refused = httpx.post(f"{gateway.base_url}/v1/chat/completions", json=chat(), headers=bearer(ONE), timeout=10)
        assert refused.status_code == 429
        assert "on parallel requests: Limit 1, Used 1, Requested 1." in refused.json()["error"]["message"]
    eventually(lambda: status() == 200)  # the client went away: the slot came back
    eventually(lambda: upstream.active == 0)


def test_a_slot_is_released_when_a_grpc_stream_is_cancelled(stub: Any, upstream: UsageUpstream) -> None:
    metadata = (("authorization", f"Bearer {GONE}"),)
    held = stub.StreamChatCompletion(grpc_request(HELD), metadata=metadata, timeout=30)
    next(held)
    with pytest.raises(grpc.RpcError) as caught:
        stub.CreateChatCompletion(grpc_request(), metadata=metadata, timeout=10)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    held.cancel()

    def passes() -> bool:
        try:
            stub.CreateChatCompletion(grpc_request(), metadata=metadata, timeout=10)
            return True
        except grpc.RpcError:
            return False

    eventually(passes)


def test_a_slot_is_released_when_a_unary_call_is_abandoned(gateway: GatewayProcess, stub: Any) -> None:
    def passes() -> bool:
        reply = httpx.post(f"{gateway.base_url}/v1/chat/completions", json=chat(), headers=bearer(ONE))
        return reply.status_code == 200

    # REST: the client gives up on a call that never answers, and goes away.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{gateway.base_url}/v1/chat/completions", json=chat(HUNG), headers=bearer(ONE), timeout=1)
    eventually(passes)
    # gRPC: the call's deadline passes.
    with pytest.raises(grpc.RpcError) as caught:
        stub.CreateChatCompletion(grpc_request(HUNG), metadata=(("authorization", f"Bearer {ONE}"),), timeout=1)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    eventually(passes)


def test_per_key_metrics_and_access_log(rest: httpx.Client, gateway: GatewayProcess) -> None:
    reply = rest.post("/v1/chat/completions", json=chat("dummy"), headers=bearer(ALPHA))
    usage = reply.json()["usage"]
    rid = reply.headers["x-request-id"]
    line = gateway.wait_log(lambda entry: entry.get("request_id") == rid and entry.get("msg") == "chat completion")
    assert line["key"] == "alpha" and line["key_metadata"] == {"team": "search"}
    metrics = rest.get("/metrics").text
    prompt = f'llm_gateway_key_tokens_total{{key="alpha",model="dummy",type="prompt"}} {float(usage["prompt_tokens"])}'
    assert prompt in metrics
    assert 'llm_gateway_key_requests_total{key="alpha",model="dummy",outcome="200"} 1.0' in metrics
    assert 'llm_gateway_key_tokens_total{key="alpha",model="dummy",type="completion"}' in metrics


def test_no_debug_log_line_holds_a_key(rest: httpx.Client, gateway: GatewayProcess, stub: Any) -> None:
    for key in SECRETS:
        rest.post("/v1/chat/completions", json=chat(), headers=bearer(key))
        rest.post("/v1/chat/completions", json=chat(stream=True), headers={"api-key": key})
        rest.get("/v1/models", headers=bearer(key))
        with contextlib.suppress(grpc.RpcError):
            stub.ListModels(chat_pb2.ListModelsRequest(), metadata=(("authorization", f"Bearer {key}"),), timeout=5)
    text = gateway.log_text()
    assert '"level":"DEBUG"' in text  # the gateway did log at DEBUG
    for secret in SECRETS:
        assert secret not in text
        assert secret[8:] not in text  # nor a telling part of one


# ---------------------------------------------------------------- process modes and start-up


def test_through_a_remote_service_the_facade_only_carries_the_key(
    upstream: UsageUpstream, tmp_path_factory: pytest.TempPathFactory
) -> None:
    workdir = tmp_path_factory.mktemp("remote")
    service = GatewayProcess(tenancy_config(upstream), workdir, args=("--grpc-only",)).start()
    try:
        facade = GatewayProcess(
            {"logging": {"level": "INFO"}}, workdir, args=("--grpc-target", service.grpc_address)
        ).start(wait_grpc=False)
        try:
            with httpx.Client(base_url=facade.base_url, timeout=10) as client:
                assert client.post("/v1/chat/completions", json=chat()).json()["error"]["code"] == "invalid_api_key"
                ok = client.post("/v1/chat/completions", json=chat("mini"), headers=bearer(SMALL))
                assert ok.status_code == 200 and ok.headers["x-ratelimit-limit-requests"] == "2"
                client.post("/v1/chat/completions", json=chat("mini"), headers=bearer(SMALL))
                refused = client.post("/v1/chat/completions", json=chat("mini"), headers={"api-key": SMALL})
                assert refused.status_code == 429 and refused.json()["error"]["type"] == "requests"
                assert int(refused.headers["retry-after"]) >= 1 and int(refused.headers["retry-after-ms"]) > 0
                listed = client.get("/v1/models", headers=bearer(BETA)).json()
                assert [m["id"] for m in listed["data"]] == ["mini"]
        finally:
            assert facade.stop() == 0
    finally:
        assert service.stop() == 0


def test_with_workers_and_no_redis_each_worker_enforces_its_share(
    upstream: UsageUpstream, gateway_factory: Callable[..., GatewayProcess]
) -> None:
    config = tenancy_config(upstream)
    config["auth"]["keys"] = [{"name": "shared", "key": SMALL, "limits": {"rpm": 10}}]
    gateway = gateway_factory(config, args=("--workers", "2"))
    notice = gateway.wait_log(lambda line: line["msg"].startswith("rate limits are held per worker"))
    assert "each of the 2 workers enforces 1/2 of every limit" in notice["msg"] and notice["level"] == "WARN"
    replies = [
        httpx.post(f"{gateway.base_url}/v1/chat/completions", json=chat("mini"), headers=bearer(SMALL), timeout=10)
        for _ in range(24)
    ]
    admitted = [r for r in replies if r.status_code == 200]
    assert 5 <= len(admitted) <= 10
    assert all(r.headers["x-ratelimit-limit-requests"] == "5" for r in admitted)
    by_worker: dict[int, int] = {}
    for line in gateway.log_lines():
        if line.get("key") == "shared" and line.get("status") == 200:
            by_worker[line["pid"]] = by_worker.get(line["pid"], 0) + 1
    assert all(count <= 5 for count in by_worker.values()), by_worker


def test_startup_warns_when_auth_is_off_beyond_loopback(
    upstream: UsageUpstream, gateway_factory: Callable[..., GatewayProcess], tmp_path: Any
) -> None:
    def notes(config: dict[str, Any] | None) -> list[dict[str, Any]]:
        # A documentation address (TEST-NET-1) is not this machine's: the gateway logs its start-up notes,
        # then cannot bind and exits. Nothing listens beyond loopback, nothing is sent anywhere.
        args = []
        if config is not None:
            path = tmp_path / f"config-{len(list(tmp_path.iterdir()))}.yml"
            path.write_text(yaml.safe_dump(config))
            args = ["--config", str(path)]
        result = run_cli(args, env={"SERVER_HOST": "192.0.2.1", "SERVER_PORT": str(free_port())}, cwd=tmp_path)
        assert result.returncode != 0
        return [orjson.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]

    warning = [line for line in notes(None) if line["msg"].startswith("auth is off")]
    assert len(warning) == 1 and warning[0]["level"] == "WARN" and warning[0]["host"] == "192.0.2.1"
    assert not any(line["msg"].startswith("auth is off") for line in notes(tenancy_config(upstream)))
    loopback = gateway_factory(None)  # no keys, on loopback: nothing to warn about
    loopback.wait_log(lambda line: line["msg"] == "llm-gateway starting")
    assert not any(line["msg"].startswith("auth is off") for line in loopback.log_lines())


def test_a_config_reload_keeps_the_limits_and_the_slots_in_use(upstream: UsageUpstream, tmp_path: Any) -> None:
    config = tenancy_config(upstream)
    config["server"] = {"watch_config": False}
    config["auth"]["keys"] = [{"name": "kept", "key": ONE, "limits": {"rpm": 3, "max_parallel": 1}}]
    gateway = GatewayProcess(config, tmp_path).start()
    try:
        with contextlib.ExitStack() as stack:
            _held = hold(stack, gateway.base_url, bearer(ONE))  # one of the 3 requests, and the slot, held
            config["models"]["later"] = "openai"  # any change
            assert gateway.config_path is not None and gateway.process is not None
            gateway.config_path.write_text(yaml.safe_dump(config))
            gateway.process.send_signal(signal.SIGHUP)
            gateway.wait_log(lambda line: line["msg"] == "config reloaded")
            refused = httpx.post(f"{gateway.base_url}/v1/chat/completions", json=chat(), headers=bearer(ONE))
            assert refused.status_code == 429 and "parallel requests" in refused.json()["error"]["message"]
        eventually(lambda: upstream.active == 0)
        statuses = [
            httpx.post(f"{gateway.base_url}/v1/chat/completions", json=chat(), headers=bearer(ONE)).status_code
            for _ in range(3)
        ]
        assert statuses == [200, 200, 429]  # the bucket was not refilled by the reload
    finally:
        assert gateway.stop() == 0
