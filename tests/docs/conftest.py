"""One real gateway per test module, with only the built-in dummy model: no upstream, deterministic answers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.harness import GatewayProcess

DUMMY_ONLY = {"logging": {"level": "INFO"}, "models": {"dummy": "dummy"}}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    process = GatewayProcess(DUMMY_ONLY, tmp_path_factory.mktemp("docs-gateway")).start()
    yield process
    assert process.stop() == 0, process.log_text()[-3000:]
