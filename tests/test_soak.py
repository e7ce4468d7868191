"""A soak under injected faults: 5,000 requests, unary and streamed, ~20% of upstream answers faulty,
a fallback configured. Every request succeeds or gets a well-formed OpenAI error, reported token metrics
equal the usage actually served (streams cut short are counted apart, as estimated), and nothing leaks."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from tests.fakes.upstream import FakeUpstream, chunks, completion
from tests.harness import GatewayProcess
from tests.service.test_metrics import scrape, tokens, value

REQUESTS = 5000
CONCURRENCY = 32


def _faulty(fake: FakeUpstream, rate: float, seed: int) -> None:
    """Answer like OpenAI, except for a seeded `rate` of requests, which get one of the faults."""
    rng = random.Random(seed)
    unary_ok = fake.replying(200, completion())
    stream_ok = fake.streaming(chunks())
    faults = [
        fake.replying(500, {"error": {"message": "boom", "type": "server_error"}}),
        fake.replying(503, b"<html>Service Unavailable</html>", content_type="text/html"),
        fake.replying(429, {"error": {"message": "slow down", "type": "requests"}}, headers={"retry-after": "0"}),
        fake.replying(200, b'{"choices": [tru'),
        fake.cutting(completion()),
    ]
    stream_faults = [
        fake.streaming([], done=False, drop=True),  # drops before the first chunk: retried
        fake.streaming(chunks()[:2], done=False, drop=True, delay=0.01),  # drops after it: an error event
        fake.streaming(chunks()[:-1], done=False),  # no usage and no [DONE]
    ]

    async def handle(request: web.Request) -> web.StreamResponse:
        stream = b'"stream":true' in fake.received[-1].body
        if rng.random() < rate:
            return await rng.choice(faults + (stream_faults if stream else []))(request)
        return await (stream_ok if stream else unary_ok)(request)

    fake.handler = handle


async def _drive(base_url: str) -> tuple[dict[str, int], tuple[int, int, int]]:
    outcomes: dict[str, int] = {}
    served = [0, 0, 0]
    rng = random.Random(7)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(REQUESTS):
        queue.put_nowait(i)

    async def one(session: aiohttp.ClientSession) -> None:
        stream = rng.random() < 0.5
        body: dict[str, Any] = {"model": "main", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
        if stream and rng.random() < 0.5:
            body["stream_options"] = {"include_usage": True}
        async with session.post(f"{base_url}/v1/chat/completions", json=body) as response:
            raw = await response.read()
        if response.status != 200:
            error = orjson.loads(raw)["error"]
            assert set(error) >= {"message", "type", "param", "code"}, raw
            outcomes[str(response.status)] = outcomes.get(str(response.status), 0) + 1
            return
        if not stream:
            usage = orjson.loads(raw)["usage"]
            served[0] += usage["prompt_tokens"]
            served[1] += usage["completion_tokens"]
            served[2] += usage["total_tokens"]
            outcomes["200"] = outcomes.get("200", 0) + 1
            return
        events = [e[len(b"data: ") :] for e in raw.split(b"\n\n") if e.startswith(b"data: ")]
        assert events[-1] == b"[DONE]", raw
        payloads = [orjson.loads(e) for e in events[:-1]]
        if "error" in payloads[-1]:
            assert set(payloads[-1]["error"]) >= {"message", "type", "param", "code"}
            outcomes["stream-error"] = outcomes.get("stream-error", 0) + 1
            return
        outcomes["200"] = outcomes.get("200", 0) + 1
        served[0], served[1], served[2] = served[0] + 9, served[1] + 3, served[2] + 12  # the fake's stream usage

    async def worker(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            queue.get_nowait()
            await one(session)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        await asyncio.gather(*(worker(session) for _ in range(CONCURRENCY)))
    return outcomes, (served[0], served[1], served[2])


def _resources(gateway: GatewayProcess) -> tuple[float, float, float]:
    samples = scrape(gateway)
    return (
        value(samples, "process_open_fds"),
        value(samples, "llm_gateway_asyncio_tasks"),
        value(samples, "process_resident_memory_bytes"),
    )


def test_soak_under_faults(gateway_factory: Callable[..., GatewayProcess]) -> None:
    main, spare = FakeUpstream().start(), FakeUpstream().start()
    try:
        _faulty(main, rate=0.2, seed=1)
        _faulty(spare, rate=0.2, seed=2)
        config = {
            "logging": {"level": "WARNING"},
            "routing": {"retries": 1, "backoff_initial": 0.001, "backoff_max": 0.005, "cooldown_failures": 10**6},
            "providers": {
                "main": {"type": "openai", "api_url": f"{main.url}/v1"},
                "spare": {"type": "openai", "api_url": f"{spare.url}/v1"},
            },
            "models": {"main": {"provider": "main", "fallback": ["spare"]}, "spare": "spare"},
        }
        gateway = gateway_factory(config)
        asyncio.run(_drive(gateway.base_url))  # warm-up, so pools and caches are in the baseline
        fds, tasks, rss = _resources(gateway)
        samples = scrape(gateway)
        before, estimated_before = tokens(samples, usage="reported"), tokens(samples, usage="estimated")

        outcomes, served = asyncio.run(_drive(gateway.base_url))

        assert sum(outcomes.values()) == REQUESTS
        assert outcomes["200"] > REQUESTS * 0.9, outcomes  # retries and the fallback absorb most faults
        samples = scrape(gateway)
        after, estimated_after = tokens(samples, usage="reported"), tokens(samples, usage="estimated")
        assert tuple(a - b for a, b in zip(after, before, strict=True)) == served
        # Streams cut after their first chunk reported no usage: what they streamed is counted as estimated.
        estimated = tuple(a - b for a, b in zip(estimated_after, estimated_before, strict=True))
        assert (estimated[2] > 0) == (outcomes.get("stream-error", 0) > 0), (estimated, outcomes)
        assert estimated[0] + estimated[1] == estimated[2]
        fds_after, tasks_after, rss_after = _resources(gateway)
        # Pools may hold a few more idle keep-alive connections than after the warm-up; a leak of one
        # descriptor or task per failed request would show hundreds.
        assert fds_after <= fds + 16, (fds, fds_after)
        assert tasks_after <= tasks + 5, (tasks, tasks_after)
        assert rss_after <= rss + 20 * 2**20, (rss, rss_after)
    finally:
        main.stop()
        spare.stop()
