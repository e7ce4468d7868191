"""The facade's remote path to the service: a grpc.aio channel, like grpc-gateway's
RegisterXHandlerFromEndpoint. Generic over the service's methods: one multicallable per method, built
once, with the messages' own SerializeToString / FromString.

A server-streaming RPC whose `batched_stream` option names a batched twin (StreamChatCompletion ->
StreamChatCompletionBatches) is called through the twin: grpc.aio costs about 100 us per message on
each side, and the twin sends the chunks that were ready together as one message. A service without
the twin (an older version) answers UNIMPLEMENTED, and the facade goes back to the plain RPC.

A failed call comes back as the `GatewayError` it started as, rebuilt from the status and its
`grpc-status-details-bin` trailer. A caller that is cancelled (the REST client went away) cancels the
RPC, and the service then cancels its upstream request.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2

from gateway.call import CallInfo
from gateway.errors import STATUS_DETAILS_KEY, GatewayError
from gateway.logs import get_logger
from llm_gateway.v1 import chat_pb2

_HEALTH_CHECK = "/grpc.health.v1.Health/Check"
_READY_TIMEOUT = 2.0
_OPTIONS = (
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 30_000),
)


log = get_logger("rest")
_ROUTINE = (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)


def rpc_error(error: grpc.aio.AioRpcError, method: str) -> GatewayError:
    trailers: Any = error.trailing_metadata()
    if not any(key == STATUS_DETAILS_KEY for key, _ in trailers or ()):
        # Not an error the service answered with (it always adds details): the channel itself failed,
        # or the deadline passed, which is routine.
        report = log.info if error.code() in _ROUTINE else log.warning
        report("grpc call failed", method=method, code=error.code().name, error=error.details() or "")
    return GatewayError.from_grpc(error.code(), error.details() or "", trailers)


def _answered_by(metadata: Any, call: CallInfo) -> None:
    """The service's x-llm-gateway-* (what answered) and x-ratelimit-* initial metadata into the call,
    for the headers."""
    for key, value in metadata or ():
        if key.startswith(("x-llm-gateway-", "x-ratelimit-")) and isinstance(value, str):
            call.response_metadata[key] = value


@dataclass(slots=True)
class _Streaming:
    """How one server-streaming method is called: plainly, or through its batched twin."""

    plain: Any
    batched: Any = None
    field: str = ""  # the batch message's repeated field holding the messages


def batched_twin(service: ServiceDescriptor, method: MethodDescriptor) -> tuple[MethodDescriptor, str] | None:
    """The RPC named by `method`'s batched_stream option, and the field of its message that holds a
    batch; None without the option. A twin that does not fit is a start-up error."""
    options: Any = method.GetOptions()  # typeshed's protobuf stubs cannot type custom extensions
    name: str = options.Extensions[chat_pb2.batched_stream]
    if not name:
        return None
    twin = service.methods_by_name.get(name)
    fields = twin.output_type.fields if twin is not None else []
    if (
        twin is None
        or not twin.server_streaming
        or twin.input_type is not method.input_type
        or len(fields) != 1
        or not fields[0].is_repeated
        or fields[0].message_type is not method.output_type
    ):
        raise ValueError(f"{method.full_name}: batched_stream {name!r} is not a streaming RPC of batches of it")
    return twin, fields[0].name


class ChannelBackend:
    """Every method of `service` and of `others` (AdminService) on one channel; readiness is `service`'s health."""

    def __init__(self, target: str, service: ServiceDescriptor, *others: ServiceDescriptor) -> None:
        self._service = service.full_name
        self._channel = grpc.aio.insecure_channel(target, options=_OPTIONS)
        self._unary: dict[str, Any] = {}
        self._stream: dict[str, _Streaming] = {}
        for one in (service, *others):
            self._add(one)
        self._health = self._channel.unary_unary(
            _HEALTH_CHECK,
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )

    def _add(self, service: ServiceDescriptor) -> None:
        for method in service.methods:
            path = f"/{service.full_name}/{method.name}"
            if not method.server_streaming:
                self._unary[path] = self._multicallable(service, method)
                continue
            streaming = self._stream[path] = _Streaming(self._multicallable(service, method))
            twin = batched_twin(service, method)
            if twin is not None:
                streaming.batched, streaming.field = self._multicallable(service, twin[0]), twin[1]

    def _multicallable(self, service: ServiceDescriptor, method: MethodDescriptor) -> Any:
        factory = self._channel.unary_stream if method.server_streaming else self._channel.unary_unary
        return factory(
            f"/{service.full_name}/{method.name}",
            request_serializer=message_factory.GetMessageClass(method.input_type).SerializeToString,
            response_deserializer=message_factory.GetMessageClass(method.output_type).FromString,
        )

    async def unary(self, method: str, request: Message, call: CallInfo) -> Message:
        try:
            # Awaiting a grpc.aio call that gets cancelled cancels the RPC itself.
            rpc = self._unary[method](request, metadata=call.metadata, timeout=call.timeout)
            response: Message = await rpc
            _answered_by(await rpc.initial_metadata(), call)
            _answered_by(await rpc.trailing_metadata(), call)  # x-llm-gateway-cost-usd is a trailer
        except grpc.aio.AioRpcError as error:
            raise rpc_error(error, method) from None
        return response

    async def stream(self, method: str, request: Message, call: CallInfo) -> AsyncIterator[Sequence[Message]]:
        streaming = self._stream[method]
        if streaming.batched is not None:
            rpc = streaming.batched(request, metadata=call.metadata, timeout=call.timeout)
            try:
                async for batch in self._messages(rpc, method, call):
                    yield getattr(batch, streaming.field)
                return
            except GatewayError as error:
                if error.grpc_code != grpc.StatusCode.UNIMPLEMENTED or call.response_metadata:
                    raise
            log.warning("the service has no batched stream; using the plain one", method=method)
            streaming.batched = None
        rpc = streaming.plain(request, metadata=call.metadata, timeout=call.timeout)
        async for message in self._messages(rpc, method, call):
            yield (message,)

    @staticmethod
    async def _messages(rpc: Any, method: str, call: CallInfo) -> AsyncIterator[Message]:
        first = True
        try:
            async for message in rpc:
                if first:
                    _answered_by(await rpc.initial_metadata(), call)
                    first = False
                yield message
        except grpc.aio.AioRpcError as error:
            raise rpc_error(error, method) from None
        finally:
            # Closed early (client gone, or the caller stopped reading): end the RPC too. No-op when done.
            rpc.cancel()

    async def ready(self) -> bool:
        try:
            reply = await self._health(health_pb2.HealthCheckRequest(service=self._service), timeout=_READY_TIMEOUT)
        except grpc.aio.AioRpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    async def close(self) -> None:
        await self._channel.close(grace=None)
