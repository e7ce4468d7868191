"""A request must not fail because the upstream closed a kept-alive connection just as it was reused.

The servers here close a connection at the moment it is reused, the way nginx, Go servers and load
balancers do when their idle timer fires as the client writes: after reading the request (the client
sees EOF), or without reading it (the kernel answers the unread bytes with a reset). `retry_reused=False`
is the client without the fix: then every reused request fails, so the same test shows both sides.
"""

from __future__ import annotations

import asyncio
import random
import re
import socket
import struct
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvloop

from service.providers import http1
from tests.service.test_http1 import COMPLETION, OK, Server, ThreadedServer, read_request, request_bytes

LOOPS = {"asyncio": asyncio.run, "uvloop": uvloop.run}


def closing_on_reuse(how: str) -> Any:
    """Answers the first request on each connection; closes the connection when a second one comes."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(OK)
        await writer.drain()
        await reader.read(1)  # the next request's first byte: the connection is being reused
        sock = writer.get_extra_info("socket")
        if how == "reset":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:  # read the whole request, answer nothing, close: the client sees EOF
            await reader.readuntil(b"\r\n\r\n")
        writer.close()

    return script


async def hundred(pool: http1.Pool) -> list[str]:
    outcomes = []
    for _ in range(100):
        try:
            response = await pool.request(request_bytes(pool))
            outcomes.append(f"{response.status} {(await response.read()).decode()}")
            response.release()
        except http1.HTTPClientError as exc:
            outcomes.append(type(exc).__name__)
    return outcomes


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("how", ["eof", "reset"])
@pytest.mark.parametrize("retry", [True, False], ids=["retry", "no-retry"])
def test_a_connection_closed_as_it_is_reused_is_replaced_at_once(loop: str, how: str, retry: bool) -> None:
    retries: list[None] = []

    async def main() -> None:
        async with Server(closing_on_reuse(how)) as server:
            pool = http1.Pool(server.url(), retry_reused=retry, on_retry=lambda: retries.append(None))
            outcomes = await hundred(pool)
            await pool.close()
        failed = [outcome for outcome in outcomes if outcome != '200 {"ok":true}']
        if retry:
            assert failed == []
            assert len(retries) == 99  # every request after the first met a closed connection
            assert server.connections == 100
        else:  # the client without the fix: at least one request in a hundred fails (here all reused ones)
            assert len(failed) >= 1
            assert set(failed) == {"Disconnected"}
            assert retries == []

    LOOPS[loop](main())


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("retry", [True, False], ids=["retry", "no-retry"])
def test_an_idle_timer_racing_the_reuse_fails_no_request(loop: str, retry: bool) -> None:
    """The server closes each connection once it has been idle 0 to 2 ms, as the client reuses it
    after 0 to 2 ms: every way the race can end (FIN seen before the reuse, request met by EOF or a
    reset) must end in a 200. Without the retry about a third of the requests fail here."""
    rng = random.Random(12)

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        idle: float | None = None  # the first request may take its time
        while True:
            try:
                async with asyncio.timeout(idle):
                    await read_request(reader)
            except TimeoutError:
                return  # closed, whatever part of a request may have arrived meanwhile
            writer.write(OK)
            await writer.drain()
            idle = rng.uniform(0, 0.002)

    async def main() -> None:
        async with Server(script) as server:
            pool = http1.Pool(server.url(), retry_reused=retry)
            outcomes: list[int | str] = []
            for _ in range(200):
                await asyncio.sleep(rng.uniform(0, 0.002))
                try:
                    response = await pool.request(request_bytes(pool))
                    outcomes.append(response.status)
                    await response.read()
                    response.release()
                except http1.HTTPClientError as exc:
                    outcomes.append(type(exc).__name__)
            await pool.close()
        if retry:
            assert outcomes == [200] * 200
        else:
            assert outcomes.count("Disconnected") >= 2 and set(outcomes) == {200, "Disconnected"}

    LOOPS[loop](main())


def test_a_connection_closed_after_answer_bytes_arrived_is_not_retried() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(OK)
        await writer.drain()
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-len")  # part of an answer: the request may have run
        await writer.drain()

    async def main() -> None:
        async with Server(script) as server:
            pool = http1.Pool(server.url(), on_retry=lambda: pytest.fail("retried"))
            response = await pool.request(request_bytes(pool))
            await response.read()
            response.release()
            with pytest.raises(http1.Disconnected):
                await pool.request(request_bytes(pool))
            assert server.connections == 1
            await pool.close()

    asyncio.run(main())


def test_a_fresh_connection_that_fails_is_not_retried() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)  # and close without answering

    async def main() -> None:
        async with Server(script) as server:
            pool = http1.Pool(server.url(), on_retry=lambda: pytest.fail("retried"))
            with pytest.raises(http1.Disconnected):
                await pool.request(request_bytes(pool))
            assert server.connections == 1

    asyncio.run(main())


def test_the_retry_happens_once() -> None:
    """A second close, on the new connection too, is the upstream's failure: it reaches the caller."""
    served = 0

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        await read_request(reader)
        served += 1
        if served == 1:
            writer.write(OK)
            await writer.drain()
            await read_request(reader)  # reused: close without answering

    async def main() -> None:
        async with Server(script) as server:
            retries: list[None] = []
            pool = http1.Pool(server.url(), on_retry=lambda: retries.append(None))
            response = await pool.request(request_bytes(pool))
            await response.read()
            response.release()
            with pytest.raises(http1.Disconnected):
                await pool.request(request_bytes(pool))
            assert retries == [None]
            assert server.connections == 2

    asyncio.run(main())


async def answer_once_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """An OpenAI-like upstream that closes every connection at the moment it is reused."""
    await read_request(reader)
    writer.write(COMPLETION)
    await writer.drain()
    await read_request(reader)


@pytest.fixture
def closing_upstream() -> Iterator[ThreadedServer]:
    with ThreadedServer(answer_once_then_close) as upstream:
        yield upstream


def test_the_gateway_serves_every_request_and_counts_the_retries(gateway_factory: Any, closing_upstream: Any) -> None:
    config = {
        "providers": {"local": {"type": "openai", "api_url": f"http://127.0.0.1:{closing_upstream.port}/v1"}},
        "models": {"gpt-4o": {"provider": "local", "model": "upstream-model"}},
    }
    gateway = gateway_factory(config)
    with httpx.Client(base_url=gateway.base_url, timeout=30) as client:
        statuses = [
            client.post(
                "/v1/chat/completions", json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
            )
            for _ in range(100)
        ]
        assert [response.status_code for response in statuses] == [200] * 100
        metrics = client.get("/metrics").text
    assert 'llm_gateway_upstream_connection_retries_total{provider="local"} 99.0' in metrics
    # Not a routing retry and not a failure: nothing counted against the deployment, which stays healthy.
    counted = re.findall(
        r"^(llm_gateway_(?:retries|upstream_errors)_total|llm_gateway_deployment_state)\{.*\} (\S+)$", metrics, re.M
    )
    assert counted and all(float(value) == 0 for _, value in counted)
