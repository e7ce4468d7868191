"""The supervisor of several workers: the metrics directory it makes for them goes when it stops."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness import GatewayProcess


def _gateway(tmp_path: Path, env: dict[str, str]) -> GatewayProcess:
    return GatewayProcess(None, tmp_path, env=env, args=("--workers", "2")).start()  # the built-in default


def test_the_metrics_directory_it_made_is_removed_when_it_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    gateway = _gateway(tmp_path, {"TMPDIR": str(scratch)})
    made = list(scratch.glob("llm-gateway-metrics-*"))
    assert len(made) == 1 and any(made[0].iterdir()), gateway.log_text()  # the workers' files are there
    assert gateway.stop() == 0
    assert not list(scratch.glob("llm-gateway-metrics-*"))


def test_a_metrics_directory_the_operator_gave_is_left_alone(tmp_path: Path) -> None:
    given = tmp_path / "metrics"
    given.mkdir()
    gateway = _gateway(tmp_path, {"PROMETHEUS_MULTIPROC_DIR": str(given)})
    assert any(given.iterdir())
    assert gateway.stop() == 0
    assert given.is_dir() and any(given.iterdir())
