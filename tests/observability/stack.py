"""Paths of the deployment files, and the system tools their tests need (installed by .ci/run)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.harness import ROOT

COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PROMETHEUS_CONFIG = ROOT / "prometheus" / "prometheus.yml"
GRAFANA_PROVISIONING = ROOT / "grafana" / "provisioning"
GRAFANA_DASHBOARDS = ROOT / "grafana" / "dashboards"
DASHBOARD_FILES = (
    GRAFANA_DASHBOARDS / "llm-gateway-tokens.json",
    GRAFANA_DASHBOARDS / "llm-gateway-operations.json",
    GRAFANA_DASHBOARDS / "llm-gateway-spend.json",
)


def require_tool(name: str, package: str) -> str:
    """The path of a system tool; FAIL (never skip) when it is missing, naming the package to install."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"`{name}` is not installed. These tests need Debian's `{package}` package: .ci/run installs it "
            f"(as root: apt-get install {package}).",
            pytrace=False,
        )
    return path


# The Operations dashboard's per-key row: it needs keys, limits and Redis to have data, which
# test_prometheus_keys.py sets up (test_prometheus.py's gateway has none of them).
KEY_PANEL_TITLES = (
    "Requests / s by key",
    "Tokens / s by key",
    "Rate limited (429) / s by key",
    "State backend (Redis)",
)
# The Spend dashboard's budget panels: they need keys with budgets, which test_prometheus_budgets.py sets up.
BUDGET_PANEL_TITLES = ("Budget used (%) by key and team", "Budget spent and left (USD)")


def load_dashboard(path: Path) -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return dashboard


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    found: list[dict[str, Any]] = []
    for panel in dashboard.get("panels", []):
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of every panel."""
    return [
        (panel.get("title", ""), target["expr"])
        for panel in panels(dashboard)
        for target in panel.get("targets", [])
        if target.get("expr")
    ]
