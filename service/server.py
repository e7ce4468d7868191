"""The grpc.aio server: ChatService, standard health checking and server reflection."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from llm_gateway.v1 import chat_pb2, chat_pb2_grpc

from .chat import ChatCore
from .grpc_servicer import ChatServicer

SERVICE_NAME = chat_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name


async def start_grpc_server(core: ChatCore, address: str) -> grpc.aio.Server:
    # grpc enables SO_REUSEPORT on Linux, so several worker processes can bind one port.
    server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
    chat_pb2_grpc.add_ChatServiceServicer_to_server(ChatServicer(core), server)  # type: ignore[no-untyped-call]
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    if server.add_insecure_port(address) == 0:
        raise OSError(f"cannot listen for gRPC on {address}")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    return server
