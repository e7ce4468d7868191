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
        try:
            _validate(request)
            route, provider, route_metrics = self.router.route(request.model)
            record.routed(route_metrics)
            if spans is not None and provider.url:
                call = spans.upstream(route, provider.type, provider.url, call)
            wants_usage = request.stream_options.include_usage
            deadline = asyncio.get_running_loop().time() + (call.timeout or self._default_timeout)
            chunks = aiter(provider.stream(request, route.upstream_model, call))
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
            finally:
                record.in_upstream = False
                await chunks.aclose()  # type: ignore[attr-defined]
        except BaseException as exc:
            raise record.failed(exc) from None
        finally:
            record.finish()
            if spans is not None:
                spans.finish(record, response_model, tuple(reasons))

    async def list_models(self, request: chat_pb2.ListModelsRequest, call: CallInfo) -> chat_pb2.ListModelsResponse:
        return self.router.list_models()

    async def close(self) -> None:
        await self.router.close()


def _validate(request: chat_pb2.CreateChatCompletionRequest) -> None:
    if not request.model:
        raise InvalidRequestError("You must provide a model parameter.", param="model")
    if not request.messages:
        raise InvalidRequestError("'messages' must be a non-empty array.", param="messages")
