"""Budgets through real gateway processes: spent across two replicas sharing a real Redis, in the process
without Redis, per team, with Redis stopped (when_state_down), and reseeded from the ledger exactly.

Prices and usage are chosen so that the arithmetic is exact. gpt-4o is priced at USD 1000 per 1M tokens
in and out (1000 micro-dollars a token); the fake upstream reports 11 prompt and 7 completion tokens, so
each call costs 18 000 micro-dollars. A request of "Hello" with max_tokens 7 reserves its estimate
(1 + 4 + 3 = 8 prompt tokens) plus 7: 15 000. With a budget of USD 0.09, the k-th call (from 0) passes
while 18 000 k + 15 000 <= 90 000: calls 0-4 pass, spending exactly 90 000, and the sixth is refused.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest
from google.rpc import error_details_pb2

from llm_gateway.v1 import chat_pb2, chat_pb2_grpc
from service.tenancy.budgets import period_of
from tests.fakes.upstream import FakeUpstream
from tests.harness import GatewayProcess, replicas
from tests.service.tenancy.conftest import RedisServer
from tests.service.tenancy.test_gateway import details

ALPHA = "sk-gw-alpha-0123456789"
BETA = "sk-gw-beta-9876543210"
GAMMA = "sk-gw-gamma-5647382910"
FREE = "sk-gw-free-1029384756"
COST = 18_000
PASSING = 5  # calls within a USD 0.09 budget (see the module's docstring)


def config(tmp: Path, redis: RedisServer | None, upstream: FakeUpstream, **budgets: Any) -> dict[str, Any]:
    return {
        "logging": {"level": "DEBUG"},
        "routing": {"retries": 0},
        "providers": {"openai": {"type": "openai", "api_url": f"{upstream.url}/v1", "api_key": "sk-provider-0000"}},
        "models": {"gpt-4o": {"provider": "openai", "price": {"input": 1000, "output": 1000}}},
        "auth": {
            "keys": [
                {"name": "alpha", "key": ALPHA, "budget": {"usd": 0.09, "period": "month"}},
                {"name": "beta", "key": BETA, "metadata": {"team": "search"}},
                {"name": "gamma", "key": GAMMA, "metadata": {"team": "search"}},
                {"name": "free", "key": FREE},
            ],
            "teams": {"search": {"budget": {"usd": 0.054, "period": "day"}}},
        },
        "state": {"redis_url": redis.url if redis is not None else "", "timeout": 2.0},
        "usage": {"database": f"sqlite:///{tmp}/usage.db", "flush_interval": 0.05},
        "budgets": {"metrics_interval": 0.2, **budgets},
    }


@pytest.fixture
def redis(redis_server: RedisServer) -> RedisServer:
    return redis_server


@pytest.fixture
def fake() -> Iterator[FakeUpstream]:
    """A fake upstream whose every answer has the same usage (the tenancy conftest's `upstream` varies it)."""
    server = FakeUpstream().start()
    yield server
    server.stop()


def assert_no_key_logged(*gateways: GatewayProcess) -> None:
    for gateway in gateways:
        text = gateway.log_text()  # at DEBUG
        assert "budget" in text
        assert all(key not in text for key in (ALPHA, BETA, GAMMA, FREE))


def client(gateway: GatewayProcess, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key=key, max_retries=2)


def ask(gateway: GatewayProcess, key: str) -> Any:
    return client(gateway, key).chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "Hello"}], max_tokens=7
    )


def refused(gateway: GatewayProcess, key: str) -> openai.RateLimitError:
    with pytest.raises(openai.RateLimitError) as caught:
        ask(gateway, key)
    return caught.value


def assert_insufficient_quota(error: openai.RateLimitError, who: str) -> None:
    assert error.status_code == 429
    assert error.code == "insufficient_quota"
    body = error.response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    assert (body["type"], body["code"], body["param"]) == ("insufficient_quota", "insufficient_quota", None)
    assert f"the budget of {who} for " in body["message"]
    assert error.response.headers["x-should-retry"] == "false"
    assert "retry-after" not in error.response.headers


def budget_refusals(gateways: list[GatewayProcess]) -> float:
    total = 0.0
    for gateway in gateways:
        for line in httpx.get(f"{gateway.base_url}/metrics").text.splitlines():
            if line.startswith("llm_gateway_rate_limited_total{") and 'kind="budget"' in line:
                total += float(line.rsplit(" ", 1)[1])
    return total


def quota_refusals(gateways: list[GatewayProcess]) -> int:
    return sum(
        1
        for gateway in gateways
        for line in gateway.log_lines()
        if line.get("msg") == "chat completion" and line.get("error_type") == "insufficient_quota"
    )


def ledger(tmp: Path, key: str) -> tuple[int, int]:
    """(calls, micro-dollars) the ledger holds for a key."""
    path = tmp / "usage.db"
    if not path.exists():
        return 0, 0
    with contextlib.closing(sqlite3.connect(path)) as conn:
        try:
            count, cost = conn.execute(
                "SELECT count(*), coalesce(sum(cost_micro), 0) FROM llm_gateway_usage WHERE key_name = ?", (key,)
            ).fetchone()
        except sqlite3.OperationalError:  # not created yet
            return 0, 0
    return int(count), int(cost)


def eventually(check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.05)


def counter(redis: RedisServer, scope: str, owner: str, period: str) -> int | None:
    label = period_of(period, time.time())[0]
    reply = redis.command("GET", f"{{llm-gateway}}:budget:{scope}:{owner}:{label}")
    if reply.startswith(b"$-1"):
        return None
    return int(reply.split(b"\r\n")[1])


def test_a_budget_spent_across_two_replicas_sharing_redis(
    tmp_path: Path, redis: RedisServer, fake: FakeUpstream
) -> None:
    with replicas(config(tmp_path, redis, fake), tmp_path, count=2, args=("--workers", "2")) as (one, two):
        for index in range(PASSING):
            reply = ask((one, two)[index % 2], ALPHA)
            assert reply.choices[0].message.content == "Hello!"
        error = refused((one, two)[PASSING % 2], ALPHA)
        assert_insufficient_quota(error, "alpha")
        # The SDK took x-should-retry: false at its word: one refusal (each call's access line is written
        # before its answer leaves), and no call reached the upstream.
        assert quota_refusals([one, two]) == 1
        assert len(fake.received) == PASSING
        eventually(lambda: budget_refusals([one, two]) == 1)  # other workers' metrics are flushed every 0.5 s
        # The other replica refuses too, and over gRPC it is RESOURCE_EXHAUSTED with a QuotaFailure.
        assert_insufficient_quota(refused(one, ALPHA), "alpha")
        with two.channel() as channel:
            stub: Any = chat_pb2_grpc.ChatServiceStub(channel)  # type: ignore[no-untyped-call]
            request = chat_pb2.CreateChatCompletionRequest(
                model="gpt-4o", max_tokens=7, messages=[chat_pb2.ChatMessage(role="user", content_text="Hello")]
            )
            with pytest.raises(grpc.RpcError) as caught:
                stub.CreateChatCompletion(request, metadata=(("authorization", f"Bearer {ALPHA}"),))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
        found = details(caught.value)
        violations = [
            v for quota in found if isinstance(quota, error_details_pb2.QuotaFailure) for v in quota.violations
        ]
        assert not any(isinstance(detail, error_details_pb2.RetryInfo) for detail in found)
        assert [v.subject for v in violations] == ["key:alpha"]
        assert len(fake.received) == PASSING
        # A key without a budget is not held back by another's.
        assert ask(one, FREE).choices
        # The counter holds exactly what was spent, as does the ledger.
        eventually(lambda: ledger(tmp_path, "alpha") == (PASSING + 3, PASSING * COST))
        eventually(lambda: counter(redis, "key", "alpha", "month") == PASSING * COST)
        assert_no_key_logged(one, two)


def test_a_budget_in_the_process_without_redis_survives_a_restart(tmp_path: Path, fake: FakeUpstream) -> None:
    settings = config(tmp_path, None, fake)
    with replicas(settings, tmp_path) as (gateway,):
        for _ in range(PASSING - 2):
            ask(gateway, ALPHA)
    # A new process seeds its counter from the ledger: it does not start from zero.
    with replicas(settings, tmp_path) as (gateway,):
        ask(gateway, ALPHA)
        ask(gateway, ALPHA)
        assert_insufficient_quota(refused(gateway, ALPHA), "alpha")
        assert budget_refusals([gateway]) == 1
        assert len(fake.received) == PASSING


def test_a_team_budget_holds_its_keys_together(tmp_path: Path, redis: RedisServer, fake: FakeUpstream) -> None:
    # USD 0.054 for the team: 18 000 k + 15 000 <= 54 000 lets calls 0-2 pass.
    with replicas(config(tmp_path, redis, fake), tmp_path) as (gateway,):
        ask(gateway, BETA)
        ask(gateway, GAMMA)
        ask(gateway, BETA)
        assert_insufficient_quota(refused(gateway, GAMMA), "team search")
        assert_insufficient_quota(refused(gateway, BETA), "team search")
        assert len(fake.received) == 3
        eventually(lambda: counter(redis, "team", "search", "day") == 3 * COST)
        # The budget gauges come from the ledger, off the request path.
        expected = {
            'llm_gateway_budget_spent_usd{name="search",scope="team"}': 0.054,
            'llm_gateway_budget_limit_usd{name="search",scope="team"}': 0.054,
            'llm_gateway_budget_limit_usd{name="alpha",scope="key"}': 0.09,
        }

        def gauges() -> bool:
            lines = httpx.get(f"{gateway.base_url}/metrics").text.splitlines()
            values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in lines if line[:1] != "#"}
            return all(values.get(name) == pytest.approx(value) for name, value in expected.items())

        eventually(gauges)


@pytest.mark.parametrize("when", ["allow", "deny"])
def test_budgets_with_redis_stopped_follow_when_state_down(
    tmp_path: Path, redis: RedisServer, fake: FakeUpstream, when: str
) -> None:
    with replicas(config(tmp_path, redis, fake, when_state_down=when), tmp_path) as (gateway,):
        for _ in range(PASSING):
            ask(gateway, ALPHA)
        assert_insufficient_quota(refused(gateway, ALPHA), "alpha")
        redis.stop()
        for _ in range(2):  # applied each time, not once
            if when == "allow":
                assert ask(gateway, ALPHA).choices
            else:
                reply = httpx.post(
                    f"{gateway.base_url}/v1/chat/completions",
                    json={"model": "gpt-4o", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 7},
                    headers={"authorization": f"Bearer {ALPHA}"},
                )
                assert reply.status_code == 503
                assert reply.json()["error"]["code"] == "budget_unavailable"
        assert ask(gateway, FREE).choices  # a key without a budget is served either way
        served = PASSING + (2 if when == "allow" else 0) + 1
        assert len(fake.received) == served


def test_a_reseed_after_a_redis_restart_is_exact(tmp_path: Path, redis: RedisServer, fake: FakeUpstream) -> None:
    with replicas(config(tmp_path, redis, fake), tmp_path) as (gateway,):
        for _ in range(2):
            ask(gateway, ALPHA)
        eventually(lambda: ledger(tmp_path, "alpha") == (2, 2 * COST))
        eventually(lambda: counter(redis, "key", "alpha", "month") == 2 * COST)  # settled: sent with a short delay
        redis.stop()
        redis.start()  # empty: every counter is gone
        assert counter(redis, "key", "alpha", "month") is None
        ask(gateway, ALPHA)  # finds Redis gone (served under allow), which brings the probe and the reseed

        def reseeded() -> bool:
            return counter(redis, "key", "alpha", "month") == 3 * COST

        eventually(reseeded)
        ask(gateway, ALPHA)
        eventually(lambda: ledger(tmp_path, "alpha") == (4, 4 * COST))
        eventually(lambda: counter(redis, "key", "alpha", "month") == 4 * COST)
        # The budget still binds exactly: one more passes (4 * 18 000 + 15 000 <= 90 000), then none.
        ask(gateway, ALPHA)
        assert_insufficient_quota(refused(gateway, ALPHA), "alpha")
        eventually(lambda: counter(redis, "key", "alpha", "month") == PASSING * COST)


def test_streams_spend_the_budget_by_their_streamed_usage(tmp_path: Path, fake: FakeUpstream) -> None:
    # The fake's stream reports 9 prompt and 3 completion tokens: 12 000 micro-dollars. With the same
    # reservation of 15 000, calls 0-6 pass (12 000 k + 15 000 <= 90 000), spending 84 000.
    fake.by_stream_flag()
    with replicas(config(tmp_path, None, fake), tmp_path) as (gateway,):
        sdk = client(gateway, ALPHA)
        for _ in range(7):
            stream = sdk.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "Hello"}], max_tokens=7, stream=True
            )
            assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == "Hello!"
        with pytest.raises(openai.RateLimitError) as caught:
            sdk.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "Hello"}], max_tokens=7, stream=True
            )
        assert_insufficient_quota(caught.value, "alpha")
        assert len(fake.received) == 7 and budget_refusals([gateway]) == 1
        eventually(lambda: ledger(tmp_path, "alpha") == (8, 7 * 12_000))
