"""Limits shared through one real Redis by two gateway replicas of two workers each: exact across all of
them, slots that a killed replica held come back by themselves, and a Redis outage never fails a request."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness import GatewayProcess
from tests.service.tenancy.conftest import RedisServer
from tests.service.tenancy.upstream import HELD, UsageUpstream, hold

BURST = "sk-gw-burst-6a1b2c3d4e"
TOKENS = "sk-gw-tokens-5e4d3c2b1a"
PARALLEL = "sk-gw-parallel-9c8b7a6f5e"
STEADY = "sk-gw-steady-1f2e3d4c5b"
EXACT = "sk-gw-exact-0a9b8c7d6e"
LEASE = 2.0


def replica_config(upstream: UsageUpstream, redis: RedisServer) -> dict[str, Any]:
    return {
        "logging": {"level": "INFO"},
        "routing": {"retries": 0},
        "providers": {"openai": {"type": "openai", "api_url": upstream.url, "api_key": "sk-provider-0000"}},
        "models": {"gpt-4o": "openai", HELD: "openai"},
        "auth": {
            "keys": [
                {"name": "burst", "key": BURST, "limits": {"rpm": 20}},
                {"name": "tokens", "key": TOKENS, "limits": {"tpm": 1_000_000}},
                {"name": "parallel", "key": PARALLEL, "limits": {"max_parallel": 3}},
                {"name": "steady", "key": STEADY, "limits": {"rpm": 100_000, "tpm": 10_000_000}},
                {"name": "exact", "key": EXACT, "limits": {"rpm": 5}},
            ]
        },
        "limits": {"default_max_tokens": 200},
        # A generous timeout: this 2-core test machine is shared and often saturated, and a slow answer
        # would (rightly) be served by the in-process fallback, which is not what these tests measure.
        "state": {"redis_url": redis.url, "slot_lease": LEASE, "timeout": 2.0},
    }


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


def start_replicas(config: dict[str, Any], workdir: Path, count: int = 2) -> list[GatewayProcess]:
    started: list[GatewayProcess] = []
    try:
        for _ in range(count):
            started.append(GatewayProcess(config, workdir, args=("--workers", "2")).start())
    except BaseException:
        for process in started:
            process.stop()
        raise
    return started


@pytest.fixture(scope="module")
def replicas(
    upstream: UsageUpstream, redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[GatewayProcess]]:
    started = start_replicas(replica_config(upstream, redis), tmp_path_factory.mktemp("replicas"))
    yield started
    for process in started:
        assert process.stop() == 0


def chat(model: str = "gpt-4o", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "Hello"}], **extra}


def post(replica: GatewayProcess, key: str, body: dict[str, Any] | None = None) -> httpx.Response:
    # A new connection each time, so the kernel spreads requests over the replica's workers.
    return httpx.post(
        f"{replica.base_url}/v1/chat/completions", json=body or chat(), headers={"authorization": f"Bearer {key}"}
    )


def burst(replicas: list[GatewayProcess], key: str, count: int) -> list[httpx.Response]:
    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(lambda i: post(replicas[i % len(replicas)], key), range(count)))


def eventually(check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.05)


def metric(replica: GatewayProcess, line_start: str) -> float | None:
    for line in httpx.get(f"{replica.base_url}/metrics").text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def assert_well_formed_429(reply: httpx.Response, name: str, limit: int) -> None:
    assert reply.status_code == 429
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"], error["param"]) == ("requests", "rate_limit_exceeded", None)
    prefix = f"Rate limit reached for {name} on requests per min (RPM): Limit {limit}, Used {limit}, Requested 1."
    assert error["message"].startswith(prefix + " Please try again in "), error["message"]
    assert int(reply.headers["retry-after"]) >= 1
    assert 0 < int(reply.headers["retry-after-ms"]) <= 60_000


def test_a_burst_over_two_replicas_admits_exactly_the_limit(replicas: list[GatewayProcess]) -> None:
    started = time.monotonic()
    replies = burst(replicas, BURST, 40)
    # rpm 20 refills one request every 3 s: a burst that took longer (a saturated machine) has earned more.
    refilled = int((time.monotonic() - started) // 3)
    admitted = sum(r.status_code == 200 for r in replies)
    assert 20 <= admitted <= 20 + refilled
    assert sorted(r.status_code for r in replies) == [200] * admitted + [429] * (40 - admitted)
    for reply in replies:
        if reply.status_code == 429:
            assert_well_formed_429(reply, "burst", 20)
        else:
            assert reply.headers["x-ratelimit-limit-requests"] == "20"
    # Every worker of both replicas took part.
    workers = {line["pid"] for r in replicas for line in r.log_lines() if line.get("key") == "burst"}
    assert len(workers) >= 3


def test_tokens_reconcile_exactly_with_the_providers_usage(
    replicas: list[GatewayProcess], upstream: UsageUpstream, redis: RedisServer
) -> None:
    before = upstream.reported
    bodies = [chat(max_tokens=150), chat(), chat(stream=True), chat(stream=True, max_completion_tokens=90)]
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda i: post(replicas[i % 2], TOKENS, bodies[i % 4]), range(24)))
    assert [r.status_code for r in replies] == [200] * 24
    reported = upstream.reported - before
    assert reported > 0

    def charged() -> float:
        reply = redis.command("HGET", "{llm-gateway}:b:key:tokens:tpm", "n")
        return float(reply.split(b"\r\n")[1]) if reply.startswith(b"$") and not reply.startswith(b"$-1") else -1.0

    # Each reservation was replaced by the provider's usage, once: what the bucket holds is that usage.
    eventually(lambda: charged() == reported, timeout=10)


def test_max_parallel_holds_across_replicas(replicas: list[GatewayProcess], upstream: UsageUpstream) -> None:
    with contextlib.ExitStack() as stack:
        _held = [hold(stack, replicas[i % 2].base_url, {"api-key": PARALLEL}) for i in range(3)]
        time.sleep(LEASE * 1.5)  # longer than a lease: the slots of calls still running are renewed, not lost
        for replica in replicas:
            for _ in range(2):
                refused = post(replica, PARALLEL)
                assert refused.status_code == 429
                assert "on parallel requests: Limit 3, Used 3, Requested 1." in refused.json()["error"]["message"]
        assert upstream.most_active <= 3
    eventually(lambda: post(replicas[1], PARALLEL).status_code == 200)


def _tree(pid: int) -> list[int]:
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid:
                    children.append(int(entry))
    return [pid, *children]


def test_slots_of_a_killed_replica_come_back_within_the_lease(
    upstream: UsageUpstream, redis: RedisServer, tmp_path: Path
) -> None:
    config = replica_config(upstream, redis)
    config["auth"]["keys"] = [{"name": "doomed", "key": PARALLEL, "limits": {"max_parallel": 2}}]
    doomed, survivor = start_replicas(config, tmp_path)
    try:
        with contextlib.ExitStack() as stack:
            _held = [hold(stack, doomed.base_url, {"api-key": PARALLEL}) for _ in range(2)]
            assert post(survivor, PARALLEL).status_code == 429
            assert doomed.process is not None
            for pid in _tree(doomed.process.pid):  # the whole replica, workers too, with no chance to clean up
                os.kill(pid, signal.SIGKILL)
            doomed.process.wait(10)
            killed = time.monotonic()
            stack.close()
        eventually(lambda: post(survivor, PARALLEL).status_code == 200, timeout=LEASE + 5)
        # The slots came back by their expiry: within the lease (plus the polls' own time on a busy machine).
        assert time.monotonic() - killed <= LEASE + 2.0
    finally:
        survivor.stop()
        doomed.stop()


def test_a_redis_outage_never_fails_a_request_and_limits_are_exact_once_it_is_back(
    replicas: list[GatewayProcess], redis: RedisServer
) -> None:
    up = 'llm_gateway_state_backend_up{backend="redis"}'
    assert [metric(r, up) for r in replicas] == [1.0, 1.0]
    done = threading.Semaphore(0)

    def steady(i: int) -> int:
        status = post(replicas[i % 2], STEADY).status_code
        done.release()
        return status

    try:
        with ThreadPoolExecutor(4) as pool:
            running = pool.map(steady, range(80))
            for _ in range(20):
                done.acquire()
            redis.stop()  # in the middle of the run, with requests in flight
            assert list(running) == [200] * 80
        for replica in replicas:
            eventually(lambda replica=replica: metric(replica, up) == 0.0)
            errors = metric(replica, 'llm_gateway_state_backend_errors_total{backend="redis"}')
            assert errors is not None and errors >= 1
            down = [line for line in replica.log_lines() if line["msg"].startswith("state backend down")]
            assert 1 <= len(down) <= 2  # one warning per worker that noticed, not one per request
            assert all(line["level"] == "WARN" and "redis://" not in str(line) for line in down)
    finally:
        redis.start()
    for replica in replicas:
        eventually(lambda replica=replica: metric(replica, up) == 1.0)
    replies = burst(replicas, EXACT, 12)
    assert sorted(r.status_code for r in replies) == [200] * 5 + [429] * 7
    for reply in replies:
        if reply.status_code == 429:
            assert_well_formed_429(reply, "exact", 5)


def test_a_deployment_benched_on_one_replica_is_benched_on_every_replica(
    upstream: UsageUpstream, redis: RedisServer, tmp_path: Path
) -> None:
    from tests.fakes.upstream import FakeUpstream

    bad = FakeUpstream().start()
    bad.reply(500, {"error": {"message": "down", "type": "server_error", "param": None, "code": None}})
    config = replica_config(upstream, redis)
    config["auth"] = {}
    config["providers"]["bad"] = {"type": "openai", "api_url": f"{bad.url}/v1", "api_key": "sk-bad-0000"}
    config["models"]["split"] = {"deployments": [{"provider": "bad", "name": "bad"}, {"provider": "openai"}]}
    # One failure benches a deployment for a minute; the retry goes to the other one.
    config["routing"] = {"retries": 1, "cooldown_failures": 1, "cooldown_seconds": 60, "backoff_initial": 0.01}
    first, second = start_replicas(config, tmp_path)
    try:

        def ask(replica: GatewayProcess) -> int:
            return httpx.post(f"{replica.base_url}/v1/chat/completions", json=chat("split")).status_code

        eventually(lambda: ask(first) == 200 and len(bad.received) > 0)  # the first replica benched it
        state = 'llm_gateway_deployment_state{deployment="bad",model="split"}'
        eventually(lambda: metric(second, state) == 1.0)  # the second learnt of it, unasked
        time.sleep(2.5)  # every worker reads the shared cooldowns once a second
        hits = len(bad.received)
        assert [ask(replica) for replica in (first, second) * 12] == [200] * 24
        assert len(bad.received) == hits, "a worker sent a request to the benched deployment"
    finally:
        first.stop()
        second.stop()
        bad.stop()


def test_a_redis_that_is_down_at_start_or_stops_answering_never_fails_a_request(
    upstream: UsageUpstream, tmp_path: Path
) -> None:
    redis = RedisServer(tmp_path)  # not started yet: the gateway starts without its Redis
    config = replica_config(upstream, redis)
    config["state"]["timeout"] = 0.2
    gateway = GatewayProcess(config, tmp_path).start()
    up = 'llm_gateway_state_backend_up{backend="redis"}'
    try:
        assert [post(gateway, STEADY).status_code for _ in range(5)] == [200] * 5
        assert metric(gateway, up) == 0.0
        redis.start()
        eventually(lambda: metric(gateway, up) == 1.0)
        assert post(gateway, EXACT).status_code == 200
        assert redis.process is not None
        redis.process.send_signal(signal.SIGSTOP)  # alive, connected, silent: every call times out
        try:
            assert [post(gateway, STEADY).status_code for _ in range(8)] == [200] * 8
            assert metric(gateway, up) == 0.0
        finally:
            redis.process.send_signal(signal.SIGCONT)
        eventually(lambda: metric(gateway, up) == 1.0)
        # Exact again: EXACT's bucket in Redis still holds the request it took before the pause.
        assert sorted(post(gateway, EXACT).status_code for _ in range(6)) == [200] * 4 + [429] * 2
    finally:
        gateway.stop()
        redis.stop()
