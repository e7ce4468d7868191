"""SIGTERM with requests in flight: after the grace period a waiting request gets a 503 and a stream
ends with an error event and [DONE], never a cut connection; the process exits 0."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import orjson

from tests.fakes.upstream import FakeUpstream, chunks
from tests.harness import GatewayProcess

from .conftest import gateway_config
from .rest import Reply, open_request, post, sse_events

HELLO = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}


def test_sigterm_ends_requests_in_flight_properly(fake: FakeUpstream, tmp_path: Path) -> None:
    gateway = GatewayProcess(gateway_config(fake), tmp_path).start()
    fake.stream(chunks()[:2], done=False, hold=True)
    with open_request(gateway.base_url, {**HELLO, "stream": True}) as conn:
        stream = conn.getresponse()
        assert stream.status == 200
        first = stream.readline()
        fake.hang()
        waiting: list[Reply] = []
        thread = threading.Thread(target=lambda: waiting.append(post(gateway.base_url, HELLO)))
        thread.start()
        deadline = time.monotonic() + 10
        while len(fake.received) < 2 and time.monotonic() < deadline:  # the fake has no event for this
            time.sleep(0.01)
        assert len(fake.received) == 2  # the unary request is at the upstream too
        assert gateway.stop() == 0
        thread.join()
        rest = stream.read()
    events = sse_events(first + rest)
    assert events[-1] == b"[DONE]"
    assert orjson.loads(events[-2])["error"]["code"] == "shutting_down"
    assert "shutting down" in orjson.loads(events[-2])["error"]["message"]
    assert waiting[0].status == 503 and waiting[0].error["code"] == "shutting_down"
