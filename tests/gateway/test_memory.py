"""What a started gateway worker has imported. Every module costs RSS in every worker (bench/profile-notes.md,
round 2: memory), so modules it never uses, and those of features its config leaves off, stay out.

The gateway is a real `python -m gateway.cli` process; a `sitecustomize` on its PYTHONPATH only adds a
SIGUSR1 handler that writes the names in `sys.modules` to a file.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from tests.harness import GatewayProcess, free_port

_SITECUSTOMIZE = """
import os, signal, sys

def _dump(signum, frame):
    out = os.environ["GATEWAY_MODULES_OUT"]
    with open(out + ".part", "w") as file:
        file.write("\\n".join(sorted(sys.modules)))
    os.replace(out + ".part", out)

signal.signal(signal.SIGUSR1, _dump)
"""

# Never wanted in a worker: Sanic's dev TLS certificates (trustme, the cryptography bindings), redis-py's
# OpenTelemetry metrics SDK, and Swagger UI's bundle until someone opens the docs.
NEVER = ("trustme", "cryptography.hazmat.bindings._rust", "opentelemetry.sdk.metrics", "swagger_ui_bundle")


def _config(**extra: Any) -> dict[str, Any]:
    return {
        "logging": {"level": "WARNING"},
        "providers": {"dummy": {"type": "dummy"}},
        "models": {"dummy": "dummy"},
        "usage": {"database": ""},
        **extra,
    }


def _started(config: dict[str, Any], workdir: Path) -> tuple[GatewayProcess, Path]:
    site = workdir / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    out = workdir / f"modules-{free_port()}.txt"
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    env = {"PYTHONPATH": path, "GATEWAY_MODULES_OUT": str(out)}
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_TRACES_EXPORTER"):
        env[name] = ""  # tracing off, whatever the caller's environment says
    return GatewayProcess(config, workdir, env=env).start(), out


def _modules(gateway: GatewayProcess, out: Path) -> set[str]:
    assert gateway.process is not None
    os.kill(gateway.process.pid, signal.SIGUSR1)
    deadline = time.monotonic() + 20
    while not out.exists():
        assert time.monotonic() < deadline, f"no module list from the gateway:\n{gateway.log_text()}"
        time.sleep(0.05)
    return set(out.read_text().split())


def _check(config: dict[str, Any], workdir: Path) -> set[str]:
    gateway, out = _started(config, workdir)
    try:
        modules = _modules(gateway, out)
    finally:
        gateway.stop()
    assert {"sanic", "grpc", "service.chat", "rest_facade.server"} <= modules  # the list is a worker's
    assert not modules & set(NEVER)
    return modules


def test_a_plain_gateway_imports_no_database_driver(tmp_path: Path) -> None:
    modules = _check(_config(), tmp_path)
    assert "asyncpg" not in modules
    assert "sqlite3" not in modules


def test_the_sqlite_ledger_imports_sqlite_only(tmp_path: Path) -> None:
    modules = _check(_config(usage={"database": f"sqlite:///{tmp_path / 'usage.db'}"}), tmp_path)
    assert "sqlite3" in modules
    assert "asyncpg" not in modules


def test_redis_state_loads_redis_py_without_the_metrics_sdk(tmp_path: Path) -> None:
    # Nothing listens on the port: the limits fall back to memory, and redis-py is imported all the same.
    redis_url = f"redis://127.0.0.1:{free_port()}/0"
    modules = _check(_config(state={"redis_url": redis_url}), tmp_path)
    assert "redis.asyncio" in modules


def test_the_docs_load_swagger_ui_on_their_first_request(tmp_path: Path) -> None:
    import urllib.request

    gateway, out = _started(_config(), tmp_path)
    try:
        with urllib.request.urlopen(f"{gateway.base_url}/swagger/swagger-ui.css", timeout=10) as response:
            assert response.status == 200
            assert len(response.read()) > 1000
        assert "swagger_ui_bundle" in _modules(gateway, out)
    finally:
        gateway.stop()


def test_absent_blocks_an_import_for_its_block_only() -> None:
    import importlib
    import sys

    import pytest

    from gateway.runner import absent

    sys.modules.pop("tabnanny", None)
    with absent(("sys", "tabnanny")):
        assert sys.modules["sys"] is sys  # imported already: left as it is
        with pytest.raises(ImportError):
            importlib.import_module("tabnanny")
    assert importlib.import_module("tabnanny").__name__ == "tabnanny"
