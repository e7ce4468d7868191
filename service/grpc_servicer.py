"""The grpc.aio servicer: gRPC context in, ChatCore call, GatewayError out as a rich status."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from gateway import metrics
from gateway.call import CallInfo
from gateway.errors import GatewayError, ShuttingDownError
from llm_gateway.v1 import chat_pb2, chat_pb2_grpc

from .chat import ChatCore
from .grpc_handlers import batched
from .spend import COST_HEADER

_SERVICE = chat_pb2.DESCRIPTOR.services_by_name["ChatService"]


def call_info(context: grpc.aio.ServicerContext[Any, Any]) -> CallInfo:
    metadata = tuple((key, value) for key, value in context.invocation_metadata() or () if isinstance(value, str))
    return CallInfo(metadata=metadata, timeout=context.time_remaining())


class _RpcMetrics:
    """Handled-call counters and the duration histogram of one RPC, bound once."""

    def __init__(self, method: str) -> None:
        self.method = method
        self.duration = metrics.GRPC_HANDLING.labels(method)
        self._handled = {code: metrics.GRPC_HANDLED.labels(method, code.name) for code in grpc.StatusCode}

    def done(self, started: float, code: grpc.StatusCode) -> None:
        self._handled[code].inc()
        self.duration.observe(time.perf_counter() - started)


R = TypeVar("R")
_METRICS = {method.name: _RpcMetrics(method.name) for method in _SERVICE.methods}
_SHUTTING_DOWN = ShuttingDownError("The gateway is shutting down; retry the request.")


def _code_of(exc: BaseException) -> grpc.StatusCode:
    if isinstance(exc, GatewayError):
        return exc.grpc_code
    # GeneratorExit: a stream's handler closed the servicer's generator, because a write was cancelled
    # or failed. Either way the client is gone, as with a cancellation in the service itself.
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


async def _failed(
    context: grpc.aio.ServicerContext[Any, Any], rpc: _RpcMetrics, started: float, exc: BaseException, draining: bool
) -> None:
    """Count the failed call; a gateway error ends it with its code and ErrorDetail (abort raises).
    A call cancelled by the drain, after the grace period, ends as shutting_down."""
    if draining and isinstance(exc, asyncio.CancelledError):
        exc = _SHUTTING_DOWN
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0 and not isinstance(exc, asyncio.CancelledError):
        # The caller's deadline has passed, so C-core has ended the call and any batch now fails: grpc.aio
        # would log that failure as an error. Our own deadline (the same instant) raced it; it is over.
        rpc.done(started, grpc.StatusCode.DEADLINE_EXCEEDED)
        raise asyncio.CancelledError from exc
    rpc.done(started, _code_of(exc))
    if isinstance(exc, GatewayError):
        await context.abort(exc.grpc_code, exc.message, trailing_metadata=exc.grpc_trailers())


class ChatServicer(chat_pb2_grpc.ChatServiceServicer):
    def __init__(self, core: ChatCore) -> None:
        self._core = core
        # The tasks of the chat calls in flight, for the drain: a set add and discard per call.
        self.calls: set[asyncio.Task[Any]] = set()
        self.draining = False

    def swap(self, core: ChatCore) -> None:
        """New calls go to `core` (a config reload); calls in flight finish on the one they started on."""
        self._core = core

    async def CreateChatCompletion(
        self, request: chat_pb2.CreateChatCompletionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> chat_pb2.ChatCompletion:
        return await self._unary("CreateChatCompletion", self._core.create_chat_completion, request, context)

    async def CreateEmbedding(
        self, request: chat_pb2.CreateEmbeddingRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> chat_pb2.CreateEmbeddingResponse:
        return await self._unary("CreateEmbedding", self._core.create_embedding, request, context)

    async def _unary(
        self,
        name: str,
        method: Callable[[Any, CallInfo], Awaitable[R]],
        request: Any,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> R:
        started, rpc = time.perf_counter(), _METRICS[name]
        call = call_info(context)
        task = asyncio.current_task()
        self.calls.add(task)  # type: ignore[arg-type]
        try:
            response = await method(request, call)
            answered = call.response_metadata
            cost = answered.pop(COST_HEADER, None)  # known at the end: a trailer, as for streams
            await context.send_initial_metadata(tuple(answered.items()))
            if cost is not None:
                context.set_trailing_metadata(((COST_HEADER, cost),))
        except BaseException as exc:
            await _failed(context, rpc, started, exc, self.draining)
            raise
        finally:
            self.calls.discard(task)  # type: ignore[arg-type]
        rpc.done(started, grpc.StatusCode.OK)
        return response

    @batched  # one message per chunk on the wire, written by the handler straight from the batches
    def StreamChatCompletion(  # type: ignore[override]
        self, request: chat_pb2.CreateChatCompletionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[list[chat_pb2.ChatCompletionChunk]]:
        return self._batches("StreamChatCompletion", request, context)

    async def StreamChatCompletionBatches(
        self, request: chat_pb2.CreateChatCompletionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[chat_pb2.ChatCompletionChunkBatch]:
        # grpc.aio costs about 100 us per message on each side: one message per batch, not per chunk.
        async with contextlib.aclosing(self._batches("StreamChatCompletionBatches", request, context)) as batches:
            async for batch in batches:
                yield chat_pb2.ChatCompletionChunkBatch(chunks=batch)

    async def _batches(
        self, name: str, request: chat_pb2.CreateChatCompletionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncGenerator[list[chat_pb2.ChatCompletionChunk]]:
        started, rpc = time.perf_counter(), _METRICS[name]
        call = call_info(context)
        first = True
        task = asyncio.current_task()
        self.calls.add(task)  # type: ignore[arg-type]
        try:
            async for batch in self._core.stream_chat_completion(request, call):
                if first:
                    # What answered is known once the first chunk is: it goes out ahead of it.
                    await context.send_initial_metadata(tuple(call.response_metadata.items()))
                    first = False
                yield batch
            cost = call.response_metadata.get(COST_HEADER)  # set as the stream ended
            if cost is not None:
                context.set_trailing_metadata(((COST_HEADER, cost),))
        except BaseException as exc:
            await _failed(context, rpc, started, exc, self.draining)
            raise
        finally:
            self.calls.discard(task)  # type: ignore[arg-type]
        rpc.done(started, grpc.StatusCode.OK)

    async def ListModels(
        self, request: chat_pb2.ListModelsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> chat_pb2.ListModelsResponse:
        started, rpc = time.perf_counter(), _METRICS["ListModels"]
        try:
            response = await self._core.list_models(request, call_info(context))
        except BaseException as exc:  # a missing or unknown key, with auth on
            await _failed(context, rpc, started, exc, self.draining)
            raise
        rpc.done(started, grpc.StatusCode.OK)
        return response
