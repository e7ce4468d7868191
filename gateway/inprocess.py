"""The facade's in-process path to the service, like grpc-gateway's RegisterXHandlerServer: the REST
handler calls the service's coroutine directly, with no serialization and no wire hop."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import Message

from .call import CallInfo


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


class InProcessBackend:
    """`service`'s RPCs go to `core`, which a config reload swaps; each of `others` (implementation,
    service) goes to its implementation, which stays."""

    def __init__(
        self, core: Any, service: ServiceDescriptor, others: Sequence[tuple[Any, ServiceDescriptor]] = ()
    ) -> None:
        self._service = service
        self._fixed: tuple[dict[str, Callable[..., Any]], dict[str, Callable[..., Any]]] = ({}, {})
        for implementation, other in others:
            _bind(implementation, other, *self._fixed)
        self.swap(core)

    def swap(self, core: Any) -> None:
        """New calls go to `core` (a config reload); calls in flight finish on the one they started on.
        The tables are built aside and put in place together, so a request never sees half of them."""
        unary, stream = dict(self._fixed[0]), dict(self._fixed[1])
        _bind(core, self._service, unary, stream)
        self._core, self._unary, self._stream = core, unary, stream

    def unary(self, method: str, request: Message, call: CallInfo) -> Awaitable[Message]:
        # The service's own coroutine, for the caller to await: no coroutine layer of ours per call.
        result: Awaitable[Message] = self._unary[method](request, call)
        return result

    def stream(self, method: str, request: Message, call: CallInfo) -> AsyncIterator[Sequence[Message]]:
        result: AsyncIterator[Sequence[Message]] = self._stream[method](request, call)
        return result

    async def ready(self) -> bool:
        return True

    async def close(self) -> None:
        return None


def _bind(
    implementation: Any,
    service: ServiceDescriptor,
    unary: dict[str, Callable[..., Any]],
    stream: dict[str, Callable[..., Any]],
) -> None:
    for method in service.methods:
        # Not every RPC has its own coroutine: StreamChatCompletionBatches is a gRPC-only view of
        # StreamChatCompletion, whose coroutine already yields batches.
        coroutine = getattr(implementation, _snake(method.name), None)
        if coroutine is not None:
            table = stream if method.server_streaming else unary
            table[f"/{service.full_name}/{method.name}"] = coroutine
