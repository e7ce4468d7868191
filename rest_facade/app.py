"""The Sanic app: one generic transcoding handler per route from the proto, plus /healthz, /readyz
and /metrics (Prometheus text, summed over workers).

Request path: body bytes -> orjson -> protobuf (precomputed codec tables) -> backend -> protobuf ->
orjson bytes. Nothing here is looked up per request that could be looked up at start-up.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import Message
from opentelemetry.trace import Tracer
from sanic import HTTPResponse, Request, Sanic
from sanic.config import Config as SanicConfig

from gateway import metrics, tracing
from gateway.call import CallInfo, ChatBackend
from gateway.config import Config
from gateway.errors import GatewayError, InternalError, ShuttingDownError, UpstreamUnavailableError
from gateway.jsonpb import JsonMappingError
from gateway.logs import get_logger

from . import sse
from .docs import add_docs_routes
from .errors import JSON, OpenAIErrorHandler, body_error, error_response
from .headers import REQUEST_ID, call_info, request_id
from .request import FacadeRequest
from .response import Response
from .routes import Binding, Route, build_routes
from .spans import ServerSpan

log = get_logger("rest")

Handler = Callable[..., Coroutine[Any, Any, HTTPResponse | None]]

_NO_QUERY: dict[str, list[str]] = {}
_HEALTHY = b'{"status":"ok"}'
_READY = b'{"status":"ready"}'
# Sanic's own response timeout must never beat the request deadline, which answers with a proper 504.
_RESPONSE_TIMEOUT_MARGIN = 30.0
_SHUTTING_DOWN = ShuttingDownError("The gateway is shutting down; retry the request.")
_names = itertools.count(1)


def build_app(
    config: Config, backend: ChatBackend, services: ServiceDescriptor | Sequence[ServiceDescriptor]
) -> Sanic[Any, Any]:
    """The app serving every route of `services` (ChatService, AdminService) through the one handler."""
    app: Sanic[Any, Any] = Sanic(
        f"llm_gateway_rest_{os.getpid()}_{next(_names)}",
        config=_Settings(),
        request_class=FacadeRequest,
        configure_logging=False,
        error_handler=OpenAIErrorHandler(),
    )
    server = config.server
    app.config.REQUEST_MAX_SIZE = server.max_body_bytes
    app.config.RESPONSE_TIMEOUT = server.request_timeout + _RESPONSE_TIMEOUT_MARGIN
    app.config.ACCESS_LOG = False
    app.config.MOTD = False
    app.config.NOISY_EXCEPTIONS = False
    app.ctx.stopping = False  # set on SIGTERM: /readyz answers 503 while requests are still served
    app.ctx.draining = False  # set by RestServer.close once the grace period is over
    for route in (route for service in _each(services) for route in build_routes(service)):
        name = route.bindings[0].descriptor.name
        app.add_route(
            transcoding_handler(route, backend, server.request_timeout),
            route.sanic_path,
            methods=[route.http_method],
            name=f"{route.http_method.lower()}_{name}",
        )

    async def healthz(request: Request) -> HTTPResponse:
        return HTTPResponse(_HEALTHY, headers={REQUEST_ID: request_id(request.headers)}, content_type=JSON)

    async def readyz(request: Request) -> HTTPResponse:
        rid = request_id(request.headers)
        if request.app.ctx.stopping:
            return error_response(_SHUTTING_DOWN, rid)
        if await backend.ready():
            return HTTPResponse(_READY, headers={REQUEST_ID: rid}, content_type=JSON)
        return error_response(UpstreamUnavailableError("The gRPC service is not reachable."), rid)

    async def prometheus(request: Request) -> HTTPResponse:
        body, content_type = metrics.exposition()
        return HTTPResponse(body, content_type=content_type)

    app.add_route(healthz, "/healthz", methods=["GET"], name="healthz")
    app.add_route(readyz, "/readyz", methods=["GET"], name="readyz")
    app.add_route(prometheus, "/metrics", methods=["GET"], name="metrics")
    add_docs_routes(app)
    return app


def _setting(name: str) -> property:
    def get(config: SanicConfig) -> Any:
        return config[name]

    def put(config: SanicConfig, value: Any) -> None:
        dict.__setitem__(config, name, value)

    return property(get, put)


class _Settings(SanicConfig):
    """Sanic's config, with the settings Sanic reads per request as properties. Its config is a dict whose
    settings are read as attributes through `__getattr__`, which Python 3.11 reaches only after raising
    and formatting an AttributeError: about 5,000 instructions per read, two reads per request
    (KEEP_ALIVE per request, REQUEST_BUFFER_SIZE per read from the socket). A property reads the item.
    Setting one still goes through Sanic's `update` (it calls the property's setter, then its own hooks)."""

    KEEP_ALIVE = _setting("KEEP_ALIVE")
    REQUEST_BUFFER_SIZE = _setting("REQUEST_BUFFER_SIZE")


def _each(services: ServiceDescriptor | Sequence[ServiceDescriptor]) -> Sequence[ServiceDescriptor]:
    return (services,) if isinstance(services, ServiceDescriptor) else services


def transcoding_handler(route: Route, backend: ChatBackend, max_timeout: float) -> Handler:
    """The one handler every proto-annotated route shares: decode, pick the RPC, call, encode."""
    reads_query = not route.body  # only body-less rules take fields from the query string

    def handle(request: Request, **path_params: str) -> Coroutine[Any, Any, HTTPResponse | None]:
        # Not a coroutine itself: it hands Sanic the one to await (no coroutine layer of its own per request).
        rid = request_id(request.headers)
        tracer = tracing.TRACER
        if tracer is None:  # tracing off: one global read, no span work at all
            return transcode(request, path_params, rid, None)
        return traced(request, path_params, rid, tracer)

    async def traced(request: Request, path_params: dict[str, str], rid: str, tracer: Tracer) -> HTTPResponse | None:
        span = ServerSpan(tracer, request, route.path)
        status = 500
        try:
            response = await transcode(request, path_params, rid, span)
            status = response.status if response is not None else 200  # None: an SSE stream was sent
            return response
        finally:
            span.end(status, rid)

    async def transcode(
        request: Request, path_params: dict[str, str], rid: str, span: ServerSpan | None
    ) -> HTTPResponse | None:
        try:
            call = call_info(request.headers, rid, max_timeout)
            body = request.body  # Sanic has read the whole body already, capped at REQUEST_MAX_SIZE
            try:
                # request.args parses the query string lazily: only body-less rules pay for it.
                message = route.decode(body, request.args if reads_query else _NO_QUERY, path_params)
            except JsonMappingError as exc:
                raise body_error(exc, body) from None
        except GatewayError as error:
            log.info("request rejected", request_id=rid, status=error.http_status, error=error.message)
            return error_response(error, rid)
        if span is not None:
            call = span.carry(call)
        binding = route.pick(message)  # one attribute read: the stream flag
        try:
            if binding.server_streaming:
                await _stream(request, backend, binding, message, call, rid)
                return None
            reply = await backend.unary(binding.method, message, call)
        except GatewayError as error:
            return error_response(error, rid)
        except Exception:
            log.error("unexpected error", exc_info=True, request_id=rid, method=binding.method)
            return error_response(InternalError("The gateway failed to handle the request."), rid)
        # Message -> orjson bytes through the codec's precomputed tables; Sanic sends the bytes as they are.
        return Response(binding.response.dumps(reply), headers=_headers(rid, call), content_type=JSON)

    return handle


def _headers(rid: str, call: CallInfo) -> dict[str, str]:
    """x-request-id, and what answered (x-llm-gateway-model, -deployment, -attempts) once the service said."""
    if call.response_metadata:
        return {REQUEST_ID: rid, **call.response_metadata}
    return {REQUEST_ID: rid}


async def _stream(
    request: Request, backend: ChatBackend, binding: Binding, message: Message, call: CallInfo, rid: str
) -> None:
    """Server-streaming RPC -> SSE. Errors before the first message raise (the caller answers with
    their real status); errors after it become an error event, then [DONE].

    The backend hands over messages in batches, those that were ready together (one upstream read),
    and each batch leaves in one write: a fast stream costs a few sends, while a chunk that arrives
    alone is still sent at once."""
    batches = backend.stream(binding.method, message, call)
    encode = binding.response.dumps
    try:
        first = await anext(batches, None)
        # Headers go out only now, once the first message (or a clean empty end) has arrived.
        response = await request.respond(
            Response(headers={**sse.HEADERS, **_headers(rid, call)}, content_type=sse.CONTENT_TYPE)
        )
        try:
            if first is None:
                await response.send(sse.DONE, end_stream=True)
                return
            await response.send(sse.events(first, encode))  # each send is one chunked write: flushed
            end = sse.DONE
            try:
                async for batch in batches:
                    await response.send(sse.events(batch, encode))
            except GatewayError as error:
                end = sse.error_event(error) + sse.DONE
            except asyncio.CancelledError:
                raise
            except Exception:
                log.error("unexpected error mid-stream", exc_info=True, request_id=rid, method=binding.method)
                end = sse.error_event(InternalError("The gateway failed mid-stream.")) + sse.DONE
            await response.send(end, end_stream=True)
        except asyncio.CancelledError:
            if request.app.ctx.draining and not request.transport.is_closing():
                # Shutting down, not a client gone: end the stream properly rather than cut it.
                await response.send(sse.error_event(_SHUTTING_DOWN) + sse.DONE, end_stream=True)
            raise
        except Exception:  # the response has started: nothing left to tell the client
            log.error("stream aborted", exc_info=True, request_id=rid, method=binding.method)
    finally:
        # Client gone (the task is cancelled) or stream over: close the backend call, which closes upstream.
        aclose = getattr(batches, "aclose", None)
        if aclose is not None:
            await aclose()
