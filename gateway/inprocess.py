"""The facade's in-process path to the service, like grpc-gateway's RegisterXHandlerServer: the REST
handler calls the service's coroutine directly, with no serialization and no wire hop."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import Message

from .call import CallInfo


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


class InProcessBackend:
    def __init__(self, core: Any, service: ServiceDescriptor) -> None:
        self._service = service
        self.swap(core)

    def swap(self, core: Any) -> None:
        """New calls go to `core` (a config reload); calls in flight finish on the one they started on.
        The tables are built aside and put in place together, so a request never sees half of them."""
        unary: dict[str, Callable[..., Any]] = {}
        stream: dict[str, Callable[..., Any]] = {}
        service = self._service
        for method in service.methods:
            # Not every RPC has its own coroutine: StreamChatCompletionBatches is a gRPC-only view of
            # StreamChatCompletion, whose coroutine already yields batches.
            implementation = getattr(core, _snake(method.name), None)
            if implementation is not None:
                table = stream if method.server_streaming else unary
                table[f"/{service.full_name}/{method.name}"] = implementation
        self._core, self._unary, self._stream = core, unary, stream

    async def unary(self, method: str, request: Message, call: CallInfo) -> Message:
        result: Message = await self._unary[method](request, call)
        return result

    def stream(self, method: str, request: Message, call: CallInfo) -> AsyncIterator[Sequence[Message]]:
        result: AsyncIterator[Sequence[Message]] = self._stream[method](request, call)
        return result

    async def ready(self) -> bool:
        return True

    async def close(self) -> None:
        return None
