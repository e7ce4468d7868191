"""The chat service itself, free of any transport: routing, deadlines, usage capture, accounting.

The gRPC servicer and the in-process REST path both call this. Its public coroutine names are the
snake_case names of the ChatService RPCs, so a transport can dispatch to it by method name.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from gateway import tracing
from gateway.call import CallInfo
from gateway.config import Config
from gateway.errors import InvalidRequestError
from llm_gateway.v1 import chat_pb2

from .accounting import RequestRecord
from .router import Router
from .spans import RequestSpans


class ChatCore:
    def __init__(self, config: Config, router: Router | None = None) -> None:
        self.config = config
        self.router = router or Router(config)
        self._default_timeout = config.server.request_timeout
        self._drain = config.server.drain_cancelled_streams
        self._draining: set[asyncio.Task[None]] = set()

    async def create_chat_completion(
        self, request: chat_pb2.CreateChatCompletionRequest, call: CallInfo
    ) -> chat_pb2.ChatCompletion:
        record = RequestRecord(call, request.model, stream=False)
        spans = RequestSpans(tracing.TRACER, "CreateChatCompletion", request, call) if tracing.TRACER else None
        response = None
        try:
            _validate(request)
            route, provider, route_metrics = self.router.route(request.model)
            record.routed(route_metrics)
            if spans is not None and provider.url:
                call = spans.upstream(route, provider.type, provider.url, call)
            record.in_upstream = True
            sent = time.perf_counter()
            try:
                async with asyncio.timeout(call.timeout or self._default_timeout):
                    response = await provider.complete(request, route.upstream_model, call)
            finally:
                record.upstream_wait = time.perf_counter() - sent
            record.in_upstream = False
            if response.HasField("usage"):
                record.usage = response.usage
            return response
        except BaseException as exc:
            raise record.failed(exc) from None
        finally:
            record.finish()
            if spans is not None:
                reasons = tuple(c.finish_reason for c in response.choices) if response is not None else ()
                spans.finish(record, response.model if response is not None else "", reasons)

    async def stream_chat_completion(
        self, request: chat_pb2.CreateChatCompletionRequest, call: CallInfo
    ) -> AsyncIterator[chat_pb2.ChatCompletionChunk]:
        record = RequestRecord(call, request.model, stream=True)
        spans = RequestSpans(tracing.TRACER, "StreamChatCompletion", request, call) if tracing.TRACER else None
        response_model, reasons = "", list[str]()
        handed_off = False
        try:
            _validate(request)
            route, provider, route_metrics = self.router.route(request.model)
            record.routed(route_metrics)
            if spans is not None and provider.url:
                call = spans.upstream(route, provider.type, provider.url, call)
            wants_usage = request.stream_options.include_usage
            deadline = asyncio.get_running_loop().time() + (call.timeout or self._default_timeout)
            chunks = aiter(provider.stream(request, route.upstream_model, call))
            if self._drain:
                # The upstream is read in a task of its own, so a client that goes away cancels only us.
                chunks = _Pump(chunks)
            clock = time.perf_counter
            try:
                while True:
                    record.in_upstream = True
                    waited = clock()
                    # The deadline covers the whole stream, checked while waiting for each chunk.
                    try:
                        async with asyncio.timeout_at(deadline):
                            chunk = await anext(chunks)
                    except StopAsyncIteration:
                        break
                    finally:
                        now = clock()
                        record.upstream_wait += now - waited
                    record.in_upstream = False
                    if not record.first_chunk:
                        record.first_chunk = now
                    if spans is not None:
                        response_model = response_model or chunk.model
                        reasons.extend(c.finish_reason for c in chunk.choices if c.HasField("finish_reason"))
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
                    record.client_wait += clock() - now
            except (asyncio.CancelledError, GeneratorExit):
                if isinstance(chunks, _Pump) and record.usage is None:
                    handed_off = True
                    task = asyncio.get_running_loop().create_task(self._drain_usage(chunks, record, spans, deadline))
                    self._draining.add(task)
                    task.add_done_callback(self._draining.discard)
                raise
            finally:
                record.in_upstream = False
                if not handed_off:
                    await chunks.aclose()  # type: ignore[attr-defined]
        except BaseException as exc:
            raise record.failed(exc) from None
        finally:
            if not handed_off:
                record.finish()
                if spans is not None:
                    spans.finish(record, response_model, tuple(reasons))

    async def _drain_usage(
        self, chunks: _Pump, record: RequestRecord, spans: RequestSpans | None, deadline: float
    ) -> None:
        """Read a stream its client left until the provider's final usage, so it is counted exactly."""
        try:
            async with asyncio.timeout_at(deadline):
                async for chunk in chunks:
                    if chunk.HasField("usage"):
                        record.usage = chunk.usage
                        break
        except Exception:
            pass
        finally:
            await chunks.aclose()
            record.finish()
            if spans is not None:
                spans.finish(record)

    async def list_models(self, request: chat_pb2.ListModelsRequest, call: CallInfo) -> chat_pb2.ListModelsResponse:
        return self.router.list_models()

    async def close(self) -> None:
        for task in list(self._draining):
            task.cancel()
        await asyncio.gather(*self._draining, return_exceptions=True)
        await self.router.close()


class _Pump:
    """An async iterator read ahead by its own task through a small queue."""

    _END = object()

    def __init__(self, source: AsyncIterator[chat_pb2.ChatCompletionChunk]) -> None:
        self._source = source
        self._queue: asyncio.Queue[object] = asyncio.Queue(maxsize=8)
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            async for item in self._source:
                await self._queue.put(item)
            await self._queue.put(self._END)
        except Exception as exc:  # handed to the reader, raised there
            await self._queue.put(exc)
        finally:
            await self._source.aclose()  # type: ignore[attr-defined]

    def __aiter__(self) -> _Pump:
        return self

    async def __anext__(self) -> chat_pb2.ChatCompletionChunk:
        item = await self._queue.get()
        if item is self._END:
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item  # type: ignore[return-value]

    async def aclose(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


def _validate(request: chat_pb2.CreateChatCompletionRequest) -> None:
    if not request.model:
        raise InvalidRequestError("You must provide a model parameter.", param="model")
    if not request.messages:
        raise InvalidRequestError("'messages' must be a non-empty array.", param="messages")
