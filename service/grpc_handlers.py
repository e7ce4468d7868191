"""ChatService's gRPC method handlers, built from its descriptor, so that a request body that is not a
valid protobuf message is the client's error.

The generated `add_ChatServiceServicer_to_server` deserializes with `FromString`; when that raises,
grpc.aio logs an ERROR with its own traceback and answers UNKNOWN ("Unexpected DecodeError"). Here
the deserializer hands undecodable bytes on as an `Unparsable`, and the handler answers it with
INVALID_ARGUMENT and the usual ErrorDetail (HTTP 400), in one INFO log line. Every RPC of the service
gets this, including ones added later, since the handlers come from the descriptor.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, NoReturn

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import DecodeError, Message

from gateway import logs, metrics
from gateway.errors import InvalidRequestError

log = logs.get_logger("grpc")

Context = grpc.aio.ServicerContext[Any, Any]


class Unparsable:
    """What the deserializer hands on for bytes that do not decode as the RPC's request message."""

    __slots__ = ("size",)

    def __init__(self, size: int) -> None:
        self.size = size


def add_to_server(servicer: Any, service: ServiceDescriptor, server: grpc.aio.Server) -> None:
    """Serve every RPC of `service` by `servicer`'s method of its name, with generic handlers only."""
    handlers = {method.name: method_handler(method, getattr(servicer, method.name)) for method in service.methods}
    # Generic only, not also "registered": grpc.aio's accept loop keeps one pending request per
    # registered method and asyncio.wait()s on all of them for each incoming call (one done-callback
    # added and removed per future: 15 futures with ChatService, AdminService, health and reflection
    # registered, about 14 us per call here; 5 without ours, about 9 us).
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))


def method_handler(method: MethodDescriptor, behaviour: Callable[..., Any]) -> grpc.RpcMethodHandler[Any, Any]:
    """The handler of one RPC, served by `behaviour` (a servicer method, `batched` or not)."""
    if method.client_streaming:
        raise TypeError(f"{method.full_name}: client-streaming RPCs have no handler here")
    request_type: type[Message] = message_factory.GetMessageClass(method.input_type)
    response_type: type[Message] = message_factory.GetMessageClass(method.output_type)
    parse = request_type.FromString

    def deserialize(data: bytes) -> Message | Unparsable:
        try:
            return parse(data)
        except DecodeError:
            return Unparsable(len(data))

    refuse = _Refusal(method)
    if method.server_streaming:
        return grpc.unary_stream_rpc_method_handler(
            _streaming(behaviour, refuse),
            request_deserializer=deserialize,
            response_serializer=response_type.SerializeToString,
        )
    return grpc.unary_unary_rpc_method_handler(
        _unary(behaviour, refuse), request_deserializer=deserialize, response_serializer=response_type.SerializeToString
    )


class _Refusal:
    """Ends a call whose request could not be parsed: INVALID_ARGUMENT, counted, one INFO line."""

    def __init__(self, method: MethodDescriptor) -> None:
        self._method = f"/{method.containing_service.full_name}/{method.name}"
        self._error = InvalidRequestError(
            f"The request could not be parsed: it is not a valid {method.input_type.full_name} message."
        )
        self._trailers = self._error.grpc_trailers()  # built once: the same for every such call
        self._handled = metrics.GRPC_HANDLED.labels(method.name, grpc.StatusCode.INVALID_ARGUMENT.name)
        self._duration = metrics.GRPC_HANDLING.labels(method.name)

    async def __call__(self, request: Unparsable, context: Context, started: float) -> NoReturn:
        self._handled.inc()
        self._duration.observe(time.perf_counter() - started)
        log.info("request could not be parsed", method=self._method, peer=context.peer(), bytes=request.size)
        await context.abort(self._error.grpc_code, self._error.message, trailing_metadata=self._trailers)


def _unary(behaviour: Callable[[Any, Context], Awaitable[Any]], refuse: _Refusal) -> Callable[..., Awaitable[Any]]:
    async def handle(request: Any, context: Context) -> Any:
        if request.__class__ is Unparsable:
            await refuse(request, context, time.perf_counter())
        return await behaviour(request, context)

    return handle


def batched(behaviour: Callable[..., AsyncIterator[Sequence[Any]]]) -> Callable[..., AsyncIterator[Sequence[Any]]]:
    """Marks a server-streaming servicer method that yields lists of messages: each is sent on its own."""
    behaviour.batched = True  # type: ignore[attr-defined]
    return behaviour


def _streaming(behaviour: Callable[[Any, Context], AsyncIterator[Any]], refuse: _Refusal) -> Callable[..., Any]:
    # A coroutine, not an async generator: grpc.aio then lets it write each message itself, which
    # saves its `async for` over one generator more per message. A `batched` behaviour's lists are
    # written message by message here, without a generator step per message in between.
    many = getattr(behaviour, "batched", False)

    async def handle(request: Any, context: Context) -> None:
        if request.__class__ is Unparsable:
            await refuse(request, context, time.perf_counter())
        write = context.write
        # aclosing: when a write fails (the client went away), the servicer's generator is closed now, not by GC.
        async with contextlib.aclosing(behaviour(request, context)) as responses:  # type: ignore[type-var]
            if many:
                async for batch in responses:
                    for response in batch:
                        await write(response)
            else:
                async for response in responses:
                    await write(response)

    return handle
