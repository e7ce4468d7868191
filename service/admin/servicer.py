"""AdminService over gRPC: each RPC, built from the descriptor, calls the AdminCore coroutine of its
snake_case name; a GatewayError ends the call with its code and ErrorDetail."""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import Message

from gateway.errors import GatewayError
from llm_gateway.v1 import admin_pb2

from ..grpc_servicer import _RpcMetrics, call_info
from .core import AdminCore

SERVICE = admin_pb2.DESCRIPTOR.services_by_name["AdminService"]

Handler = Callable[[Message, grpc.aio.ServicerContext[Any, Any]], Awaitable[Message]]


def snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


class AdminServicer:
    """An attribute per RPC (CreateKey, ListKeys, ...), as service.grpc_handlers.add_to_server expects."""

    def __init__(self, core: AdminCore) -> None:
        for method in SERVICE.methods:
            setattr(self, method.name, _handler(getattr(core, snake(method.name)), _RpcMetrics(method.name)))


def _handler(behaviour: Callable[..., Awaitable[Message]], rpc: _RpcMetrics) -> Handler:
    """Counted in llm_gateway_grpc_server_handled_total and _handling_seconds, as ChatService's RPCs are."""

    async def handle(request: Message, context: grpc.aio.ServicerContext[Any, Any]) -> Message:
        started = time.perf_counter()
        try:
            response = await behaviour(request, call_info(context))
        except GatewayError as exc:
            rpc.done(started, exc.grpc_code)
            await context.abort(exc.grpc_code, exc.message, trailing_metadata=exc.grpc_trailers())
            raise  # abort raises; not reached
        except BaseException:
            rpc.done(started, grpc.StatusCode.UNKNOWN)
            raise
        rpc.done(started, grpc.StatusCode.OK)
        return response

    return handle
