"""A fake upstream provider: a real aiohttp server on loopback, in a thread of the test process.

It answers like OpenAI's chat completions API (and Gemini's and Ollama's compatibility layers, which
are the same API under other paths), records every request it receives, and notices when the
gateway closes a connection it was still answering.

    upstream.reply(200, {...})                 # every request gets this JSON
    upstream.stream([chunk, chunk], done=True) # SSE
    upstream.hang()                            # accept and never answer
    upstream.handler = my_coroutine            # anything else
"""

from __future__ import annotations

import asyncio
import base64
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float = field(default_factory=time.monotonic)
    query: str = ""  # the raw query string, without its "?"
    # The connection it came on: the client's port tells a reused connection from a new one.
    transport: Any = field(default=None, repr=False, compare=False)

    @property
    def peer_port(self) -> int:
        return int(self.transport.get_extra_info("peername")[1])

    @property
    def connection_closed(self) -> bool:
        return bool(self.transport.is_closing())

    @property
    def json(self) -> Any:
        return orjson.loads(self.body)


def completion(content: str = "Hello!", model: str = "upstream-model", **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": "chatcmpl-123",
        "object": "chat.completion",
        "created": 1700000000,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": None, "annotations": []},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": 11,
            "completion_tokens": 7,
            "total_tokens": 18,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
        },
        "service_tier": "default",
        "system_fingerprint": "fp_abc",
    }
    body.update(extra)
    return body


def chunks(
    pieces: tuple[str, ...] = ("Hel", "lo", "!"),
    model: str = "upstream-model",
    usage: bool = True,
) -> list[dict[str, Any]]:
    """OpenAI's stream shape with include_usage: "usage": null on each chunk, then a usage-only chunk."""
    base = {
        "id": "chatcmpl-s1",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": model,
        "system_fingerprint": "fp_abc",
        "service_tier": "default",
    }
    out = [
        {
            **base,
            "choices": [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": "", "refusal": None},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ],
        }
    ]
    out += [
        {**base, "choices": [{"index": 0, "delta": {"content": p}, "logprobs": None, "finish_reason": None}]}
        for p in pieces
    ]
    out.append({**base, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]})
    if usage:
        for chunk in out:
            chunk["usage"] = None
        out.append(
            {
                **base,
                "choices": [],
                "usage": {"prompt_tokens": 9, "completion_tokens": len(pieces), "total_tokens": 9 + len(pieces)},
            }
        )
    return out


def embeddings(
    vectors: list[list[float]], encoding_format: str = "float", model: str = "upstream-embedding", usage: bool = True
) -> dict[str, Any]:
    """OpenAI's embeddings response; base64 is each vector as little-endian float32, as OpenAI sends it."""
    data = [
        {
            "object": "embedding",
            "index": i,
            "embedding": base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode()
            if encoding_format == "base64"
            else v,
        }
        for i, v in enumerate(vectors)
    ]
    body: dict[str, Any] = {"object": "list", "data": data, "model": model}
    if usage:
        body["usage"] = {"prompt_tokens": 5, "total_tokens": 5}
    return body


@dataclass
class FakeUpstream:
    host: str = "127.0.0.1"
    port: int = 0
    received: list[Received] = field(default_factory=list)
    handler: Handler | None = None
    disconnected: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self._script: list[Handler] = []
        self.reply(200, completion())

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # ------------------------------------------------------------------ behaviours
    # Each `*ing` method builds a handler; `reply`, `stream` and `hang` make it the answer to every
    # request, and `script` answers the next requests with a list of handlers, one each.

    def replying(
        self, status: int, body: Any, headers: dict[str, str] | None = None, content_type: str = "application/json"
    ) -> Handler:
        payload = body if isinstance(body, bytes) else orjson.dumps(body)

        async def handle(request: web.Request) -> web.StreamResponse:
            return web.Response(status=status, body=payload, content_type=content_type, headers=headers)

        return handle

    def streaming(
        self,
        events: list[Any],
        done: bool = True,
        delay: float = 0.0,
        hold: bool = False,
        drop: bool = False,
        together: bool = False,
    ) -> Handler:
        """SSE: one `data:` event per item (dicts become JSON). `hold` keeps the connection open after
        the events; `drop` closes it abruptly, without ending the chunked body; `together` sends every
        event (and [DONE]) in one write, so the gateway reads them in one go."""

        async def handle(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse(headers={"content-type": "text/event-stream"})
            await response.prepare(request)
            try:
                frames = [b"data: " + (e if isinstance(e, bytes) else orjson.dumps(e)) + b"\n\n" for e in events]
                frames += [b"data: [DONE]\n\n"] if done else []
                for frame in [b"".join(frames)] if together else frames:
                    await response.write(frame)
                    if delay:
                        await asyncio.sleep(delay)
                if drop:  # close after flushing what was written, without ending the chunked body
                    assert request.transport is not None
                    request.transport.close()
                    return response
                if hold:
                    await self._wait_for_disconnect(request)
            except (ConnectionError, asyncio.CancelledError):
                self.disconnected.set()
                raise
            return response

        return handle

    def hanging(self) -> Handler:
        """Accept the request and never answer."""

        async def handle(request: web.Request) -> web.StreamResponse:
            await self._wait_for_disconnect(request)
            return web.Response(status=200)

        return handle

    def trickling(self, body: Any, delay: float = 0.05) -> Handler:
        """A 200 answered one byte at a time."""
        payload = body if isinstance(body, bytes) else orjson.dumps(body)

        async def handle(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse(headers={"content-type": "application/json"})
            response.content_length = len(payload)
            await response.prepare(request)
            try:
                for i in range(len(payload)):
                    await response.write(payload[i : i + 1])
                    await asyncio.sleep(delay)
            except (ConnectionError, asyncio.CancelledError):
                self.disconnected.set()
                raise
            return response

        return handle

    def cutting(self, body: Any) -> Handler:
        """A 200 that promises the whole body and closes the connection halfway through it."""
        payload = body if isinstance(body, bytes) else orjson.dumps(body)

        async def handle(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse(headers={"content-type": "application/json"})
            response.content_length = len(payload)
            await response.prepare(request)
            await response.write(payload[: len(payload) // 2])
            assert request.transport is not None
            request.transport.close()
            return response

        return handle

    def reply(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        self.handler = self.replying(status, body, headers)

    def stream(
        self, events: list[Any], done: bool = True, delay: float = 0.0, hold: bool = False, together: bool = False
    ) -> None:
        self.handler = self.streaming(events, done=done, delay=delay, hold=hold, together=together)

    def hang(self) -> None:
        self.handler = self.hanging()

    def by_stream_flag(self) -> None:
        """The default completion for unary requests, the default chunks for `"stream": true` ones."""
        unary, streamed = self.replying(200, completion()), self.streaming(chunks())

        async def handle(request: web.Request) -> web.StreamResponse:
            wants_stream = orjson.loads(await request.read()).get("stream") is True
            return await (streamed if wants_stream else unary)(request)

        self.handler = handle

    def embed(self, vectors: list[list[float]], usage: bool = True) -> None:
        """Embeddings of `vectors` for every request, as floats or base64 as the request's encoding_format says."""

        async def handle(request: web.Request) -> web.StreamResponse:
            encoding = orjson.loads(await request.read()).get("encoding_format") or "float"
            return web.Response(
                body=orjson.dumps(embeddings(vectors, encoding, usage=usage)), content_type="application/json"
            )

        self.handler = handle

    def script(self, *handlers: Handler) -> None:
        """Answer the next requests with these handlers in order, then go back to `handler`."""
        self._script.extend(handlers)

    async def _wait_for_disconnect(self, request: web.Request) -> None:
        try:
            while request.transport is not None and not request.transport.is_closing():  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        finally:  # aiohttp cancels the handler when the peer goes away
            self.disconnected.set()

    def wait_disconnected(self, timeout: float = 10.0) -> bool:
        return self.disconnected.wait(timeout)

    # ------------------------------------------------------------------ server

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.received.append(
            Received(
                request.method,
                request.path,
                dict(request.headers),
                body,
                query=request.query_string,
                transport=request.transport,
            )
        )
        handler = self._script.pop(0) if self._script else self.handler
        assert handler is not None
        return await handler(request)

    def start(self) -> FakeUpstream:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def stop(self) -> None:
        if not self._loop.is_running():
            return
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def last(self, timeout: float = 5.0) -> Received:
        deadline = time.monotonic() + timeout
        while not self.received and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.received[-1]


def serve() -> Iterator[FakeUpstream]:
    """A started fake for as long as the generator runs: `pytest.fixture(scope="module")(serve)`."""
    server = FakeUpstream().start()
    yield server
    server.stop()
