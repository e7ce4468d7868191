"""Spend and the ledger through real gateway processes: the fake upstream's usage times the prices, exactly, in the
ledger, the metrics and the responses' cost; two replicas on one PostgreSQL; a stop's flush; PostgreSQL going away
mid-run and coming back."""

from __future__ import annotations

import asyncio
import copy
import itertools
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import orjson
import pytest
import yaml
from aiohttp import web

from gateway.jsonpb import MessageCodec
from llm_gateway.v1 import chat_pb2, chat_pb2_grpc
from service.ledger import UsageRecord, open_ledger
from service.spend import COST_HEADER, Price, builtin, usd
from tests.fakes import anthropic
from tests.fakes.upstream import FakeUpstream, chunks, completion, embeddings
from tests.harness import GatewayProcess
from tests.service.ledger.postgres_server import PostgresServer

CHAT = MessageCodec.for_type(chat_pb2.CreateChatCompletionRequest)
# Usage as OpenAI reports it: cached prompt tokens inside prompt_tokens, reasoning inside completion_tokens.
UNARY_USAGE = {
    "prompt_tokens": 1200,
    "completion_tokens": 333,
    "total_tokens": 1533,
    "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 128, "audio_tokens": 0},
}
STREAM_USAGE = {
    "prompt_tokens": 57,
    "completion_tokens": 3,
    "total_tokens": 60,
    "prompt_tokens_details": {"cached_tokens": 17},
}
EMBED_USAGE = (8000, 0, 0)
GPT4O = builtin().lookup("gpt-4o")
EMBED_PRICE = builtin().lookup("text-embedding-3-small")
CUSTOM = Price(300_000, 150_000, 1_200_000)  # models.custom.price in the config below
assert GPT4O is not None and EMBED_PRICE is not None
_ids = itertools.count(1)


def unary_body() -> dict[str, Any]:
    return completion(usage=copy.deepcopy(UNARY_USAGE))


def stream_events() -> list[dict[str, Any]]:
    events = chunks()
    events[-1]["usage"] = copy.deepcopy(STREAM_USAGE)
    return events


def cost(price: Price, usage: dict[str, Any]) -> int:
    cached = usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)
    return price.cost(usage["prompt_tokens"], cached, usage["completion_tokens"])


class Upstream(FakeUpstream):
    """Chat (unary or streamed, by the request's flag) and embeddings, by path."""

    def answer_by_path(self) -> None:
        unary, streamed = self.replying(200, unary_body()), self.streaming(stream_events())
        embedded = self.replying(
            200, embeddings([[0.25, 0.5]], usage=True) | {"usage": {"prompt_tokens": 8000, "total_tokens": 8000}}
        )

        async def handle(request: web.Request) -> web.StreamResponse:
            if request.path.endswith("/embeddings"):
                return await embedded(request)
            wants_stream = orjson.loads(await request.read()).get("stream") is True
            return await (streamed if wants_stream else unary)(request)

        self.handler = handle


@pytest.fixture
def chat_upstream() -> Any:
    server = Upstream().start()
    server.answer_by_path()
    yield server
    server.stop()


@pytest.fixture
def broken() -> Any:
    server = FakeUpstream().start()
    server.reply(500, {"error": {"message": "boom", "type": "server_error", "param": None, "code": None}})
    yield server
    server.stop()


def gateway_config(upstream: FakeUpstream, broken: FakeUpstream, database: str, **usage: Any) -> dict[str, Any]:
    return {
        "providers": {
            "openai": {"type": "openai", "api_key": "sk-test", "api_url": f"{upstream.url}/v1"},
            "broken": {"type": "openai", "api_key": "sk-test", "api_url": f"{broken.url}/v1"},
        },
        "models": {
            "gpt-4o": "openai",
            "custom": {"provider": "openai", "model": "my-finetune", "price": {"input": 0.3, "cached_input": 0.15,
                                                                             "output": 1.2}},
            "local": {"provider": "openai", "model": "llama3.2"},  # no price anywhere
            "flaky": {"provider": "broken", "model": "gpt-4o", "fallback": ["gpt-4o"]},
            "embed": {"provider": "openai", "model": "text-embedding-3-small"},
        },
        "routing": {"retries": 1, "backoff_initial": 0.01, "backoff_max": 0.02, "cooldown_failures": 1000},
        "usage": {"database": database, "flush_interval": 0.05, **usage},
    }  # fmt: skip


@dataclass
class Setup:
    """A gateway config on the fake upstreams, writing its ledger to `database`."""

    database: str
    config: dict[str, Any]
    upstream: Upstream


@pytest.fixture
def on_sqlite(chat_upstream: Upstream, broken: FakeUpstream, tmp_path: Path) -> Setup:
    database = f"sqlite:///{tmp_path}/usage.db"
    return Setup(database, gateway_config(chat_upstream, broken, database), chat_upstream)


@pytest.fixture
def on_postgres(chat_upstream: Upstream, broken: FakeUpstream, postgres_url: str) -> Setup:
    return Setup(postgres_url, gateway_config(chat_upstream, broken, postgres_url), chat_upstream)


def request_id() -> str:
    return f"ledger-test-{time.time_ns()}-{next(_ids)}"


def post(gateway: GatewayProcess, path: str, body: dict[str, Any], rid: str) -> httpx.Response:
    return httpx.post(f"{gateway.base_url}{path}", json=body, headers={"x-request-id": rid}, timeout=20)


def chat(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "Hello"}], **extra}


def sse_usage(text: str) -> dict[str, Any] | None:
    for line in text.splitlines():
        if line.startswith("data: {"):
            event = orjson.loads(line[6:])
            if event.get("usage"):
                return dict(event["usage"])
    return None


def ledger_records(url: str) -> list[UsageRecord]:
    async def read() -> list[UsageRecord]:
        ledger = open_ledger(url)
        try:
            return await ledger.records()
        finally:
            await ledger.close()

    return asyncio.run(read())


def eventually(predicate: Callable[[], bool], limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def scrape(gateway: GatewayProcess, name: str) -> dict[str, float]:
    """Samples of one metric family: {label text: value}."""
    text = httpx.get(f"{gateway.base_url}/metrics", timeout=10).text
    return {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    }


# ---------------------------------------------------------------------------------------------- exact totals


def test_ledger_metrics_and_responses_carry_the_usage_times_the_prices_exactly(
    on_sqlite: Setup, gateway_factory: Callable[..., GatewayProcess]
) -> None:
    database, chat_upstream = on_sqlite.database, on_sqlite.upstream
    gateway = gateway_factory(on_sqlite.config)
    expected: dict[str, tuple[int, int, bool, int]] = {}  # request id -> (cost, status, streamed, attempts)
    unary_cost, stream_cost = cost(GPT4O, UNARY_USAGE), cost(GPT4O, STREAM_USAGE)

    # Unary over REST: the header is the cost, cached tokens at the cached price, reasoning as output.
    rid = request_id()
    reply = post(gateway, "/v1/chat/completions", chat("gpt-4o"), rid)
    assert reply.status_code == 200 and reply.headers[COST_HEADER] == usd(unary_cost) == "0.005050"
    expected[rid] = (unary_cost, 200, False, 1)

    # A stream: its headers left before its usage existed, and its chunks reach the client unchanged.
    rid = request_id()
    reply = post(
        gateway, "/v1/chat/completions", chat("gpt-4o", stream=True, stream_options={"include_usage": True}), rid
    )
    assert sse_usage(reply.text) == STREAM_USAGE and COST_HEADER not in reply.headers
    expected[rid] = (stream_cost, 200, True, 1)

    # A stream that did not: no usage reaches the client, the ledger still has it.
    rid = request_id()
    reply = post(gateway, "/v1/chat/completions", chat("gpt-4o", stream=True), rid)
    assert reply.status_code == 200 and sse_usage(reply.text) is None
    expected[rid] = (stream_cost, 200, True, 1)

    # The model's configured price, over the table's.
    rid = request_id()
    reply = post(gateway, "/v1/chat/completions", chat("custom"), rid)
    assert reply.headers[COST_HEADER] == usd(cost(CUSTOM, UNARY_USAGE))
    expected[rid] = (cost(CUSTOM, UNARY_USAGE), 200, False, 1)

    # No price: no header, cost 0 in the ledger, counted as unpriced.
    rid = request_id()
    reply = post(gateway, "/v1/chat/completions", chat("local"), rid)
    assert reply.status_code == 200 and COST_HEADER not in reply.headers
    expected[rid] = (0, 200, False, 1)

    # A retry (the first answer is a 500) and a fallback (every attempt of flaky fails): one record each, the
    # cost of the answer that counted, once.
    rid = request_id()
    chat_upstream.script(chat_upstream.replying(500, {"error": {"message": "once", "type": "server_error"}}))
    reply = post(gateway, "/v1/chat/completions", chat("gpt-4o"), rid)
    assert reply.status_code == 200 and reply.headers["x-llm-gateway-attempts"] == "2"
    expected[rid] = (unary_cost, 200, False, 2)
    rid = request_id()
    reply = post(gateway, "/v1/chat/completions", chat("flaky"), rid)
    assert reply.status_code == 200 and reply.headers["x-llm-gateway-model"] == "gpt-4o"
    assert reply.headers[COST_HEADER] == usd(unary_cost)
    expected[rid] = (unary_cost, 200, False, int(reply.headers["x-llm-gateway-attempts"]))

    # Failures are recorded too.
    rid = request_id()
    assert post(gateway, "/v1/chat/completions", chat("no-such-model"), rid).status_code == 404
    expected[rid] = (0, 404, False, 0)

    # Embeddings: priced as input tokens.
    rid = request_id()
    reply = post(gateway, "/v1/embeddings", {"model": "embed", "input": "hello there"}, rid)
    assert reply.status_code == 200, reply.text
    expected[rid] = (EMBED_PRICE.cost(*EMBED_USAGE), 200, False, 1)

    # gRPC: the cost is a trailer, unary and streamed.
    with grpc.insecure_channel(gateway.grpc_address) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        rid = request_id()
        _, grpc_call = stub.CreateChatCompletion.with_call(
            CHAT.decode(chat("gpt-4o")), metadata=(("x-request-id", rid),), timeout=10
        )
        assert dict(grpc_call.trailing_metadata())[COST_HEADER] == usd(unary_cost)
        assert COST_HEADER not in dict(grpc_call.initial_metadata())
        expected[rid] = (unary_cost, 200, False, 1)
        rid = request_id()
        stream = stub.StreamChatCompletion(
            CHAT.decode(chat("gpt-4o", stream=True)), metadata=(("x-request-id", rid),), timeout=10
        )
        assert list(stream)
        assert dict(stream.trailing_metadata())[COST_HEADER] == usd(stream_cost)
        expected[rid] = (stream_cost, 200, True, 1)

    total = sum(c for c, *_ in expected.values())
    costs = scrape(gateway, "llm_gateway_cost_usd_total")
    assert sum(costs.values()) == pytest.approx(total / 1_000_000, abs=1e-12)
    assert all('key="none"' in labels for labels in costs)  # auth is off
    assert scrape(gateway, "llm_gateway_unpriced_requests_total") == {
        'llm_gateway_unpriced_requests_total{model="local",provider="openai"}': 1.0
    }

    assert gateway.stop() == 0
    records = {r.request_id: r for r in ledger_records(database)}
    assert set(records) == set(expected)
    assert sum(r.cost_micro for r in records.values()) == total
    for rid, (micro, status, streamed, attempts) in expected.items():
        got = records[rid]
        assert (got.cost_micro, got.status, got.streamed, got.attempts) == (micro, status, streamed, attempts), got
    unary = next(r for r in records.values() if r.model == "gpt-4o" and r.attempts == 2)
    assert (unary.prompt_tokens, unary.cached_tokens, unary.completion_tokens) == (1200, 1024, 333)
    assert (unary.key_name, unary.team, unary.kind, unary.estimated) == ("none", "", "chat", False)
    fallback = next(r for r in records.values() if r.model == "flaky")
    assert (fallback.served_model, fallback.provider, fallback.deployment) == ("gpt-4o", "openai", "openai/gpt-4o")
    assert next(r for r in records.values() if r.model == "embed").kind == "embedding"
    assert all(r.latency_ms > 0 for r in records.values())


def test_the_ledger_can_be_turned_off(
    chat_upstream: Upstream, broken: FakeUpstream, gateway_factory: Callable[..., GatewayProcess], tmp_path: Path
) -> None:
    gateway = gateway_factory(gateway_config(chat_upstream, broken, ""))
    reply = post(gateway, "/v1/chat/completions", chat("gpt-4o"), request_id())
    assert reply.status_code == 200 and COST_HEADER in reply.headers  # prices still apply
    assert gateway.stop() == 0
    assert not list(tmp_path.glob("*.db")), "no ledger file when usage.database is empty"


# ---------------------------------------------------------------------------------------------- PostgreSQL


def start_together(factory: Callable[..., GatewayProcess], config: dict[str, Any], count: int) -> list[GatewayProcess]:
    gateways = [factory(config, wait_grpc=False, wait_rest=False) for _ in range(count)]
    for gateway in gateways:
        gateway.wait_grpc()
        gateway.wait_rest()
    return gateways


def test_two_replicas_share_one_postgresql_and_a_sigterm_flushes_everything(
    on_postgres: Setup, gateway_factory: Callable[..., GatewayProcess]
) -> None:
    postgres_url, config = on_postgres.database, on_postgres.config
    config["usage"] |= {"flush_interval": 600, "batch_size": 10_000}  # written only by the stop
    replicas = start_together(gateway_factory, config, 2)  # both migrate the empty database at once
    sent = []
    for n in range(40):
        rid = request_id()
        body = chat("gpt-4o", stream=n % 3 == 0)
        assert post(replicas[n % 2], "/v1/chat/completions", body, rid).status_code == 200
        sent.append((rid, n % 3 == 0))
    assert ledger_records(postgres_url) == []  # nothing written yet: it all waits in the replicas' buffers
    for replica in replicas:
        assert replica.stop() == 0
    records = ledger_records(postgres_url)
    assert sorted(r.request_id for r in records) == sorted(rid for rid, _ in sent)  # all there, none twice
    assert sum(r.cost_micro for r in records) == sum(
        cost(GPT4O, STREAM_USAGE if streamed else UNARY_USAGE) for _, streamed in sent
    )


def test_postgresql_away_mid_run_then_back_every_record_arrives(
    on_postgres: Setup, gateway_factory: Callable[..., GatewayProcess], postgres: PostgresServer
) -> None:
    postgres_url = on_postgres.database
    gateway = gateway_factory(on_postgres.config)
    sent = []

    def send(count: int) -> None:
        for _ in range(count):
            rid = request_id()
            reply = post(gateway, "/v1/chat/completions", chat("gpt-4o"), rid)
            assert reply.status_code == 200, reply.text  # requests never wait for, or fail with, the ledger
            sent.append(rid)

    send(5)
    eventually(lambda: len(ledger_records(postgres_url)) == 5)
    postgres.stop()
    try:
        send(12)
        eventually(lambda: scrape(gateway, "llm_gateway_ledger_buffered").get("llm_gateway_ledger_buffered", 0) > 0)
        send(3)
    finally:
        postgres.start()
    eventually(lambda: len(ledger_records(postgres_url)) == 20)
    assert sorted(r.request_id for r in ledger_records(postgres_url)) == sorted(sent)
    eventually(lambda: scrape(gateway, "llm_gateway_ledger_buffered").get("llm_gateway_ledger_buffered", 1) == 0)
    lines = gateway.log_lines()
    assert sum(line["msg"].startswith("usage ledger unreachable") for line in lines) == 1  # one per transition
    assert sum(line["msg"] == "usage ledger reachable again" for line in lines) == 1
    assert all("password" not in str(line) for line in lines)
    assert gateway.stop() == 0


def test_with_keys_the_ledger_and_the_cost_metric_name_the_key_and_its_team(
    on_sqlite: Setup, gateway_factory: Callable[..., GatewayProcess]
) -> None:
    database, config = on_sqlite.database, on_sqlite.config
    secret = "sk-gw-search-7c1e5a9b3d"
    config["auth"] = {"keys": [{"name": "search", "key": secret, "metadata": {"team": "search-team"}}]}
    gateway = gateway_factory(config)
    rid, refused = request_id(), request_id()
    reply = httpx.post(
        f"{gateway.base_url}/v1/chat/completions",
        json=chat("gpt-4o"),
        headers={"x-request-id": rid, "authorization": f"Bearer {secret}"},
        timeout=20,
    )
    assert reply.status_code == 200
    assert post(gateway, "/v1/chat/completions", chat("gpt-4o"), refused).status_code == 401
    assert scrape(gateway, "llm_gateway_cost_usd_total") == {
        'llm_gateway_cost_usd_total{key="search",model="gpt-4o",provider="openai",team="search-team"}': pytest.approx(
            cost(GPT4O, UNARY_USAGE) / 1_000_000
        )
    }
    assert gateway.stop() == 0
    records = {r.request_id: r for r in ledger_records(database)}
    assert (records[rid].key_name, records[rid].team, records[rid].cost_micro) == (
        "search",
        "search-team",
        cost(GPT4O, UNARY_USAGE),
    )
    assert (records[refused].key_name, records[refused].status, records[refused].cost_micro) == ("none", 401, 0)
    assert secret not in gateway.log_text()


def test_estimated_usage_is_priced_and_marked_estimated(
    on_sqlite: Setup, gateway_factory: Callable[..., GatewayProcess]
) -> None:
    database, chat_upstream = on_sqlite.database, on_sqlite.upstream
    chat_upstream.reply(200, completion(content="Counted by the gateway itself.", usage=None))
    gateway = gateway_factory(on_sqlite.config)
    rid = request_id()
    reply = post(gateway, "/v1/chat/completions", chat("gpt-4o"), rid)
    usage = reply.json()["usage"]
    assert usage["x_llm_gateway_estimated"] is True
    priced = GPT4O.cost(usage["prompt_tokens"], 0, usage["completion_tokens"])
    assert priced > 0 and reply.headers[COST_HEADER] == usd(priced)
    chat_upstream.stream([e for e in chunks() if e.get("choices")])  # a stream without any usage
    streamed = request_id()
    reply = post(
        gateway, "/v1/chat/completions", chat("gpt-4o", stream=True, stream_options={"include_usage": True}), streamed
    )
    stream_usage = sse_usage(reply.text)
    assert stream_usage is not None and stream_usage["x_llm_gateway_estimated"] is True
    stream_priced = GPT4O.cost(stream_usage["prompt_tokens"], 0, stream_usage["completion_tokens"])
    assert gateway.stop() == 0
    records = {r.request_id: r for r in ledger_records(database)}
    assert (records[rid].estimated, records[rid].cost_micro) == (True, priced)
    assert (records[streamed].estimated, records[streamed].cost_micro) == (True, stream_priced)


def test_a_config_reload_during_an_outage_keeps_the_buffered_records(
    on_postgres: Setup, gateway_factory: Callable[..., GatewayProcess], postgres: PostgresServer
) -> None:
    postgres_url, config = on_postgres.database, on_postgres.config
    gateway = gateway_factory(config)
    sent = []

    def send(model: str, count: int) -> None:
        for _ in range(count):
            rid = request_id()
            assert post(gateway, "/v1/chat/completions", chat(model), rid).status_code == 200
            sent.append(rid)

    send("gpt-4o", 2)
    eventually(lambda: len(ledger_records(postgres_url)) == 2)
    postgres.stop()
    try:
        send("gpt-4o", 5)
        # A reload replaces the chat core; the usage settings are the same, so the new core keeps the writer
        # and the five records it holds (a new writer would have dropped them with the old core).
        config["models"]["mini"] = {"provider": "openai", "model": "gpt-4o-mini"}
        assert gateway.config_path is not None
        gateway.config_path.write_text(yaml.safe_dump(config))
        gateway.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        eventually(lambda: "mini" in httpx.get(f"{gateway.base_url}/v1/models", timeout=5).text)
        send("mini", 3)
        time.sleep(6)  # longer than a closing writer's grace
    finally:
        postgres.start()
    eventually(lambda: len(ledger_records(postgres_url)) == 10)
    assert sorted(r.request_id for r in ledger_records(postgres_url)) == sorted(sent)
    assert gateway.stop() == 0


def test_a_facade_in_front_of_a_remote_service_passes_the_cost_on(
    on_sqlite: Setup, gateway_factory: Callable[..., GatewayProcess]
) -> None:
    config = on_sqlite.config
    service = gateway_factory(config, args=("--grpc-only",))
    facade = gateway_factory(config, env={"GRPC_TARGET": service.grpc_address}, wait_grpc=False)
    reply = post(facade, "/v1/chat/completions", chat("gpt-4o"), request_id())
    assert reply.headers[COST_HEADER] == usd(cost(GPT4O, UNARY_USAGE))  # the service's trailer, as a header


def test_two_workers_share_one_sqlite_file(on_sqlite: Setup, gateway_factory: Callable[..., GatewayProcess]) -> None:
    database = on_sqlite.database
    gateway = gateway_factory(on_sqlite.config, args=("--workers", "2"))
    sent = [request_id() for _ in range(60)]
    for rid in sent:
        assert post(gateway, "/v1/chat/completions", chat("gpt-4o"), rid).status_code == 200
    assert gateway.stop() == 0
    records = ledger_records(database)
    assert sorted(r.request_id for r in records) == sorted(sent)
    assert len({line.get("pid") for line in gateway.log_lines() if line["msg"] == "chat completion"}) == 2
    assert not [line for line in gateway.log_lines() if "ledger" in line["msg"] and line["level"] != "INFO"]


def test_anthropic_cache_reads_and_writes_are_priced_as_such_unary_and_streamed(
    on_sqlite: Setup, gateway_factory: Callable[..., GatewayProcess]
) -> None:
    upstream = on_sqlite.upstream
    config = on_sqlite.config
    config["providers"]["claude"] = {"type": "anthropic", "api_key": "sk-ant-test-0123456789", "api_url": upstream.url}
    config["models"]["claude"] = {"provider": "claude", "model": "claude-sonnet-4-5-20250929"}
    counts = {"input_tokens": 40, "cache_read_input_tokens": 1000, "cache_creation_input_tokens": 200}
    upstream.reply(200, anthropic.message(usage={**counts, "output_tokens": 30}))
    gateway = gateway_factory(config)
    sonnet = builtin().lookup("claude-sonnet-4-5")
    assert sonnet is not None and sonnet.cache_write == 3_750_000
    # 40 fresh at $3, 1000 read at $0.30, 200 written at $3.75, 30 out at $15 (per 1M).
    expected = 120 + 300 + 750 + 450
    unary = request_id()
    reply = post(gateway, "/v1/chat/completions", chat("claude"), unary)
    assert reply.status_code == 200 and reply.headers[COST_HEADER] == usd(expected)
    upstream.handler = anthropic.sse(
        anthropic.stream_of([anthropic.text("ok")], start_usage={**counts, "output_tokens": 1},
                            delta_usage={"output_tokens": 30})
    )  # fmt: skip
    streamed = request_id()
    assert post(gateway, "/v1/chat/completions", chat("claude", stream=True), streamed).status_code == 200
    assert gateway.stop() == 0
    records = {r.request_id: r for r in ledger_records(on_sqlite.database)}
    for rid in (unary, streamed):
        got = records[rid]
        assert (got.prompt_tokens, got.cached_tokens, got.completion_tokens, got.cost_micro) == (
            1240,
            1000,
            30,
            expected,
        )
