"""The grpc.aio servicer: gRPC context in, ChatCore call, GatewayError out as a rich status."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, NoReturn

import grpc
from llm_gateway.v1 import chat_pb2, chat_pb2_grpc

from gateway.call import CallInfo
from gateway.errors import GatewayError

from .chat import ChatCore


def call_info(context: grpc.aio.ServicerContext[Any, Any]) -> CallInfo:
    metadata = tuple((key, value) for key, value in context.invocation_metadata() or () if isinstance(value, str))
    return CallInfo(metadata=metadata, timeout=context.time_remaining())


async def _abort(context: grpc.aio.ServicerContext[Any, Any], error: GatewayError) -> NoReturn:
    await context.abort(error.grpc_code, error.message, trailing_metadata=error.grpc_trailers())
    raise AssertionError("unreachable")  # abort always raises


class ChatServicer(chat_pb2_grpc.ChatServiceServicer):
    def __init__(self, core: ChatCore) -> None:
        self._core = core

    async def CreateChatCompletion(
        self, request: chat_pb2.CreateChatCompletionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> chat_pb2.ChatCompletion:
        try:
            return await self._core.create_chat_completion(request, call_info(context))
        except GatewayError as error:
            await _abort(context, error)

    async def StreamChatCompletion(
        self, request: chat_pb2.CreateChatCompletionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[chat_pb2.ChatCompletionChunk]:
        try:
            async for chunk in self._core.stream_chat_completion(request, call_info(context)):
                yield chunk
        except GatewayError as error:
            await _abort(context, error)

    async def ListModels(
        self, request: chat_pb2.ListModelsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> chat_pb2.ListModelsResponse:
        return await self._core.list_models(request, call_info(context))
