"""What every provider that calls an HTTP upstream shares: the keep-alive pool (created on first use
inside the serving event loop), sending a request with its pre-rendered head, one JSON exchange, a
Server-Sent Events stream read in batches, the deployment's deadlines, and mapping transport failures
to the gateway's errors. A provider adds its URL, its heads and its translation.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeVar

import orjson

from gateway import logs, metrics, proxy
from gateway.call import CallInfo
from gateway.config import ProviderConfig, Timeouts
from gateway.errors import (
    BadGatewayError,
    GatewayError,
    UpstreamError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from llm_gateway.v1 import chat_pb2

from ..deadline import Deadline
from . import http1

# Client metadata that may travel upstream; never `authorization`, which is the gateway's own.
_FORWARDED_METADATA = ("traceparent", "tracestate")
_PASSED_BACK_HEADERS = ("retry-after", "retry-after-ms")

Chunks = list[chat_pb2.ChatCompletionChunk]
# Translates one SSE event's data into chunks appended to the list; True at the stream's last event.
Step = Callable[[bytes, Chunks], bool]


class HTTPProvider:
    """The base of the HTTP providers: one pool per provider, requests sent as head bytes plus a body."""

    def __init__(self, config: ProviderConfig, url: str) -> None:
        self.name = config.name
        self.type = config.type
        self.url = url
        self._config = config
        self._pool: http1.Pool | None = None
        # Once per provider: its `proxy:` key, else HTTPS_PROXY/HTTP_PROXY/NO_PROXY as they are at start-up.
        self.proxy = proxy.resolve(config.proxy, url, os.environ, f"providers.{config.name}")
        for secret in self.proxy.secrets if self.proxy else ():
            logs.add_secret(secret)
        self._retried = metrics.UPSTREAM_CONNECTION_RETRIES.labels(provider=config.name).inc

    def render_head(self, method: str, url: str, headers: dict[str, str]) -> bytes:
        """A request head for this provider's pool (through its proxy, if it has one)."""
        return http1.render_head(method, url, headers, self.proxy)

    def _client(self) -> http1.Pool:
        if self._pool is None:
            config = self._config
            self._pool = http1.Pool(
                self.url,
                max_connections=config.max_connections,
                connect_timeout=config.connect_timeout,
                read_timeout=config.read_timeout,
                proxy=self.proxy,
                on_retry=self._retried,
            )
        return self._pool

    def _post(
        self, head: bytes, body: dict[str, Any], call: CallInfo, timeouts: Timeouts, first: Deadline | None
    ) -> Awaitable[http1.Response]:
        """Send the request; the awaitable ends once the response head is in, by the `first` deadline at
        the latest. A plain function returning the pool's coroutine: one coroutine layer fewer."""
        extra = b"".join(
            f"{key}: {value}\r\n".encode("latin-1")
            for key, value in call.metadata
            if key in _FORWARDED_METADATA and http1.safe_header(key, value)
        )
        return within(first, self._client().request(http1.with_body(head, orjson.dumps(body), extra), timeouts.connect))

    def _error(self, status: int, body: bytes, headers: Mapping[str, str]) -> GatewayError:
        """The error for an upstream's non-200 answer; OpenAI's error bodies pass through as they are."""
        return UpstreamError(status, body, passed_back(headers))

    async def _json(self, head: bytes, body: dict[str, Any], call: CallInfo, timeouts: Timeouts) -> dict[str, Any]:
        """One JSON request and the JSON object it is answered with."""
        first, total = deadlines(timeouts)
        try:
            response = await self._post(head, body, call, timeouts, first)
            try:
                data = await within(total, response.read())
            finally:
                response.release()  # back to the pool when fully read, else the connection is closed
            if response.status != 200:
                raise self._error(response.status, data, response.headers)
        except GatewayError:
            raise
        except Exception as exc:
            raise transport_error(exc, self.name) from exc
        return self._object(data, "response")

    def _object(self, data: bytes, what: str) -> dict[str, Any]:
        """A JSON object the upstream sent; BadGatewayError for anything else."""
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise BadGatewayError(f"Provider {self.name} sent an invalid {what}: {exc}") from None
        if type(obj) is not dict:
            raise BadGatewayError(f"Provider {self.name} sent an invalid {what}: not a JSON object")
        return obj

    async def _events(
        self, head: bytes, body: Callable[[], dict[str, Any]], call: CallInfo, timeouts: Timeouts, step: Step
    ) -> AsyncIterator[Chunks]:
        """A streamed request's chunks in batches, one per network read that completed events, never
        empty. `body` is built here, so a request that cannot be translated fails from the iterator,
        like every other error of the stream."""
        payload = body()
        first, total = deadlines(timeouts)
        try:
            # Each timeout wraps one await and never a `yield`: a timeout spanning a yield would fire
            # in whatever the consumer is doing meanwhile.
            response = await self._post(head, payload, call, timeouts, first)
            try:
                if response.status != 200:
                    error = await within(total, response.read())
                    raise self._error(response.status, error, response.headers)
                # The body's blocks are split into events here (sse_split), not through async generators
                # over the response: none registered with the loop per stream, one coroutine per read.
                buffer = b""
                ended = False
                limit = first
                while True:
                    if ended:
                        raise BadGatewayError(f"Provider {self.name} ended the stream before its last event.")
                    if limit is None:  # no deployment timeout: the service's own deadline still applies
                        block = await response.next_block()
                    else:
                        limit.enter()  # by hand: no __aenter__/__aexit__ coroutines per read
                        try:
                            block = await response.next_block()
                        except BaseException as exc:
                            limit.leave(exc)
                            raise
                        limit.leave(None)
                    if block:
                        batch, buffer = sse_split(buffer, block)
                        if not batch:  # a read that completed no event
                            continue
                    else:
                        ended = True
                        data = event_data(buffer)  # a last event without its blank line
                        if data is None:
                            continue
                        batch = [data]
                    chunks: Chunks = []
                    for data in batch:
                        try:
                            last = step(data, chunks)
                        except GatewayError:
                            if chunks:  # what arrived before the bad event still reaches the client
                                yield chunks
                            raise
                        if last:
                            response.release()  # the body is done: the connection goes back to the pool
                            if chunks:
                                yield chunks
                            return
                    if chunks:  # a read of only keep-alive events yields nothing
                        limit = total
                        yield chunks
            finally:
                response.close()  # no-op after release(); otherwise the upstream sees the connection close
        except GatewayError:
            raise
        except Exception as exc:
            raise transport_error(exc, self.name) from exc

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None


def deadlines(timeouts: Timeouts) -> tuple[Deadline | None, Deadline | None]:
    """The deployment's deadlines for the first byte (or chunk) and for the whole answer, if it has any."""
    if not timeouts.total and not timeouts.first_token:
        return None, None
    loop = asyncio.get_running_loop()
    start = loop.time()
    total = Deadline(start + timeouts.total, loop) if timeouts.total else None
    if not timeouts.first_token:
        return total, total
    first_at = start + timeouts.first_token
    return Deadline(first_at if total is None else min(first_at, total.when), loop), total


T = TypeVar("T")


def within(deadline: Deadline | None, step: Awaitable[T]) -> Awaitable[T]:
    """`step` awaited inside the deployment's deadline, when it has one; without one, `step` itself
    (no coroutine wrapped around it)."""
    if deadline is None:
        return step
    return _within(deadline, step)


async def _within(deadline: Deadline, step: Awaitable[T]) -> T:
    deadline.enter()
    try:
        result = await step
    except BaseException as exc:
        deadline.leave(exc)
        raise
    deadline.leave(None)
    return result


def passed_back(headers: Mapping[str, str]) -> dict[str, str]:
    """The upstream response headers worth handing to the client (retry-after, x-ratelimit-*)."""
    return {
        key.lower(): value
        for key, value in headers.items()
        if key.lower() in _PASSED_BACK_HEADERS or key.lower().startswith("x-ratelimit-")
    }


def transport_error(exc: BaseException, provider: str) -> GatewayError:
    """Map an HTTP client or asyncio failure to the gateway's error, once, at the boundary."""
    if isinstance(exc, (TimeoutError, http1.ReadTimeout, http1.ConnectTimeout)):
        return UpstreamTimeoutError(f"Provider {provider} timed out.")
    if isinstance(exc, http1.ConnectError):
        return UpstreamUnavailableError(f"Provider {provider} is unreachable: {exc}")
    if isinstance(exc, http1.Disconnected):
        return UpstreamUnavailableError(f"Provider {provider} closed the connection mid-response.")
    if isinstance(exc, http1.HTTPClientError):
        return BadGatewayError(f"Provider {provider} failed: {exc}")
    return BadGatewayError(f"Provider {provider} failed: {type(exc).__name__}")


def sse_split(buffer: bytes, block: bytes) -> tuple[list[bytes], bytes]:
    """The `data` of the events that `block` completes after what `buffer` held, and what is left over.

    Events end at a blank line; an event's several `data:` lines join with newlines; comments (`:`) and
    other fields (event, id, retry) are skipped. One call per network read, not one per line or event:
    the events that arrived together are split here, in memory. At the end of the body, what is left
    over is a last event without its blank line (`event_data`)."""
    buffer = buffer + block if buffer else block
    # find(), not `in`: bytes.__contains__ first tries its argument as an int and formats a TypeError.
    if buffer.find(b"\r") >= 0:
        buffer = buffer.replace(b"\r\n", b"\n")  # a lone trailing \r waits for its \n
    *events, buffer = buffer.split(b"\n\n")
    return [data for event in events if (data := event_data(event)) is not None], buffer


def event_data(event: bytes) -> bytes | None:
    if event.startswith(b"data: ") and event.find(b"\n") < 0:  # what every provider sends: one data line
        return event[6:]
    if event.startswith(b"event: "):  # what Anthropic sends: a name line, then one data line
        at = event.find(b"\ndata: ")
        if at > 0 and event.find(b"\n", at + 1) < 0:
            return event[at + 7 :]
    lines = [line[5:].removeprefix(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
    if not lines:
        return None
    return lines[0] if len(lines) == 1 else b"\n".join(lines)
