"""Any upstream that speaks OpenAI's chat completion API: OpenAI, Gemini, Ollama, vLLM, Groq, ...

The HTTP client is picked by measurement: httpx costs 3 to 8 times the CPU of aiohttp per request
(design notes, section 3), and aiohttp about 5 times that of `http1`, the gateway's own lean client
(bench/profile-notes.md). One keep-alive pool per provider, created on first use inside the serving
event loop; the request head is rendered once per provider, so a request adds only its body.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson

from gateway.call import CallInfo
from gateway.config import ProviderConfig, Timeouts
from gateway.errors import BadGatewayError, GatewayError, UpstreamError
from gateway.jsonpb import JsonMappingError, MessageCodec
from llm_gateway.v1 import chat_pb2

from . import http1
from .http_provider import HTTPProvider
from .http_provider import deadlines as _deadlines
from .http_provider import passed_back as _passed_back
from .http_provider import transport_error as _transport_error
from .http_provider import within as _within

_REQUEST = MessageCodec.for_type(chat_pb2.CreateChatCompletionRequest)
_COMPLETION = MessageCodec.for_type(chat_pb2.ChatCompletion)
_CHUNK = MessageCodec.for_type(chat_pb2.ChatCompletionChunk)

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


class OpenAICompatibleProvider(HTTPProvider):
    def __init__(self, config: ProviderConfig) -> None:
        super().__init__(config, chat_url(config))
        headers = {"content-type": "application/json", "accept": "application/json"}
        headers.update((key.lower(), value) for key, value in config.headers.items())
        if config.api_key:
            headers["authorization"] = f"Bearer {config.api_key}"
        self._head = http1.render_head("POST", self.url, headers)
        self._stream_head = http1.render_head("POST", self.url, {**headers, "accept": "text/event-stream"})

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
    if event.startswith(b"event: "):  # what Anthropic sends: a name line, then one data line
        at = event.find(b"\ndata: ")
        if at > 0 and event.find(b"\n", at + 1) < 0:
            return event[at + 7 :]
    lines = [line[5:].removeprefix(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
    if not lines:
        return None
    return lines[0] if len(lines) == 1 else b"\n".join(lines)
