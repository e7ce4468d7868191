"""Real gateway processes for the REST facade tests, in both process modes.

`stack` is module-scoped and parametrized: every test runs against
  - "inprocess": one process, gRPC service + facade calling it in-process (the default);
  - "remote":    a `--grpc-only` service process and a `--grpc-target` facade-only process.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.fakes.upstream import FakeUpstream, completion
from tests.harness import GatewayProcess, free_port

OPENAI_KEY = "sk-test-provider-0123456789"
CLIENT_KEY = "sk-client-secret-abcdef"
UPSTREAM_MODEL = "gpt-4o-2024-08-06"
MAX_BODY = 64 * 1024
MODES = ("inprocess", "remote")


def gateway_config(fake: FakeUpstream, **server: Any) -> dict[str, Any]:
    return {
        "server": {"max_body_bytes": MAX_BODY, "request_timeout": 30, **server},
        "logging": {"level": "INFO"},
        # No service-side retries or cooldowns: each request reaches the upstream once, and a test's
        # failures cannot bench a deployment for the tests after it.
        "routing": {"retries": 0, "cooldown_failures": 1_000_000},
        "providers": {
            "openai": {"api_key": OPENAI_KEY, "api_url": f"{fake.url}/v1", "is_openai_compatible": True},
            "slow": {"type": "openai", "api_url": f"{fake.url}/v1", "read_timeout": 1},
            "down": {"type": "openai", "api_url": f"http://127.0.0.1:{free_port()}/v1"},
        },
        "models": {
            "gpt-4o": {"provider": "openai", "model": UPSTREAM_MODEL},
            "gpt-4o-mini": "openai",
            "slow": "slow",
            "broken": "down",
        },
    }


@dataclass
class Stack:
    mode: str
    rest: GatewayProcess
    grpc: GatewayProcess
    processes: list[GatewayProcess] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return self.rest.base_url

    @property
    def grpc_address(self) -> str:
        return self.grpc.grpc_address

    def alive(self) -> bool:
        return all(p.process is not None and p.process.poll() is None for p in self.processes)

    def stop(self) -> None:
        """SIGTERM, facade first; every process must exit cleanly."""
        codes = [process.stop() for process in reversed(self.processes)]
        assert codes == [0] * len(codes), [p.log_text()[-2000:] for p in self.processes]


def start_stack(mode: str, config: dict[str, Any], workdir: Any) -> Stack:
    if mode == "inprocess":
        both = GatewayProcess(config, workdir).start()
        return Stack(mode, both, both, [both])
    service = GatewayProcess(config, workdir, args=("--grpc-only",)).start()
    try:
        facade = GatewayProcess(config, workdir, args=("--grpc-target", service.grpc_address)).start(wait_grpc=False)
    except BaseException:
        service.stop()
        raise
    return Stack(mode, facade, service, [service, facade])


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstream]:
    server = FakeUpstream().start()
    yield server
    server.stop()


@pytest.fixture(scope="module", params=MODES)
def stack(
    request: pytest.FixtureRequest, fake: FakeUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    started = start_stack(request.param, gateway_config(fake), tmp_path_factory.mktemp(request.param))
    yield started
    started.stop()


@pytest.fixture(autouse=True)
def reset(fake: FakeUpstream) -> None:
    fake.received.clear()
    fake.disconnected.clear()
    fake.reply(200, completion())
