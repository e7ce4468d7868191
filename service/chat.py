"""The chat service itself, free of any transport: routing, deadlines, usage capture, access logs.

The gRPC servicer and the in-process REST path both call this. Its public coroutine names are the
snake_case names of the ChatService RPCs, so a transport can dispatch to it by method name.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from llm_gateway.v1 import chat_pb2

from gateway.call import CallInfo
from gateway.config import Config
from gateway.errors import (
    ClientClosedError,
    GatewayError,
    InternalError,
    InvalidRequestError,
    UpstreamTimeoutError,
)
from gateway.logs import get_logger

from .router import Router

log = get_logger("service")


class ChatCore:
    def __init__(self, config: Config, router: Router | None = None) -> None:
        self.config = config
        self.router = router or Router(config)
        self._default_timeout = config.server.request_timeout

    async def create_chat_completion(
        self, request: chat_pb2.CreateChatCompletionRequest, call: CallInfo
    ) -> chat_pb2.ChatCompletion:
        started = time.perf_counter()
        record = _AccessRecord(call, request.model, stream=False)
        try:
            _validate(request)
            route, provider = self.router.route(request.model)
            record.provider = route.provider
            async with asyncio.timeout(call.timeout or self._default_timeout):
                response = await provider.complete(request, route.upstream_model, call)
            if response.HasField("usage"):
                record.usage = response.usage
            return response
        except BaseException as exc:
            raise record.failed(exc) from None
        finally:
            record.log(started)

    async def stream_chat_completion(
        self, request: chat_pb2.CreateChatCompletionRequest, call: CallInfo
    ) -> AsyncIterator[chat_pb2.ChatCompletionChunk]:
        started = time.perf_counter()
        record = _AccessRecord(call, request.model, stream=True)
        try:
            _validate(request)
            route, provider = self.router.route(request.model)
            record.provider = route.provider
            wants_usage = request.stream_options.include_usage
            deadline = asyncio.get_running_loop().time() + (call.timeout or self._default_timeout)
            chunks = aiter(provider.stream(request, route.upstream_model, call))
            try:
                while True:
                    # The deadline covers the whole stream, checked while waiting for each chunk.
                    async with asyncio.timeout_at(deadline):
                        try:
                            chunk = await anext(chunks)
                        except StopAsyncIteration:
                            break
                    if chunk.HasField("usage"):
                        record.usage = chunk.usage
                        if not wants_usage:
                            if not chunk.choices:
                                continue  # the usage-only chunk the client did not ask for
                            chunk.ClearField("usage")
                    if not wants_usage and "usage" in chunk.extra:
                        del chunk.extra["usage"]  # the "usage": null that include_usage adds upstream
                    record.chunks += 1
                    yield chunk
            finally:
                await chunks.aclose()  # type: ignore[attr-defined]
        except BaseException as exc:
            raise record.failed(exc) from None
        finally:
            record.log(started)

    async def list_models(self, request: chat_pb2.ListModelsRequest, call: CallInfo) -> chat_pb2.ListModelsResponse:
        return self.router.list_models()

    async def close(self) -> None:
        await self.router.close()


def _validate(request: chat_pb2.CreateChatCompletionRequest) -> None:
    if not request.model:
        raise InvalidRequestError("You must provide a model parameter.", param="model")
    if not request.messages:
        raise InvalidRequestError("'messages' must be a non-empty array.", param="messages")


class _AccessRecord:
    """What the one access line of a request says."""

    __slots__ = ("call", "chunks", "error", "model", "provider", "request_id", "stream", "usage")

    def __init__(self, call: CallInfo, model: str, stream: bool) -> None:
        self.call = call
        self.request_id = call.get("x-request-id") or uuid.uuid4().hex
        self.model = model
        self.stream = stream
        self.provider = ""
        self.usage: chat_pb2.Usage | None = None
        self.error: GatewayError | None = None
        self.chunks = 0

    def failed(self, exc: BaseException) -> BaseException:
        """The error to raise for `exc`: gateway errors as they are, the rest mapped once, here."""
        if isinstance(exc, GatewayError):
            self.error = exc
        elif isinstance(exc, TimeoutError):
            self.error = UpstreamTimeoutError("The request timed out before the provider answered.")
        elif isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
            self.error = ClientClosedError("The client closed the request.")
            return exc  # cancellation keeps propagating as itself
        else:
            log.error("unexpected error", exc_info=True, request_id=self.request_id)
            self.error = InternalError("The gateway failed to handle the request.")
        return self.error

    def log(self, started: float) -> None:
        attrs: dict[str, Any] = {
            "request_id": self.request_id,
            "model": self.model,
            "provider": self.provider,
            "stream": self.stream,
            "status": self.error.http_status if self.error else 200,
            "latency_ms": round((time.perf_counter() - started) * 1000, 3),
        }
        if self.usage is not None:
            attrs["prompt_tokens"] = self.usage.prompt_tokens
            attrs["completion_tokens"] = self.usage.completion_tokens
            attrs["total_tokens"] = self.usage.total_tokens
        if self.error is not None:
            attrs["error_type"] = self.error.type
            attrs["error"] = self.error.message
        log.info("chat completion", **attrs)
