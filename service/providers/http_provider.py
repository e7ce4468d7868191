"""What every provider that calls an HTTP upstream shares: the keep-alive pool (created on first use
inside the serving event loop), sending a request with its pre-rendered head, the deployment's
deadlines, and mapping transport failures to the gateway's errors.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Mapping
from typing import Any, TypeVar

import orjson

from gateway.call import CallInfo
from gateway.config import ProviderConfig, Timeouts
from gateway.errors import BadGatewayError, GatewayError, UpstreamTimeoutError, UpstreamUnavailableError

from ..deadline import Deadline
from . import http1

# Client metadata that may travel upstream; never `authorization`, which is the gateway's own.
_FORWARDED_METADATA = ("traceparent", "tracestate")
_PASSED_BACK_HEADERS = ("retry-after", "retry-after-ms")


class HTTPProvider:
    """The base of the HTTP providers: one pool per provider, requests sent as head bytes plus a body."""

    def __init__(self, config: ProviderConfig, url: str) -> None:
        self.name = config.name
        self.type = config.type
        self.url = url
        self._config = config
        self._pool: http1.Pool | None = None

    def _client(self) -> http1.Pool:
        if self._pool is None:
            config = self._config
            self._pool = http1.Pool(
                self.url,
                max_connections=config.max_connections,
                connect_timeout=config.connect_timeout,
                read_timeout=config.read_timeout,
            )
        return self._pool

    async def _post(
        self, head: bytes, body: dict[str, Any], call: CallInfo, timeouts: Timeouts, first: Deadline | None
    ) -> http1.Response:
        """Send the request; return once the response head is in, by the `first` deadline at the latest."""
        extra = b"".join(
            f"{key}: {value}\r\n".encode("latin-1")
            for key, value in call.metadata
            if key in _FORWARDED_METADATA and http1.safe_header(key, value)
        )
        return await within(
            first, self._client().request(http1.with_body(head, orjson.dumps(body), extra), timeouts.connect)
        )

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None


def deadlines(timeouts: Timeouts) -> tuple[Deadline | None, Deadline | None]:
    """The deployment's deadlines for the first byte (or chunk) and for the whole answer, if it has any."""
    if not timeouts.total and not timeouts.first_token:
        return None, None
    loop = asyncio.get_running_loop()
    start = loop.time()
    total = Deadline(start + timeouts.total, loop) if timeouts.total else None
    if not timeouts.first_token:
        return total, total
    first_at = start + timeouts.first_token
    return Deadline(first_at if total is None else min(first_at, total.when), loop), total


T = TypeVar("T")


async def within(deadline: Deadline | None, step: Awaitable[T]) -> T:
    """`step` awaited inside the deployment's deadline, when it has one."""
    if deadline is None:
        return await step
    async with deadline:
        return await step


def passed_back(headers: Mapping[str, str]) -> dict[str, str]:
    """The upstream response headers worth handing to the client (retry-after, x-ratelimit-*)."""
    return {
        key.lower(): value
        for key, value in headers.items()
        if key.lower() in _PASSED_BACK_HEADERS or key.lower().startswith("x-ratelimit-")
    }


def transport_error(exc: BaseException, provider: str) -> GatewayError:
    """Map an HTTP client or asyncio failure to the gateway's error, once, at the boundary."""
    if isinstance(exc, (TimeoutError, http1.ReadTimeout, http1.ConnectTimeout)):
        return UpstreamTimeoutError(f"Provider {provider} timed out.")
    if isinstance(exc, http1.ConnectError):
        return UpstreamUnavailableError(f"Provider {provider} is unreachable: {exc}")
    if isinstance(exc, http1.Disconnected):
        return UpstreamUnavailableError(f"Provider {provider} closed the connection mid-response.")
    if isinstance(exc, http1.HTTPClientError):
        return BadGatewayError(f"Provider {provider} failed: {exc}")
    return BadGatewayError(f"Provider {provider} failed: {type(exc).__name__}")
