"""OpenAI's Server-Sent Events framing.

Each chunk is one event, `data: <compact JSON>\\n\\n`, and the stream ends with `data: [DONE]\\n\\n`.
A JSON document from orjson never holds a raw newline, so one `data:` line per event is always enough.
A failure after the first event is an event of its own, `data: {"error": {...}}\\n\\n`, followed by
`data: [DONE]\\n\\n`, which OpenAI's SDKs raise as an APIError instead of ending silently.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import orjson

from gateway.errors import GatewayError

CONTENT_TYPE = "text/event-stream"
# no-cache and x-accel-buffering stop proxies (nginx) from holding chunks back.
HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
DONE = b"data: [DONE]\n\n"

_PREFIX = b"data: "
_END = b"\n\n"
_BETWEEN = _END + _PREFIX


def event(data: bytes) -> bytes:
    return _PREFIX + data + _END


def events(messages: Sequence[Any], encode: Callable[[Any], bytes]) -> bytes:
    """Several messages as the bytes of one write, built with one join."""
    return _PREFIX + _BETWEEN.join(map(encode, messages)) + _END


def error_event(error: GatewayError) -> bytes:
    body = error.body()
    # An upstream's own error body may be pretty-printed; re-dump it compactly so it stays one line.
    return event(orjson.dumps(orjson.loads(body)) if b"\n" in body else body)
