"""gateway/cycles.py: one full collection soon after requests are abandoned, whatever the burst.

On a real loop with the collector's own timers, and through a real gateway whose client goes away
while the upstream has its request."""

from __future__ import annotations

import asyncio
import gc
import time
import weakref
from pathlib import Path
from typing import Any

import grpc

from gateway.cycles import CycleCollector
from llm_gateway.v1 import chat_pb2, chat_pb2_grpc
from tests.fakes.upstream import FakeUpstream
from tests.harness import GatewayProcess
from tests.rest_facade.rest import open_request


class _Node:
    def __init__(self) -> None:
        self.other: Any = self
        self.buffer = bytearray(1 << 20)


def test_a_burst_is_one_collection_and_the_next_waits_for_the_interval() -> None:
    async def go() -> None:
        collector = CycleCollector(delay=0.05, min_interval=60.0)
        gc.disable()  # only the collector may free the cycle
        try:
            node = _Node()
            alive = weakref.ref(node)
            del node
            for _ in range(5):
                collector.soon()
            assert alive() is not None
            await asyncio.sleep(0.3)
            assert alive() is None, "the scheduled collection did not free the cycle"
            assert collector.collections == 1
            collector.soon()  # within min_interval of the last: due a minute after it, not now
            await asyncio.sleep(0.2)
            assert collector.collections == 1
            assert collector._pending is not None
            collector._pending.cancel()
        finally:
            gc.enable()

    asyncio.run(go())


LINE = "reference cycles collected after an abandoned request"


def _config(fake: FakeUpstream) -> dict[str, Any]:
    return {
        "logging": {"level": "DEBUG"},
        "providers": {"openai": {"type": "openai", "api_url": f"{fake.url}/v1", "api_key": "sk-upstream"}},
        "models": {"gpt-4o": "openai"},
        "usage": {"database": ""},
    }


def _collected(gateway: GatewayProcess, more_than: int = 0) -> int:
    deadline = time.monotonic() + 20
    while gateway.log_text().count(LINE) <= more_than and time.monotonic() < deadline:
        time.sleep(0.1)
    return gateway.log_text().count(LINE)


def test_a_client_that_goes_away_is_followed_by_a_collection(tmp_path: Path) -> None:
    fake = FakeUpstream().start()
    gateway = GatewayProcess(_config(fake), tmp_path).start()
    try:
        fake.hang()
        abandoned = 3
        for _ in range(abandoned):
            fake.received.clear()
            with open_request(gateway.base_url, {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}):
                fake.last()  # the upstream has it; the client goes away
        assert _collected(gateway) >= 1, gateway.log_text()[-3000:]
        time.sleep(1.5)  # any other collection of this burst is due by now
        assert 1 <= gateway.log_text().count(LINE) <= abandoned
    finally:
        gateway.stop()
        fake.stop()


def test_a_grpc_call_its_client_cancels_is_followed_by_a_collection(tmp_path: Path) -> None:
    fake = FakeUpstream().start()
    gateway = GatewayProcess(_config(fake), tmp_path).start()
    try:
        fake.hang()
        request = chat_pb2.CreateChatCompletionRequest(
            model="gpt-4o", messages=[chat_pb2.ChatMessage(role="user", content_text="hi")]
        )
        with grpc.insecure_channel(gateway.grpc_address) as channel:
            stub = chat_pb2_grpc.ChatServiceStub(channel)  # type: ignore[no-untyped-call]
            call = stub.CreateChatCompletion.future(request, timeout=30)
            fake.last()  # the upstream has it; the client cancels
            call.cancel()
        assert _collected(gateway) >= 1, gateway.log_text()[-3000:]
    finally:
        gateway.stop()
        fake.stop()
