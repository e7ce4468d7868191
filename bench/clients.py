"""`python -m bench.clients`: CPU per request of the upstream HTTP clients, against the bench's nginx.

The measurement behind the choice of client in service/providers/openai_compat.py: the same POST
(the unary body) through aiohttp's ClientSession and through the gateway's own `http1.Pool`, at
concurrency 32 on one uvloop loop, alternating A/B/A/B so drift shows. Prints µs of process CPU per
request and req/s for each. aiohttp is a dev dependency (the tests' fake upstreams use it).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import orjson
import uvloop

from service.providers import http1

from .procs import free_port
from .upstream import Nginx

BODY = orjson.dumps({"model": "bench-unary", "messages": [{"role": "user", "content": "Hello"}]})
HEADERS = {"content-type": "application/json", "accept": "application/json", "authorization": "Bearer sk-bench"}


async def _measure(name: str, one: Callable[[], Awaitable[bytes]], requests: int, concurrency: int) -> str:
    async def worker(count: int) -> None:
        for _ in range(count):
            await one()

    await asyncio.gather(*(worker(50) for _ in range(concurrency)))  # warm-up: connections open
    wall, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker(requests // concurrency) for _ in range(concurrency)))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    done = requests // concurrency * concurrency
    return f"{name:8} {cpu / done * 1e6:6.1f} µs CPU/request  {done / wall:8,.0f} req/s"


async def _aiohttp(url: str, requests: int, concurrency: int) -> str:
    connector = aiohttp.TCPConnector(limit=100)
    async with aiohttp.ClientSession(connector=connector, skip_auto_headers=("User-Agent",)) as session:

        async def one() -> bytes:
            async with session.post(url, data=BODY, headers=HEADERS) as response:
                return await response.read()

        return await _measure("aiohttp", one, requests, concurrency)


async def _http1(url: str, requests: int, concurrency: int) -> str:
    pool = http1.Pool(url, read_timeout=600)
    request = http1.with_body(http1.render_head("POST", url, HEADERS), BODY)

    async def one() -> bytes:
        response = await pool.request(request)
        try:
            return await response.read()
        finally:
            response.release()

    try:
        return await _measure("http1", one, requests, concurrency)
    finally:
        await pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.clients", description=__doc__)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    nginx = Nginx(Path(tempfile.mkdtemp(prefix="bench-clients-")), free_port(), None).start()
    try:
        url = nginx.url("unary") + "/chat/completions"
        for _ in range(args.rounds):
            for run in (_aiohttp, _http1):
                print(uvloop.run(run(url, args.requests, args.concurrency)))
    finally:
        nginx.stop()


if __name__ == "__main__":
    main()
