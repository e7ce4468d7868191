"""The Operations dashboard's per-key row against a real Prometheus scraping a gateway with keys, limits and a
real Redis: every query of the row returns data, and the per-key counts are exactly the traffic sent."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.fakes.upstream import FakeUpstream
from tests.harness import GatewayProcess
from tests.observability.stack import DASHBOARD_FILES, KEY_PANEL_TITLES, expressions, load_dashboard
from tests.observability.test_prometheus import (  # noqa: F401 - prometheus_for is a fixture
    UNARY_USAGE,
    Prometheus,
    answered,
    dashboard_variables,
    eventually,
    post_chat,
    prometheus_for,
    substitute,
)
from tests.service.tenancy.conftest import RedisServer

OPERATIONS = DASHBOARD_FILES[1]


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


def test_the_operations_dashboard_has_a_per_key_row() -> None:
    dashboard = load_dashboard(OPERATIONS)
    row = {p["title"]: p for p in dashboard["panels"] if p["title"] in KEY_PANEL_TITLES}
    assert list(row) == list(KEY_PANEL_TITLES)
    assert len({p["gridPos"]["y"] for p in row.values()}) == 1, "one row"
    exprs = " ".join(t["expr"] for p in row.values() for t in p["targets"])
    for fragment in (
        "sum by (key, outcome) (rate(llm_gateway_key_requests_total{",
        "sum by (key, type) (rate(llm_gateway_key_tokens_total{",
        "sum by (key, scope, kind) (rate(llm_gateway_rate_limited_total[",
        "llm_gateway_state_backend_up",
        "llm_gateway_state_backend_errors_total",
    ):
        assert fragment in exprs


def test_the_per_key_row_against_prometheus(
    upstream: FakeUpstream,
    redis: RedisServer,
    gateway_factory: Callable[..., GatewayProcess],
    prometheus_for: Callable[[GatewayProcess], Prometheus],  # noqa: F811
) -> None:
    upstream.by_stream_flag()
    gateway = gateway_factory(
        {
            "providers": {"openai": {"type": "openai", "api_key": "sk-test", "api_url": f"{upstream.url}/v1"}},
            "models": {"gpt-4o": "openai"},
            "routing": {"retries": 0},
            "auth": {
                "keys": [
                    {"name": "alpha", "key": "client-key", "limits": {"rpm": 100}},
                    {"name": "tight", "key": "tight-client-key", "limits": {"rpm": 1}},
                ]
            },
            "state": {"redis_url": redis.url, "timeout": 1.0},
        }
    )
    prometheus = prometheus_for(gateway)
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hello"}]}
    statuses: list[int] = []
    tight = {"authorization": "Bearer tight-client-key"}

    def one_round() -> None:
        statuses.extend(post_chat(gateway, body) for _ in range(2))  # post_chat sends "Bearer client-key"
        for _ in range(2):
            reply = httpx.post(f"{gateway.base_url}/v1/chat/completions", json=body, headers=tight, timeout=10)
            statuses.append(reply.status_code)

    def scraped() -> float | None:
        return prometheus.scalar("sum(llm_gateway_key_requests_total)")

    one_round()
    assert eventually(lambda: scraped() == 4)
    one_round()
    assert eventually(lambda: scraped() == 8)
    assert statuses == [200, 200, 200, 429, 200, 200, 429, 429]  # rpm 1: one a minute

    requests = prometheus.vector("sum by (key, outcome) (llm_gateway_key_requests_total)")
    assert {tuple(v for _, v in k): n for k, n in requests.items() if n} == {
        ("alpha", "200"): 4,
        ("tight", "200"): 1,
        ("tight", "429"): 3,
    }
    tokens = prometheus.vector("sum by (key, type) (llm_gateway_key_tokens_total)")
    assert {tuple(v for _, v in k): n for k, n in tokens.items() if n} == {
        ("alpha", "prompt"): 4 * UNARY_USAGE[0],
        ("alpha", "completion"): 4 * UNARY_USAGE[1],
        ("tight", "prompt"): UNARY_USAGE[0],
        ("tight", "completion"): UNARY_USAGE[1],
    }
    limited = prometheus.vector("sum by (key, scope, kind) (llm_gateway_rate_limited_total)")
    assert {tuple(v for _, v in k): n for k, n in limited.items() if n} == {
        ("tight", "requests", "key"): 3
    }  # key, kind, scope
    assert prometheus.scalar('min(llm_gateway_state_backend_up{backend="redis"})') == 1

    dashboard = load_dashboard(OPERATIONS)
    variables = dashboard_variables(dashboard)
    checked = 0
    for title, expr in expressions(dashboard):
        if title not in KEY_PANEL_TITLES:
            continue
        answered(prometheus, substitute(expr, variables), title)
        checked += 1
    assert checked == 5
    # No key's secret reached a label.
    text = prometheus.api("/api/v1/label/key/values")
    assert sorted(text["data"]) == ["alpha", "tight"]
