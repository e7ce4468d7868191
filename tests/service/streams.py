"""Driving a provider's stream to its end in a test: what it yielded, and the gateway error that ended it."""

from __future__ import annotations

import asyncio

from gateway.call import CallInfo
from gateway.config import ProviderConfig, Timeouts
from gateway.errors import GatewayError
from llm_gateway.v1 import chat_pb2
from service.providers import build_provider

Batches = list[list[chat_pb2.ChatCompletionChunk]]


def drain(
    spec: ProviderConfig, request: chat_pb2.CreateChatCompletionRequest, model: str, timeouts: Timeouts
) -> tuple[Batches, GatewayError | None]:
    """A provider built from `spec` streams `request` for `model` until it ends or fails; it is closed after."""

    async def run() -> tuple[Batches, GatewayError | None]:
        provider = build_provider(spec)
        batches: Batches = []
        try:
            async for batch in provider.stream(request, model, CallInfo(), timeouts):
                batches.append(batch)
        except GatewayError as exc:
            return batches, exc
        finally:
            await provider.close()
        return batches, None

    return asyncio.run(run())
