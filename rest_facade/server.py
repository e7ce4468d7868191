"""Start the REST facade on the caller's running event loop (the one the grpc.aio server uses).

Sanic's low-level API is used, so no second loop and no Sanic process manager: the gateway's own
runner owns processes and signals. The listening socket has SO_REUSEPORT, so `--workers N` processes
bind the same port and the kernel spreads connections over them.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from sanic import Sanic
from sanic.application.state import ApplicationServerInfo
from sanic.http.constants import HTTP
from sanic.server.async_server import AsyncioServer

from gateway.call import ChatBackend
from gateway.config import Config
from gateway.logs import get_logger
from llm_gateway.v1 import admin_pb2, chat_pb2

from .app import build_app
from .channel import ChannelBackend

log = get_logger("rest")

SERVICE = chat_pb2.DESCRIPTOR.services_by_name["ChatService"]
ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["AdminService"]
# Every service the facade serves over REST, each route generated from its http rules.
SERVICES = (SERVICE, ADMIN_SERVICE)
_BACKLOG = 1024
# After the grace period, what is still running is told goodbye (a 503, or an error event and [DONE]);
# this is how long that may take before the connections are cut.
_GOODBYE = 1.0
_touched_up = False


class RestServer:
    def __init__(self, app: Sanic[Any, Any], server: AsyncioServer, backend: ChatBackend, owns_backend: bool) -> None:
        self.app = app
        self._server: Any = server  # Sanic's AsyncioServer is untyped
        self._backend = backend
        self._owns_backend = owns_backend
        self._closed = False

    def not_ready(self) -> None:
        """/readyz answers 503 from now on; requests are still served, each with `connection: close`, so a
        client or load balancer reconnects (elsewhere, once the listener is closed) rather than reuse a
        connection this server will close. Sanic reads KEEP_ALIVE per request: no cost to the hot path."""
        self.app.ctx.stopping = True
        self.app.config.KEEP_ALIVE = False

    async def close(self, deadline: float) -> None:
        """Stop accepting, let requests in flight finish until `deadline` (loop time), then end what is
        left: a waiting request gets a 503, a stream an error event and [DONE]. Once only."""
        if self._closed:
            return
        self._closed = True
        server = self._server
        self.not_ready()
        await server.before_stop()
        closing = server.close()
        # Sanic keeps open connections in a plain set and signals nothing when one goes idle: poll it,
        # closing keep-alive connections as soon as their request is done.
        await _drain(server.connections, deadline)
        self.app.ctx.draining = True
        for connection in list(server.connections):
            task = getattr(connection, "_task", None)
            if task is not None:
                task.cancel()  # the handler sees CancelledError with ctx.draining set, and says goodbye
        await _drain(server.connections, asyncio.get_running_loop().time() + _GOODBYE)
        for connection in list(server.connections):
            connection.abort()
        if closing is not None:
            await closing
        await server.after_stop()
        if self._owns_backend:
            await self._backend.close()


async def _drain(connections: set[Any], deadline: float) -> None:
    loop = asyncio.get_running_loop()
    while connections and loop.time() < deadline:
        for connection in list(connections):
            # Idle, but with bytes of a request it has not parsed yet (Sanic's stage is IDLE until then):
            # served, not closed, or the request would fail (a load balancer does not resend a POST).
            if not connection.recv_buffer:
                connection.close_if_idle()
        await asyncio.sleep(0.05)


def listen_socket(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        sock.listen(_BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


async def start_rest_server(config: Config, backend: ChatBackend | None) -> RestServer:
    owns_backend = backend is None
    if backend is None:
        backend = ChannelBackend(config.server.grpc_target, SERVICE, ADMIN_SERVICE)
    app = build_app(config, backend, SERVICES)
    global _touched_up
    # Sanic's touch-up rewrites its shared protocol classes and cannot run twice in one process.
    app.config.TOUCHUP = not _touched_up
    _touched_up = True
    port = config.server.port
    sock = listen_socket(config.server.host, port)
    server: Any = await app.create_server(
        sock=sock, access_log=False, backlog=_BACKLOG, asyncio_server_kwargs={"start_serving": False}
    )
    assert server is not None
    # Tells Sanic's start-up touch-up that only HTTP/1.1 is served, so it drops its empty alt-svc header.
    app.state.server_info.append(ApplicationServerInfo(settings={"version": HTTP.VERSION_1, "port": port}))
    # Order matters: the app is finalized (routes, error handler) before the first connection is accepted.
    await server.startup()
    await server.before_start()
    await server.start_serving()
    await server.after_start()
    log.info(
        "rest listening",
        address=f"http://{config.server.host}:{config.server.port}",
        backend="in-process" if not owns_backend else f"grpc {config.server.grpc_target}",
    )
    return RestServer(app, server, backend, owns_backend)
