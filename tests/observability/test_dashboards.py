"""The Grafana dashboards as files: valid dashboard JSON that Grafana provisions as is, with the panels the issue asks
for. test_prometheus.py runs their queries on a real Prometheus."""

from __future__ import annotations

import re
from itertools import combinations
from pathlib import Path
from typing import Any

import pytest

from tests.observability.stack import DASHBOARD_FILES, GRAFANA_DASHBOARDS, expressions, load_dashboard, panels

TOKENS, OPERATIONS, SPEND = DASHBOARD_FILES
GRID_WIDTH = 24
_RANGE = re.compile(r"(?<=[}\w)])\[([^\]]+)\]")  # range selectors, not regex classes in quotes
_VARIABLE = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")
BUILT_IN = {"__rate_interval", "__interval", "__range"}


@pytest.fixture(params=DASHBOARD_FILES, ids=lambda p: p.name)
def dashboard(request: pytest.FixtureRequest) -> dict[str, Any]:
    path: Path = request.param
    return load_dashboard(path)


def by_title(dashboard: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {panel["title"]: panel for panel in panels(dashboard)}


def exprs(panel: dict[str, Any]) -> list[str]:
    return [target["expr"] for target in panel["targets"]]


def test_only_the_listed_dashboards_are_provisioned() -> None:
    assert sorted(GRAFANA_DASHBOARDS.glob("*.json")) == sorted(DASHBOARD_FILES)
    uids = [load_dashboard(path)["uid"] for path in DASHBOARD_FILES]
    assert len(set(uids)) == len(uids)


def test_dashboard_json_is_what_grafana_provisions(dashboard: dict[str, Any]) -> None:
    assert dashboard["schemaVersion"] == 39
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", dashboard["uid"])
    assert dashboard["title"] and dashboard["time"] == {"from": "now-6h", "to": "now"}
    assert dashboard.get("id") is None, "provisioned dashboards must not carry a database id"
    assert "__inputs" not in dashboard, "an export for sharing, not a provisioned dashboard: reference the uid"

    ids = [panel["id"] for panel in panels(dashboard)]
    assert len(set(ids)) == len(ids), "panel ids must be unique"
    boxes = []
    for panel in panels(dashboard):
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= GRID_WIDTH, panel["title"]
        assert grid["h"] > 0 and grid["y"] >= 0, panel["title"]
        boxes.append((panel["title"], grid))
        assert panel["type"] in {"timeseries", "stat", "barchart"}, panel["type"]
        assert panel["targets"], f"{panel['title']} has no query"
        refs = [target["refId"] for target in panel["targets"]]
        assert len(set(refs)) == len(refs), panel["title"]
    for (a, ga), (b, gb) in combinations(boxes, 2):
        overlap = (
            ga["x"] < gb["x"] + gb["w"]
            and gb["x"] < ga["x"] + ga["w"]
            and ga["y"] < gb["y"] + gb["h"]
            and gb["y"] < ga["y"] + ga["h"]
        )
        assert not overlap, f"panels {a!r} and {b!r} overlap"


def test_queries_use_grafana_intervals_and_defined_variables(dashboard: dict[str, Any]) -> None:
    defined = {variable["name"] for variable in dashboard["templating"]["list"]} | BUILT_IN
    for title, expr in expressions(dashboard):
        for window in _RANGE.findall(expr):
            assert window in ("$__rate_interval", "$__range"), f"{title}: hard-coded window [{window}] in {expr}"
        if "rate(" in expr:
            assert "[$__rate_interval]" in expr, f"{title}: rates use $__rate_interval"
        for match in _VARIABLE.finditer(expr):
            assert (match.group(1) or match.group(2)) in defined, f"{title}: undefined {match.group(0)}"
    for variable in dashboard["templating"]["list"]:
        assert variable["datasource"] == {"type": "prometheus", "uid": "prometheus"}
        assert variable["includeAll"] and variable["allValue"] == ".*"


def test_token_usage_dashboard_has_the_seed_panels() -> None:
    dashboard = load_dashboard(TOKENS)
    assert dashboard["title"] == "LLM Gateway Token Usage"
    panels_by_title = by_title(dashboard)

    for kind in ("prompt", "completion", "total"):
        rates = [
            panel
            for panel in panels_by_title.values()
            if panel["type"] == "timeseries"
            and any(
                e.startswith("sum by (model, provider) (rate(") and f"llm_gateway_{kind}_tokens_total{{" in e
                for e in exprs(panel)
            )
        ]
        assert rates, f"no rate panel of {kind} tokens per model and provider"

    cumulative = panels_by_title["Cumulative total tokens by model and provider"]
    assert cumulative["type"] == "timeseries"
    assert exprs(cumulative) == [
        'sum by (model, provider) (llm_gateway_total_tokens_total{model=~"$model", provider=~"$provider"})'
    ]

    bars = panels_by_title["Cumulative total tokens by model"]
    assert bars["type"] == "barchart"
    (target,) = bars["targets"]
    assert target["expr"].startswith("sum by (model) (llm_gateway_total_tokens_total{")
    assert target["instant"] and target["format"] == "table"
    assert bars["options"]["xField"] == "model"


def test_operations_dashboard_covers_the_operations_metrics() -> None:
    dashboard = load_dashboard(OPERATIONS)
    all_exprs = [expr for _, expr in expressions(dashboard)]

    def covered(*fragments: str) -> bool:
        return any(all(fragment in expr for fragment in fragments) for expr in all_exprs)

    assert covered("rate(llm_gateway_requests_total{"), "request rate"
    assert covered('outcome=~"[45].."', "/ sum by"), "error ratio"
    for quantile in ("0.50", "0.95", "0.99"):
        for histogram in ("request_duration", "time_to_first_token", "overhead", "upstream_duration"):
            assert covered(f"histogram_quantile({quantile},", f"llm_gateway_{histogram}_seconds_bucket"), (
                quantile,
                histogram,
            )
    assert covered("llm_gateway_requests_in_flight"), "in-flight requests"
    assert covered("rate(llm_gateway_upstream_errors_total{", "type"), "upstream errors by type"
    assert covered("llm_gateway_grpc_server_handled_total", "grpc_method, grpc_code"), "gRPC calls by method and code"
    assert covered("llm_gateway_grpc_server_handling_seconds_bucket"), "gRPC latency"


def test_spend_dashboard_shows_cost_by_model_key_and_team_and_unpriced_requests() -> None:
    dashboard = load_dashboard(SPEND)
    assert dashboard["title"] == "LLM Gateway Spend"
    panels_by_title = by_title(dashboard)
    for label in ("model", "key", "team"):
        rate = panels_by_title[f"Spend per hour by {label}"]
        assert rate["type"] == "timeseries"
        assert exprs(rate)[0].startswith(f"sum by ({label}) (rate(llm_gateway_cost_usd_total{{")
        assert rate["fieldConfig"]["defaults"]["unit"] == "currencyUSD"
        bars = panels_by_title[f"Cumulative cost by {label}"]
        (target,) = bars["targets"]
        assert target["expr"].startswith(f"sum by ({label}) (llm_gateway_cost_usd_total{{")
        assert target["instant"] and target["format"] == "table" and bars["options"]["xField"] == label
    all_exprs = [expr for _, expr in expressions(dashboard)]
    assert any("llm_gateway_unpriced_requests_total" in e for e in all_exprs), "unpriced requests"
    assert any("llm_gateway_ledger_buffered" in e for e in all_exprs), "the ledger's buffer"
    burn = exprs(panels_by_title["Budget used (%) by key and team"])[0]
    assert "llm_gateway_budget_spent_usd" in burn and "/ max by (scope, name) (llm_gateway_budget_limit_usd)" in burn
    assert {v["name"] for v in dashboard["templating"]["list"]} == {"model", "provider", "key", "team"}
