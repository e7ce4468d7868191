"""Scale-out, end to end: Debian's nginx load-balances two gateway replicas of two workers each, which share
one Redis; the official openai SDK (no retries of its own) runs a mixed unary and streaming load through
nginx; halfway, one replica gets SIGTERM and drains as it would in a rolling update.

Not a single request fails, the drained replica exits 0, and the token metrics of both replicas add up to
exactly what the upstream reported (as does the key's tpm bucket in the shared Redis).

The drained replica's metrics cannot be scraped once it is gone, and a last scrape during its drain would
miss the streams that end after its listener closes (gateway/runner.py: the listener closes after
shutdown_delay, then streams in flight get shutdown_grace). Its workers write their counters to the
multiprocess directory as they stop, so the test gives it a directory of its own and reads it after the
exit with the collector /metrics uses: what its /metrics would have answered after its last request.
"""

from __future__ import annotations

import itertools
import re
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from gateway.supervisor import KILL_MARGIN
from tests.fakes.upstream import FakeUpstream, chunks, completion
from tests.harness import ROOT, GatewayProcess
from tests.load_balancer import FAIL_TIMEOUT, TEMPLATE, LoadBalancer, Served
from tests.service.tenancy.conftest import RedisServer, redis_server  # noqa: F401  (the fixture)
from tests.service.test_metrics import Samples, parse, scrape, tokens

KEY = "sk-gw-scale-7d6c5b4a3f"
SHUTDOWN_DELAY = 2.0
SHUTDOWN_GRACE = 30.0  # far more than a stream takes, even on a saturated machine
CONCURRENCY = 8
SIGTERM_AFTER = 120  # requests done before the SIGTERM
LOAD_AFTER_EXIT = 90  # requests done by the survivor alone, after the drained replica has exited
PIECES = 5
PIECE_DELAY = 0.05  # a stream lasts about half a second: some are always in flight
USAGE_FIELDS = ("prompt_tokens", "completion_tokens", "total_tokens")


def pieces_of(number: int) -> tuple[str, ...]:
    return tuple(f"r{number}.{i} " for i in range(PIECES))


def usage_of(number: int) -> dict[str, int]:
    prompt, completion_tokens = 8 + number % 13, PIECES + number % 7
    return {"prompt_tokens": prompt, "completion_tokens": completion_tokens, "total_tokens": prompt + completion_tokens}


def number_of(body: dict[str, Any]) -> int:
    return int(body["messages"][0]["content"].rsplit(" ", 1)[1])


def wants_usage(body: dict[str, Any]) -> bool:
    """What the upstream reports usage for: every unary answer, and streams that ask for it."""
    options = body.get("stream_options") or {}
    return not body.get("stream") or bool(options.get("include_usage"))


def serve_numbered(fake: FakeUpstream) -> None:
    """Each request's answer and usage follow from the number in its message, so the client can check it."""

    async def handle(request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        number = number_of(body)
        content = "".join(pieces_of(number))
        if not body.get("stream"):
            return await fake.replying(200, completion(content, usage=usage_of(number)))(request)
        events = chunks(pieces_of(number), usage=wants_usage(body))
        if wants_usage(body):
            events[-1]["usage"] = usage_of(number)
        return await fake.streaming(events, delay=PIECE_DELAY)(request)

    fake.handler = handle


def reported(fake: FakeUpstream) -> dict[str, int]:
    """The usage the upstream reported, summed over every request it answered (a resent one counts twice)."""
    totals = dict.fromkeys(USAGE_FIELDS, 0)
    for received in fake.received:
        if received.path.endswith("/chat/completions") and wants_usage(received.json):
            usage = usage_of(number_of(received.json))
            for field in USAGE_FIELDS:
                totals[field] += usage[field]
    return totals


def replica_config(fake: FakeUpstream, redis: RedisServer) -> dict[str, Any]:
    return {
        "logging": {"level": "INFO"},
        "server": {"shutdown_delay": SHUTDOWN_DELAY, "shutdown_grace": SHUTDOWN_GRACE},
        "routing": {"retries": 0},  # a failure must show, not be hidden by the gateway's own retry either
        "providers": {"openai": {"type": "openai", "api_url": f"{fake.url}/v1", "api_key": "sk-provider-5a5a"}},
        "models": {"gpt-4o": "openai"},
        "auth": {"keys": [{"name": "scale", "key": KEY, "limits": {"rpm": 1_000_000, "tpm": 100_000_000}}]},
        # Generous: a slow Redis answer on this shared 2-core machine would be served by the in-process
        # fallback, and the shared tpm bucket would then not hold every request's tokens.
        "state": {"redis_url": redis.url, "timeout": 5.0},
    }


def check(client: openai.OpenAI, number: int) -> None:
    """One request of the mix (unary, a stream with usage, a stream without), checked whole."""
    messages: Any = [{"role": "user", "content": f"request {number}"}]
    expected, usage, kind = "".join(pieces_of(number)), usage_of(number), number % 3
    if kind == 0:
        reply = client.chat.completions.create(model="gpt-4o", messages=messages)
        assert reply.choices[0].message.content == expected
        assert reply.choices[0].finish_reason == "stop"
        assert reply.usage is not None and reply.usage.model_dump(include=set(USAGE_FIELDS)) == usage
        return
    options: Any = {"include_usage": True} if kind == 1 else openai.NOT_GIVEN
    received = list(
        client.chat.completions.create(model="gpt-4o", messages=messages, stream=True, stream_options=options)
    )
    content = "".join(c.choices[0].delta.content or "" for c in received if c.choices)
    assert content == expected
    assert [c.choices[0].finish_reason for c in received if c.choices and c.choices[0].finish_reason] == ["stop"]
    usages = [c.usage.model_dump(include=set(USAGE_FIELDS)) for c in received if c.usage is not None]
    if kind == 1:
        assert usages == [usage] and received[-1].choices == [] and received[-1].usage is not None
    else:
        assert usages == []


class Load:
    """CONCURRENCY threads sending numbered requests through one SDK client until told to stop."""

    def __init__(self, client: openai.OpenAI) -> None:
        self.client = client
        self.lock = threading.Lock()
        self.numbers = itertools.count()
        self.done = 0
        self.failures: list[str] = []
        self.stopping = threading.Event()
        self.pool = ThreadPoolExecutor(CONCURRENCY)
        self.running = [self.pool.submit(self._run) for _ in range(CONCURRENCY)]

    def _run(self) -> None:
        while not self.stopping.is_set():
            with self.lock:
                number = next(self.numbers)
            try:
                check(self.client, number)
            except Exception as exc:  # every failure is kept, with what it was
                with self.lock:
                    self.failures.append(f"request {number} (kind {number % 3}): {exc!r}")
            with self.lock:
                self.done += 1

    def wait_done(self, count: int, timeout: float = 300.0) -> None:
        eventually(lambda: self.done >= count, timeout, f"the load never reached {count} requests")

    def stop(self) -> int:
        self.stopping.set()
        for future in self.running:
            future.result(timeout=120)
        self.pool.shutdown()
        return next(self.numbers)  # how many were started


def eventually(condition: Callable[[], bool], timeout: float, message: str | Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, message if isinstance(message, str) else message()
        time.sleep(0.05)


def final_metrics(metrics_dir: Path) -> Samples:
    """What /metrics of a replica that has exited would answer: its workers' values as they stopped."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(metrics_dir))  # type: ignore[no-untyped-call]
    return parse(generate_latest(registry))


def summed(*replicas: Samples) -> tuple[float, ...]:
    """Prompt, completion and total tokens over the replicas; every count is the upstream's, none estimated."""
    assert all(tokens(samples, usage="estimated") == (0, 0, 0) for samples in replicas)
    return tuple(sum(counts) for counts in zip(*(tokens(samples) for samples in replicas), strict=True))


def readyz(replica: GatewayProcess) -> int:
    return httpx.get(f"{replica.base_url}/readyz", timeout=10).status_code


def ended_on(line: Served) -> str:
    return line.tried[-1]


@pytest.fixture
def fake(upstream: FakeUpstream) -> FakeUpstream:
    serve_numbered(upstream)
    return upstream


def test_two_replicas_behind_nginx_lose_no_request_when_one_drains(
    fake: FakeUpstream,
    redis_server: RedisServer,  # noqa: F811
    gateway_factory: Callable[..., GatewayProcess],
    tmp_path: Path,
) -> None:
    config = replica_config(fake, redis_server)
    metrics_dirs = [tmp_path / "metrics-drained", tmp_path / "metrics-survivor"]
    replicas = []
    for metrics_dir in metrics_dirs:
        metrics_dir.mkdir()
        replicas.append(
            gateway_factory(config, env={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}, args=("--workers", "2"))
        )
    drained, survivor = replicas
    lb = LoadBalancer(tmp_path / "nginx", [r.port for r in replicas])
    lb.start()
    address = {r: f"127.0.0.1:{r.port}" for r in replicas}
    client = openai.OpenAI(base_url=f"{lb.base_url}/v1", api_key=KEY, max_retries=0, timeout=60)
    load = Load(client)
    try:
        load.wait_done(SIGTERM_AFTER)
        assert drained.process is not None
        signalled = time.time()
        drained.process.send_signal(signal.SIGTERM)
        eventually(lambda: readyz(drained) == 503, SHUTDOWN_DELAY * 10, "/readyz never failed after the SIGTERM")
        not_ready = time.time()
        code = drained.process.wait(SHUTDOWN_DELAY + SHUTDOWN_GRACE + KILL_MARGIN + 30)
        exited = time.time()
        load.wait_done(load.done + LOAD_AFTER_EXIT)
    finally:
        started = load.stop()
        client.close()
        lb.stop()

    assert load.failures == [], f"{len(load.failures)} of {started} requests failed:\n" + "\n".join(load.failures)
    assert code == 0, drained.log_text()[-3000:]
    served = lb.served()
    assert len(served) == started and {line.status for line in served} == {200}
    # The test did what it says: both replicas served before the SIGTERM, the drained one went on serving
    # while its /readyz failed (what shutdown_delay is for), and only the survivor served once it had exited.
    assert {ended_on(line) for line in served if line.at < signalled} == set(address.values())
    assert any(ended_on(line) == address[drained] for line in served if line.at > not_ready)
    assert {ended_on(line) for line in served if line.at > exited} == {address[survivor]}

    upstream = reported(fake)
    assert upstream["total_tokens"] > 0
    final = final_metrics(metrics_dirs[0])
    assert summed(final)[2] > 0
    expected = tuple(float(upstream[field]) for field in USAGE_FIELDS)
    # The survivor's other worker writes its values every half second: poll until they are in.
    eventually(
        lambda: summed(final, scrape(survivor)) == expected,
        30,
        lambda: (
            f"tokens {summed(final)} (drained) + {summed(scrape(survivor))} (survivor) != the upstream's {expected}"
        ),
    )

    def charged() -> float:
        reply = redis_server.command("HGET", "{llm-gateway}:b:key:scale:tpm", "n")
        return float(reply.split(b"\r\n")[1]) if reply.startswith(b"$") and not reply.startswith(b"$-1") else -1.0

    # Both replicas settled every request's reservation to its real usage in the shared bucket.
    eventually(lambda: charged() == upstream["total_tokens"], 30, lambda: f"tpm bucket {charged()} != {upstream}")
    assert survivor.stop() == 0


def test_the_readme_shows_the_load_balancer_config_this_test_runs() -> None:
    shown = re.findall(r"```nginx\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert len(shown) == 1
    template = TEMPLATE.read_text()
    directives = [line.strip() for line in shown[0].splitlines() if line.strip().startswith(("proxy_", "keepalive "))]
    assert len(directives) >= 5 and all(directive in template for directive in directives)
    servers = [line for line in shown[0].splitlines() if re.match(r"\s*server \S+:\d+ ", line)]
    assert servers and all(f"max_fails=1 fail_timeout={FAIL_TIMEOUT}s;" in line for line in servers)
