"""`--workers 2`: two processes share the REST and gRPC ports and both serve; the configured
request timeout is the deadline when the client sends none, and caps the one it sends."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fakes.upstream import FakeUpstream
from tests.harness import GatewayProcess

from .conftest import gateway_config
from .rest import call, post

HELLO = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def workers(fake: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    config = gateway_config(fake, request_timeout=1)
    process = GatewayProcess(config, tmp_path_factory.mktemp("workers"), args=("--workers", "2")).start()
    yield process
    assert process.stop() == 0


def test_two_workers_share_the_port_and_serve(workers: GatewayProcess, fake: FakeUpstream) -> None:
    def both_listening(_: object) -> bool:
        return sum(line["msg"] == "rest listening" for line in workers.log_lines()) == 2

    workers.wait_log(both_listening)
    fake.by_stream_flag()
    replies = [post(workers.base_url, {**HELLO, "stream": i % 2 == 1}) for i in range(20)]
    assert [r.status for r in replies] == [200] * 20
    assert call(workers.base_url, "GET", "/readyz").status == 200
    assert len(fake.received) == 20


def test_configured_request_timeout_is_the_deadline(workers: GatewayProcess, fake: FakeUpstream) -> None:
    fake.hang()
    assert post(workers.base_url, HELLO).status == 504
    # A longer client timeout is capped by server.request_timeout (1 s here).
    assert post(workers.base_url, HELLO, headers={"x-request-timeout": "120"}).status == 504
    assert fake.wait_disconnected()
