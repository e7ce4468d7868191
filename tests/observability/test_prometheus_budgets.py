"""The Spend dashboard's budget panels against a real Prometheus scraping a gateway whose key and team have budgets:
every query of the panels returns data, and the spend they show is the ledger's: the usage times the prices."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from service.spend import builtin
from tests.fakes.upstream import FakeUpstream
from tests.harness import GatewayProcess
from tests.observability.stack import BUDGET_PANEL_TITLES, DASHBOARD_FILES, expressions, load_dashboard
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

SPEND = DASHBOARD_FILES[2]
REQUESTS = 5


def test_the_budget_panels_against_prometheus(
    upstream: FakeUpstream,
    gateway_factory: Callable[..., GatewayProcess],
    prometheus_for: Callable[[GatewayProcess], Prometheus],  # noqa: F811
    tmp_path: Path,
) -> None:
    upstream.by_stream_flag()
    gateway = gateway_factory(
        {
            "providers": {"openai": {"type": "openai", "api_key": "sk-test", "api_url": f"{upstream.url}/v1"}},
            "models": {"gpt-4o": "openai"},
            "routing": {"retries": 0},
            "auth": {
                "keys": [  # post_chat sends "Bearer client-key"
                    {"name": "alpha", "key": "client-key", "metadata": {"team": "search"},
                     "budget": {"usd": 1, "period": "month"}},
                ],
                "teams": {"search": {"budget": {"usd": 2, "period": "day"}}},
            },
            "budgets": {"metrics_interval": 0.2},
            "usage": {"database": f"sqlite:///{tmp_path}/usage.db", "flush_interval": 0.05},
        }
    )  # fmt: skip
    prometheus = prometheus_for(gateway)
    for _ in range(REQUESTS):
        assert post_chat(gateway, {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hello"}]}) == 200
    price = builtin().lookup("gpt-4o")
    assert price is not None
    spent = REQUESTS * price.cost(UNARY_USAGE[0], 0, UNARY_USAGE[1]) / 1_000_000

    def budgets() -> dict[tuple[str, str], float]:
        vector = prometheus.vector("max by (scope, name) (llm_gateway_budget_spent_usd)")
        return {(dict(k)["scope"], dict(k)["name"]): v for k, v in vector.items()}

    assert eventually(lambda: budgets() == pytest.approx({("key", "alpha"): spent, ("team", "search"): spent}))

    dashboard = load_dashboard(SPEND)
    variables = dashboard_variables(dashboard)
    checked = 0
    for title, expr in expressions(dashboard):
        if title in BUDGET_PANEL_TITLES:
            answered(prometheus, substitute(expr, variables), title)
            checked += 1
    assert checked == 3
    by = "max by (scope, name)"
    used = prometheus.vector(f"100 * {by} (llm_gateway_budget_spent_usd) / {by} (llm_gateway_budget_limit_usd)")
    assert {dict(k)["name"]: v for k, v in used.items()} == pytest.approx(
        {"alpha": 100 * spent / 1, "search": 100 * spent / 2}
    )
