"""The one small interface every provider implements."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from gateway.call import CallInfo
from gateway.config import Timeouts
from llm_gateway.v1 import chat_pb2


class Provider(Protocol):
    name: str
    type: str
    # The upstream chat URL; empty for providers that make no HTTP call.
    url: str

    async def complete(
        self, request: chat_pb2.CreateChatCompletionRequest, upstream_model: str, call: CallInfo, timeouts: Timeouts
    ) -> chat_pb2.ChatCompletion:
        """One chat completion. Raises gateway.errors.GatewayError; a timeout of `timeouts` raises
        UpstreamTimeoutError."""
        ...

    def stream(
        self, request: chat_pb2.CreateChatCompletionRequest, upstream_model: str, call: CallInfo, timeouts: Timeouts
    ) -> AsyncIterator[list[chat_pb2.ChatCompletionChunk]]:
        """The chunks of a streamed completion in batches, never empty: the chunks that arrived
        together (one network read) in one list, so a fast stream costs one step per read, not one per
        token. The last chunk is a usage chunk when the upstream reports usage. Closing the iterator
        closes the upstream request."""
        ...

    async def close(self) -> None: ...


class EmbeddingProvider(Provider, Protocol):
    """A provider that also serves embeddings. Optional: the service looks for `embed` on a provider,
    and a model whose provider has none answers embedding requests with a 400."""

    async def embed(
        self, request: chat_pb2.CreateEmbeddingRequest, upstream_model: str, call: CallInfo, timeouts: Timeouts
    ) -> chat_pb2.CreateEmbeddingResponse:
        """One embeddings call; the response as the upstream sent it (floats, or base64 when asked).
        Raises gateway.errors.GatewayError like `complete`."""
        ...
