"""What a request leaves behind: one access log line, its token counts, its timings.

Each request is counted exactly once, when it ends, whichever way it ends (success, error, client
cancellation): `RequestRecord.finish` runs in a `finally`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from gateway import cycles, metrics
from gateway.call import CallInfo, new_request_id
from gateway.errors import (
    BadGatewayError,
    ClientClosedError,
    GatewayError,
    InternalError,
    UpstreamError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from gateway.hotmetrics import Observer, incrementer
from gateway.logs import get_logger
from llm_gateway.v1 import chat_pb2

if TYPE_CHECKING:
    from .spend import SpendMeter
    from .tenancy import Tenant

log = get_logger("service")
_PID = os.getpid()  # per worker: each is a process of its own, spawned fresh


class RouteMetrics:
    """The metric children of one (model, provider) pair, bound once: `labels()` is not free, and the
    children are kept in their request-path form (gateway/hotmetrics.py)."""

    def __init__(self, model: str, provider: str) -> None:
        self.model = model
        self.provider = provider
        labels = (model, provider)
        # Indexed by RequestRecord.usage_estimated: [reported, estimated].
        kinds = (metrics.USAGE_REPORTED, metrics.USAGE_ESTIMATED)
        self.prompt_tokens = tuple(incrementer(metrics.PROMPT_TOKENS.labels(*labels, kind)) for kind in kinds)
        self.completion_tokens = tuple(incrementer(metrics.COMPLETION_TOKENS.labels(*labels, kind)) for kind in kinds)
        self.total_tokens = tuple(incrementer(metrics.TOTAL_TOKENS.labels(*labels, kind)) for kind in kinds)
        self.duration = {s: Observer(metrics.REQUEST_DURATION.labels(*labels, s)) for s in ("false", "true")}
        self.ttft = Observer(metrics.TIME_TO_FIRST_TOKEN.labels(*labels))
        self.upstream = Observer(metrics.UPSTREAM_DURATION.labels(*labels))
        self.overhead = Observer(metrics.OVERHEAD.labels(*labels))
        self.in_flight = incrementer(metrics.IN_FLIGHT.labels(*labels))  # +1 when routed, -1 when answered
        self._requests: dict[tuple[str, int], Callable[[float], None]] = {}
        self._upstream_errors: dict[str, Callable[[float], None]] = {}

    def requests(self, stream: str, outcome: int) -> Callable[[float], None]:
        """The requests counter's increment for one outcome."""
        inc = self._requests.get((stream, outcome))
        if inc is None:
            inc = self._requests[(stream, outcome)] = incrementer(
                metrics.REQUESTS.labels(self.model, self.provider, stream, str(outcome))
            )
        return inc

    def upstream_error(self, kind: str) -> Callable[[float], None]:
        inc = self._upstream_errors.get(kind)
        if inc is None:
            inc = self._upstream_errors[kind] = incrementer(metrics.UPSTREAM_ERRORS.labels(self.provider, kind))
        return inc


UNROUTED = RouteMetrics(metrics.UNKNOWN_MODEL, metrics.NO_PROVIDER)


def upstream_error_kind(error: GatewayError) -> str:
    if isinstance(error, UpstreamError):
        return f"http_{error.http_status}"
    if isinstance(error, UpstreamTimeoutError):
        return "timeout"
    if isinstance(error, UpstreamUnavailableError):
        return "unavailable"
    if isinstance(error, BadGatewayError):
        return "bad_response"
    return "other"


class RequestRecord:
    """Timings, usage and outcome of one chat request; logged and counted once by `finish`."""

    __slots__ = (
        "attempts",
        "call",
        "chunks",
        "client_wait",
        "cost",
        "deployment",
        "error",
        "first_chunk",
        "in_upstream",
        "kind",
        "meter",
        "metrics",
        "model",
        "request_id",
        "served_by",
        "started",
        "stream",
        "tenant",
        "upstream_wait",
        "usage",
        "usage_estimated",
    )

    def __init__(
        self, call: CallInfo, model: str, stream: bool, kind: str = "chat completion", meter: SpendMeter | None = None
    ) -> None:
        self.started = time.perf_counter()
        self.call = call
        self.request_id = call.get("x-request-id") or new_request_id()
        self.model = model
        self.stream = stream
        self.metrics = UNROUTED
        self.usage: chat_pb2.Usage | None = None
        # True when the upstream reported no usage and `usage` was counted by the gateway (usage_estimate).
        self.usage_estimated = False
        self.kind = kind  # "chat completion" or "embedding": the access log line's message
        self.meter = meter  # prices, cost metrics and the usage ledger (service/spend)
        self.cost = 0  # micro-dollars, set by the meter as the request ends (0: no usage, or unpriced)
        self.error: GatewayError | None = None
        self.chunks = 0
        self.upstream_wait = 0.0  # seconds awaiting the provider
        self.client_wait = 0.0  # seconds suspended while the caller consumed a chunk
        self.first_chunk = 0.0
        self.in_upstream = False
        self.attempts = 0
        self.served_by = ""  # the configured model that answered: the one asked for, or a fallback
        self.deployment = ""
        self.tenant: Tenant | None = None  # the gateway API key's use, when tenancy applies (service/tenancy)

    def upstream_failed(self, error: GatewayError) -> None:
        """Count one failed upstream attempt against the deployment's provider."""
        self.metrics.upstream_error(upstream_error_kind(error))(1.0)
        self.in_upstream = False

    def failed(self, exc: BaseException) -> BaseException:
        """The error to raise for `exc`: gateway errors as they are, the rest mapped once, here."""
        if isinstance(exc, GatewayError):
            self.error = exc
        elif isinstance(exc, TimeoutError):
            self.error = UpstreamTimeoutError("The request timed out before the provider answered.")
        elif isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
            self.error = ClientClosedError("The client closed the request.")
            self.in_upstream = False
            cycles.abandoned()  # its traceback's frames hold the request's buffers in cycles: collected soon
            return exc  # cancellation keeps propagating as itself
        else:
            log.error("unexpected error", exc_info=True, request_id=self.request_id)
            self.error = InternalError("The gateway failed to handle the request.")
            self.in_upstream = False
        return self.error

    def finish(self) -> None:
        elapsed = time.perf_counter() - self.started
        route = self.metrics
        status = self.error.http_status if self.error else 200
        stream = "true" if self.stream else "false"
        # The outcome's increment from the route's cache; requests() makes it the first time only.
        (route._requests.get((stream, status)) or route.requests(stream, status))(1.0)
        if route is not UNROUTED:
            route.duration[stream].observe(elapsed)
            route.upstream.observe(self.upstream_wait)
            overhead = elapsed - self.upstream_wait - self.client_wait
            route.overhead.observe(overhead if overhead > 0.0 else 0.0)  # a test, not a call of max()
            if self.first_chunk:
                route.ttft.observe(self.first_chunk - self.started)
            if self.error is not None and self.in_upstream:  # the deadline ran out while waiting upstream
                route.upstream_error(upstream_error_kind(self.error))(1.0)
        usage = self.usage
        if usage is not None:
            estimated = self.usage_estimated
            route.prompt_tokens[estimated](usage.prompt_tokens)
            route.completion_tokens[estimated](usage.completion_tokens)
            route.total_tokens[estimated](usage.total_tokens)
        if self.meter is not None:
            self.meter.settle(self, status, elapsed)  # cost, and the ledger's record
        tenant = self.tenant
        if tenant is not None:
            # Per-key counts; settles the reservations (tokens, and the budgets' cost) and frees the slot, once.
            tenant.finish(status, usage, self.cost)
        if not log.enabled(logging.INFO):  # the access line is off: do not build it
            return
        attrs: dict[str, Any] = {
            "request_id": self.request_id,
            "model": self.model,
            "provider": route.provider,
            "stream": self.stream,
            "status": status,
            "latency_ms": round(elapsed * 1000, 3),
            "upstream_ms": round(self.upstream_wait * 1000, 3),
            "pid": _PID,
        }
        if usage is not None:
            attrs["prompt_tokens"] = usage.prompt_tokens
            attrs["completion_tokens"] = usage.completion_tokens
            attrs["total_tokens"] = usage.total_tokens
            if self.usage_estimated:
                attrs["usage_estimated"] = True
        if self.stream:
            attrs["chunks"] = self.chunks
        if self.attempts:
            attrs["attempts"] = self.attempts
            attrs["deployment"] = self.deployment
            if self.served_by != self.model:
                attrs["served_by"] = self.served_by
        if tenant is not None and tenant.name:
            attrs["key"] = tenant.name
            if tenant.metadata:
                attrs["key_metadata"] = tenant.metadata
        if self.error is not None:
            attrs["error_type"] = self.error.type
            attrs["error"] = self.error.message
        log.info(self.kind, **attrs)
