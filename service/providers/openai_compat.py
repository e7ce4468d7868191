"""Any upstream that speaks OpenAI's chat completion API: OpenAI, Gemini, Ollama, vLLM, Groq, ...

aiohttp, not httpx: on this machine it costs 3 to 8 times less CPU per request (design notes, section 3).
One pooled keep-alive session per provider, created on first use inside the serving event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
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
        self._headers = {"content-type": "application/json", "accept": "application/json", **config.headers}
        if config.api_key:
            self._headers["authorization"] = f"Bearer {config.api_key}"
        self._stream_headers = {**self._headers, "accept": "text/event-stream"}
        self._session: aiohttp.ClientSession | None = None
        self._timeouts: dict[float, aiohttp.ClientTimeout] = {}

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=self._config.max_connections, ttl_dns_cache=300, keepalive_timeout=60
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                json_serialize=lambda obj: orjson.dumps(obj).decode(),
                skip_auto_headers=("User-Agent",),
            )
        return self._session

    def _headers_for(self, base: dict[str, str], call: CallInfo) -> dict[str, str]:
        extra = {key: value for key, value in call.metadata if key in _FORWARDED_METADATA}
        return {**base, **extra} if extra else base

    def _timeout(self, timeouts: Timeouts) -> aiohttp.ClientTimeout:
        """The provider's connect and read timeouts, or the deployment's own connect timeout. Cached:
        one object per distinct value, not one per request."""
        connect = timeouts.connect or self._config.connect_timeout
        cached = self._timeouts.get(connect)
        if cached is None:
            cached = self._timeouts[connect] = aiohttp.ClientTimeout(
                total=None, connect=connect, sock_read=self._config.read_timeout
            )
        return cached

    async def _post(
        self, body: dict[str, Any], headers: dict[str, str], call: CallInfo, timeouts: Timeouts, first_at: float | None
    ) -> aiohttp.ClientResponse:
        """Send the request; return once the response headers are in, by `first_at` at the latest."""
        async with asyncio.timeout_at(first_at):
            return await self._client().post(
                self.url,
                data=orjson.dumps(body),
                headers=self._headers_for(headers, call),
                timeout=self._timeout(timeouts),
            )

    async def complete(
        self, request: chat_pb2.CreateChatCompletionRequest, upstream_model: str, call: CallInfo, timeouts: Timeouts
    ) -> chat_pb2.ChatCompletion:
        body = _REQUEST.encode(request)
        body["model"] = upstream_model
        if body.get("stream") is True:
            body["stream"] = False
        first_at, total_at = _deadlines(timeouts)
        try:
            response = await self._post(body, self._headers, call, timeouts, first_at)
            try:
                async with asyncio.timeout_at(total_at):
                    data = await response.read()
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
        first_at, total_at = _deadlines(timeouts)
        try:
            # Each timeout wraps one await and never a `yield`: a timeout spanning a yield would fire
            # in whatever the consumer is doing meanwhile.
            response = await self._post(body, self._stream_headers, call, timeouts, first_at)
            try:
                if response.status != 200:
                    async with asyncio.timeout_at(total_at):
                        error = await response.read()
                    raise UpstreamError(response.status, error, _passed_back(response.headers))
                batches = sse_batches(response.content.iter_any())
                limit = first_at
                while True:
                    if limit is None:  # no deployment timeout: the service's own deadline still applies
                        batch = await anext(batches, None)
                    else:
                        async with asyncio.timeout_at(limit):
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
                    limit = total_at
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
        if self._session is not None:
            await self._session.close()
            self._session = None


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
    lines = [line[5:].removeprefix(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
    if not lines:
        return None
    return lines[0] if len(lines) == 1 else b"\n".join(lines)


def _deadlines(timeouts: Timeouts) -> tuple[float | None, float | None]:
    """Loop times by which the first byte (or chunk) and the whole answer must have arrived."""
    start = asyncio.get_running_loop().time()
    total_at = start + timeouts.total if timeouts.total else None
    if not timeouts.first_token:
        return total_at, total_at
    first_at = start + timeouts.first_token
    return (first_at if total_at is None else min(first_at, total_at)), total_at


def _passed_back(headers: Mapping[str, str]) -> dict[str, str]:
    return {
        key.lower(): value
        for key, value in headers.items()
        if key.lower() in _PASSED_BACK_HEADERS or key.lower().startswith("x-ratelimit-")
    }


def _transport_error(exc: BaseException, provider: str) -> GatewayError:
    """Map an aiohttp or asyncio failure to the gateway's error, once, at the boundary."""
    if isinstance(exc, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
        return UpstreamTimeoutError(f"Provider {provider} timed out.")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamUnavailableError(f"Provider {provider} is unreachable: {_reason(exc)}")
    if isinstance(exc, (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError)):
        return UpstreamUnavailableError(f"Provider {provider} closed the connection mid-response.")
    if isinstance(exc, aiohttp.ClientError):
        return BadGatewayError(f"Provider {provider} failed: {type(exc).__name__}: {exc}")
    return BadGatewayError(f"Provider {provider} failed: {type(exc).__name__}")


def _reason(exc: aiohttp.ClientConnectorError) -> str:
    error: Any = exc.os_error
    return str(getattr(error, "strerror", None) or error or exc)
