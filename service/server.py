"""The grpc.aio server: ChatService, standard health checking and server reflection, and its drain."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from llm_gateway.v1 import chat_pb2

from .chat import ChatCore
from .grpc_handlers import add_to_server
from .grpc_servicer import ChatServicer

SERVICE_NAME = chat_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name
# grpc enables SO_REUSEPORT on Linux, so several worker processes can bind one port. Nothing else:
# optimization_target (latency or throughput), max_concurrent_streams, enable_retries=0 and
# enable_http_proxy=0 measured within noise of the defaults (bench/profile-notes.md, round 2).
SERVER_OPTIONS: list[tuple[str, Any]] = [("grpc.so_reuseport", 1)]
# After the grace period, calls still running are ended with a shutting_down status; this is how
# long they get to send it before grpc.aio aborts what is left.
_GOODBYE = 1.0


class ServiceServer:
    """The running gRPC server and what its drain needs: the health servicer and the calls in flight."""

    def __init__(self, server: grpc.aio.Server, health: HealthServicer, servicer: ChatServicer) -> None:
        self.server = server
        self.health = health
        self.servicer = servicer
        self._stopped = False

    async def not_serving(self) -> None:
        """Health answers NOT_SERVING from now on, for every service; calls are still accepted."""
        await self.health.enter_graceful_shutdown()

    async def stop(self, deadline: float) -> None:
        """Refuse new calls, let those in flight run until `deadline` (loop time), then end each one left
        with UNAVAILABLE shutting_down (a stream after the messages it sent), never a bare cancel. Once only."""
        if self._stopped:
            return
        self._stopped = True
        loop = asyncio.get_running_loop()
        stopping = loop.create_task(self.server.stop(max(deadline - loop.time(), 0.0) + _GOODBYE))
        calls = self.servicer.calls
        if calls:  # the server accepts no new call by now: these are all there will be
            await asyncio.wait(list(calls), timeout=max(deadline - loop.time(), 0.0))
        if calls:
            self.servicer.draining = True
            for task in list(calls):
                task.cancel()  # the servicer sees CancelledError with draining set, and says goodbye
        await stopping


async def start_grpc_server(
    core: ChatCore, address: str, others: Sequence[tuple[Any, ServiceDescriptor]] = ()
) -> ServiceServer:
    """ChatService, and `others` (servicer, service), health and reflection, on `address`."""
    server = grpc.aio.server(options=SERVER_OPTIONS)
    servicer = ChatServicer(core)
    # Not the generated add_ChatServiceServicer_to_server: undecodable bytes must be INVALID_ARGUMENT.
    add_to_server(servicer, chat_pb2.DESCRIPTOR.services_by_name["ChatService"], server)
    for other, service in others:
        add_to_server(other, service, server)
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            SERVICE_NAME,
            *(service.full_name for _, service in others),
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    if server.add_insecure_port(address) == 0:
        raise OSError(f"cannot listen for gRPC on {address}")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    return ServiceServer(server, health_servicer, servicer)
