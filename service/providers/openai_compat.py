"""Any upstream that speaks OpenAI's chat completion API: OpenAI, Gemini, Ollama, vLLM, Groq, ...

The HTTP client is picked by measurement: httpx costs 3 to 8 times the CPU of aiohttp per request
(design notes, section 3), and aiohttp about 5 times that of `http1`, the gateway's own lean client
(bench/profile-notes.md). One keep-alive pool per provider, created on first use inside the serving
event loop; the request head is rendered once per provider, so a request adds only its body.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Mapping
from typing import Any, TypeVar

import orjson

from gateway.call import CallInfo
from gateway.config import ProviderConfig, Timeouts
from gateway.errors import (
    BadGatewayError,
    GatewayError,
    UpstreamError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from gateway.jsonpb import JsonMappingError, MessageCodec
from llm_gateway.v1 import chat_pb2

from ..deadline import Deadline
from . import http1

_REQUEST = MessageCodec.for_type(chat_pb2.CreateChatCompletionRequest)
_COMPLETION = MessageCodec.for_type(chat_pb2.ChatCompletion)
_CHUNK = MessageCodec.for_type(chat_pb2.ChatCompletionChunk)

# Client metadata that may travel upstream; never `authorization`, which is the gateway's own.
_FORWARDED_METADATA = ("traceparent", "tracestate")
_PASSED_BACK_HEADERS = ("retry-after", "retry-after-ms")
_DONE = b"[DONE]"


def chat_url(config: ProviderConfig) -> str:
    """The chat completions URL for a provider type and its configured api_url."""
    base = config.api_url
    if config.type == "gemini":
        if not base.endswith("/openai"):
            base += "/v1beta/openai"
    elif config.type == "ollama" and not base.endswith("/v1"):
        base += "/v1"
    return base + "/chat/completions"


class OpenAICompatibleProvider:
    def __init__(self, config: ProviderConfig) -> None:
        self.name = config.name
        self.type = config.type
        self.url = chat_url(config)
        self._config = config
        headers = {"content-type": "application/json", "accept": "application/json"}
        headers.update((key.lower(), value) for key, value in config.headers.items())
        if config.api_key:
            headers["authorization"] = f"Bearer {config.api_key}"
        self._head = http1.render_head("POST", self.url, headers)
        self._stream_head = http1.render_head("POST", self.url, {**headers, "accept": "text/event-stream"})
        self._pool: http1.Pool | None = None

    def _client(self) -> http1.Pool:
        if self._pool is None:
            config = self._config
            self._pool = http1.Pool(
                self.url,
                max_connections=config.max_connections,
                connect_timeout=config.connect_timeout,
                read_timeout=config.read_timeout,
            )
        return self._pool

    async def _post(
        self, head: bytes, body: dict[str, Any], call: CallInfo, timeouts: Timeouts, first: Deadline | None
    ) -> http1.Response:
        """Send the request; return once the response head is in, by the `first` deadline at the latest."""
        extra = b"".join(
            f"{key}: {value}\r\n".encode("latin-1")
            for key, value in call.metadata
            if key in _FORWARDED_METADATA and http1.safe_header(key, value)
        )
        return await _within(
            first, self._client().request(http1.with_body(head, orjson.dumps(body), extra), timeouts.connect)
        )

    async def complete(
        self, request: chat_pb2.CreateChatCompletionRequest, upstream_model: str, call: CallInfo, timeouts: Timeouts
    ) -> chat_pb2.ChatCompletion:
        body = _REQUEST.encode(request)
        body["model"] = upstream_model
        if body.get("stream") is True:
            body["stream"] = False
        first, total = _deadlines(timeouts)
        try:
            response = await self._post(self._head, body, call, timeouts, first)
            try:
                data = await _within(total, response.read())
            finally:
                response.release()  # back to the pool when fully read, else the connection is closed
            if response.status != 200:
                raise UpstreamError(response.status, data, _passed_back(response.headers))
        except GatewayError:
            raise
        except Exception as exc:
            raise _transport_error(exc, self.name) from exc
        try:
            obj = orjson.loads(data)
            if type(obj) is not dict:
                raise JsonMappingError("the body is not a JSON object", "")
            return _COMPLETION.decode(obj)  # type: ignore[no-any-return]
        except (orjson.JSONDecodeError, JsonMappingError) as exc:
            raise BadGatewayError(f"Provider {self.name} sent an invalid response: {exc}") from None

    async def stream(
        self, request: chat_pb2.CreateChatCompletionRequest, upstream_model: str, call: CallInfo, timeouts: Timeouts
    ) -> AsyncIterator[list[chat_pb2.ChatCompletionChunk]]:
        body = _REQUEST.encode(request)
        body["model"] = upstream_model
        body["stream"] = True
        # Always ask for usage, so every stream is accounted for; the service strips it again for
        # clients that did not ask.
        options = body.get("stream_options")
        body["stream_options"] = (
            {**options, "include_usage": True} if type(options) is dict else {"include_usage": True}
        )
        first, total = _deadlines(timeouts)
        try:
            # Each timeout wraps one await and never a `yield`: a timeout spanning a yield would fire
            # in whatever the consumer is doing meanwhile.
            response = await self._post(self._stream_head, body, call, timeouts, first)
            try:
                if response.status != 200:
                    error = await _within(total, response.read())
                    raise UpstreamError(response.status, error, _passed_back(response.headers))
                batches = sse_batches(response.blocks())
                limit = first
                while True:
                    if limit is None:  # no deployment timeout: the service's own deadline still applies
                        batch = await anext(batches, None)
                    else:
                        async with limit:
                            batch = await anext(batches, None)
                    if batch is None:
                        raise BadGatewayError(f"Provider {self.name} ended the stream without [DONE].")
                    chunks: list[chat_pb2.ChatCompletionChunk] = []
                    for data in batch:
                        if data == _DONE:
                            response.release()  # the body is done: the connection goes back to the pool
                            if chunks:
                                yield chunks
                            return
                        try:
                            chunks.append(self._chunk(data))
                        except GatewayError:
                            if chunks:  # what arrived before the bad event still reaches the client
                                yield chunks
                            raise
                    limit = total
                    yield chunks
            finally:
                response.close()  # no-op after release(); otherwise the upstream sees the connection close
        except GatewayError:
            raise
        except Exception as exc:
            raise _transport_error(exc, self.name) from exc

    def _chunk(self, data: bytes) -> chat_pb2.ChatCompletionChunk:
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise BadGatewayError(f"Provider {self.name} sent an invalid stream event: {exc}") from None
        if type(obj) is not dict:
            raise BadGatewayError(f"Provider {self.name} sent a stream event that is not an object.")
        if "error" in obj and "choices" not in obj:
            # An error after the stream started: providers report it as an event of its own.
            error = obj["error"] if isinstance(obj["error"], dict) else {}
            status = error.get("status") or error.get("code")
            raise UpstreamError(status if isinstance(status, int) and 400 <= status < 600 else 502, data)
        try:
            return _CHUNK.decode(obj)  # type: ignore[no-any-return]
        except JsonMappingError as exc:
            raise BadGatewayError(f"Provider {self.name} sent an invalid stream event: {exc}") from None

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None


async def sse_batches(blocks: AsyncIterator[bytes]) -> AsyncIterator[list[bytes]]:
    """The `data` of Server-Sent Events in a byte stream read in blocks of any size: one list per
    block, of the events that block completed (blocks that complete none yield nothing).

    Events end at a blank line; an event's several `data:` lines join with newlines; comments (`:`) and
    other fields (event, id, retry) are skipped. One await per network read, not one per line or event:
    the events that arrived together are split here, in memory.
    """
    buffer = b""
    async for block in blocks:
        buffer = buffer + block if buffer else block
        if b"\r" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n")  # a lone trailing \r waits for its \n
        *events, buffer = buffer.split(b"\n\n")
        batch = [data for event in events if (data := _event_data(event)) is not None]
        if batch:
            yield batch
    data = _event_data(buffer)  # a last event without its blank line
    if data is not None:
        yield [data]


def _event_data(event: bytes) -> bytes | None:
    if event.startswith(b"data: ") and b"\n" not in event:  # what every provider sends: one data line
        return event[6:]
    lines = [line[5:].removeprefix(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
    if not lines:
        return None
    return lines[0] if len(lines) == 1 else b"\n".join(lines)


def _deadlines(timeouts: Timeouts) -> tuple[Deadline | None, Deadline | None]:
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


async def _within(deadline: Deadline | None, step: Awaitable[T]) -> T:
    """`step` awaited inside the deployment's deadline, when it has one."""
    if deadline is None:
        return await step
    async with deadline:
        return await step


def _passed_back(headers: Mapping[str, str]) -> dict[str, str]:
    return {
        key.lower(): value
        for key, value in headers.items()
        if key.lower() in _PASSED_BACK_HEADERS or key.lower().startswith("x-ratelimit-")
    }


def _transport_error(exc: BaseException, provider: str) -> GatewayError:
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
