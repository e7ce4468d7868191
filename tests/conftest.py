from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.upstream import FakeUpstream
from tests.harness import GatewayProcess


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    server = FakeUpstream().start()
    yield server
    server.stop()


@pytest.fixture
def gateway_factory(tmp_path: Path) -> Iterator[Callable[..., GatewayProcess]]:
    started: list[GatewayProcess] = []

    def start(config: dict[str, Any] | None = None, **kwargs: Any) -> GatewayProcess:
        wait = {k: kwargs.pop(k) for k in ("wait_grpc", "wait_rest") if k in kwargs}
        process = GatewayProcess(config, tmp_path, **kwargs)
        started.append(process)
        return process.start(**wait)

    yield start
    for process in started:
        process.stop()
