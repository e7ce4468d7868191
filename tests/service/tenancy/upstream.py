"""A fake upstream for the tenancy tests: completions with usage it makes up and remembers, and streams
that hold their connection open (calls in flight) for the model "held", unary calls that never answer
for "hung"."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
from aiohttp import web

from tests.fakes.upstream import FakeUpstream, chunks, completion

HELD = "held"
HUNG = "hung"


class UsageUpstream:
    def __init__(self) -> None:
        self.fake = FakeUpstream()
        self.lock = threading.Lock()
        self.reported = 0  # total tokens of every usage sent
        self.active = 0  # held streams open right now
        self.most_active = 0
        self._sizes = itertools.count(1)
        self.fake.handler = self._handle

    def start(self) -> UsageUpstream:
        self.fake.start()
        return self

    def stop(self) -> None:
        self.fake.stop()

    @property
    def url(self) -> str:
        return f"{self.fake.url}/v1"

    def _usage(self) -> dict[str, int]:
        with self.lock:
            size = next(self._sizes) % 17
            prompt, completion_tokens = 5 + size, 3 + 2 * size
            self.reported += prompt + completion_tokens
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt + completion_tokens,
        }

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body: dict[str, Any] = orjson.loads(await request.read())
        if body.get("model") == HELD:
            return await self._held(request)
        if body.get("model") == HUNG:  # a unary call that never answers
            while request.transport is not None and not request.transport.is_closing():  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            return web.Response(status=200)
        if body.get("stream"):
            events = chunks(usage=True)
            events[-1]["usage"] = self._usage()
            response = web.StreamResponse(headers={"content-type": "text/event-stream"})
            await response.prepare(request)
            for event in events:
                await response.write(b"data: " + orjson.dumps(event) + b"\n\n")
            await response.write(b"data: [DONE]\n\n")
            return response
        return web.Response(body=orjson.dumps(completion(usage=self._usage())), content_type="application/json")

    async def _held(self, request: web.Request) -> web.StreamResponse:
        with self.lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        try:
            response = web.StreamResponse(headers={"content-type": "text/event-stream"})
            await response.prepare(request)
            await response.write(b"data: " + orjson.dumps(chunks(usage=False)[0]) + b"\n\n")
            while request.transport is not None and not request.transport.is_closing():  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            return response
        finally:
            with self.lock:
                self.active -= 1


def hold(stack: contextlib.ExitStack, base_url: str, headers: dict[str, str]) -> Iterator[bytes]:
    """A stream of the model "held" that stays open (a call in flight) until `stack` closes; its first
    chunk has arrived. Keep the iterator: dropping it would close the stream."""
    client = stack.enter_context(httpx.Client(base_url=base_url, timeout=10))
    body = {"model": HELD, "stream": True, "messages": [{"role": "user", "content": "Hello"}]}
    response = stack.enter_context(client.stream("POST", "/v1/chat/completions", json=body, headers=headers))
    assert response.status_code == 200, response.read()
    reading = response.iter_raw()
    next(reading)
    return reading
