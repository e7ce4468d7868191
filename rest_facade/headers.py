"""HTTP request headers -> the `CallInfo` a backend call carries.

Metadata is an explicit allow-list, lower-case keys, values passed as sent:

    authorization   the client's credential, for the gateway's own auth; the service never sends it upstream
    api-key         the same, as Azure's SDKs send it
    x-request-id    accepted when sane (printable ASCII, at most 128 characters), else generated; echoed back
    traceparent     W3C trace context, forwarded so traces continue through the gateway
    tracestate

Deadline: a client may shorten the request's deadline with either header

    x-request-timeout: 12.5      seconds, a decimal number
    grpc-timeout: 12500m         gRPC's format, an integer and a unit: H M S m u n

The deadline is the client's value capped at `server.request_timeout`, or that configured value when
the client sends none. It becomes the gRPC deadline (channel backend) or the service's asyncio
timeout (in-process backend); a request that runs past it fails with 504.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from gateway.call import CallInfo, new_request_id
from gateway.errors import InvalidRequestError

REQUEST_ID = "x-request-id"
FORWARDED = ("authorization", "api-key", "traceparent", "tracestate")
TIMEOUT_HEADERS = ("x-request-timeout", "grpc-timeout")

_MAX_REQUEST_ID = 128
_GRPC_TIMEOUT = re.compile(r"([0-9]{1,8})([HMSmun])")
_GRPC_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
_ASKED = frozenset((*FORWARDED, *TIMEOUT_HEADERS))


def request_id(headers: Mapping[str, str]) -> str:
    sent = headers.get(REQUEST_ID)
    if sent and len(sent) <= _MAX_REQUEST_ID and sent.isprintable() and sent.isascii():
        return sent
    return new_request_id()


def call_info(headers: Mapping[str, str], rid: str, max_timeout: float) -> CallInfo:
    """Metadata from the allow-list and the deadline; raises InvalidRequestError for a bad timeout header.
    `headers` has lower-case names, as Sanic's parser leaves them."""
    metadata = [(REQUEST_ID, rid)]
    timeout = max_timeout
    # One C pass over the names sent, then a lookup per name found: six lookups of a multidict cost
    # about 10,000 instructions, and most requests carry none of these but authorization.
    sent = _ASKED.intersection(headers)
    if sent:
        for key in FORWARDED:
            if key in sent:
                value = headers.get(key)
                # gRPC metadata values must be printable ASCII; anything else cannot travel and is dropped.
                if value and value.isascii() and value.isprintable():
                    metadata.append((key, value))
        for key in TIMEOUT_HEADERS:
            if key in sent:
                value = headers.get(key)
                if value:
                    timeout = min(timeout, _parse_timeout(key, value))
                    break
    return CallInfo(tuple(metadata), timeout)


def _parse_timeout(key: str, value: str) -> float:
    seconds: float | None = None
    if key == "grpc-timeout":
        match = _GRPC_TIMEOUT.fullmatch(value.strip())
        if match:
            seconds = int(match.group(1)) * _GRPC_UNITS[match.group(2)]
    else:
        try:
            seconds = float(value)
        except ValueError:
            seconds = None
    if seconds is None or not math.isfinite(seconds) or seconds <= 0:
        raise InvalidRequestError(
            f"Invalid {key} header {value!r}: expected "
            + ("an integer and a unit (H, M, S, m, u, n)" if key == "grpc-timeout" else "a positive number of seconds")
            + "."
        )
    return seconds
