"""A fake Anthropic Messages API: builders for its messages, errors and event streams in the real
shape (as the official SDK's recorded streams have them), and a handler for the loopback fake
upstream (tests/fakes/upstream.py) that replays an event stream cut into network writes at any
byte offsets.

    upstream.handler = sse(stream_of([text("Hi"), tool_use("toolu_1", "f", {"a": 1})], "tool_use"))
    upstream.handler = sse(events, cuts=range(0, 10_000, 7))   # a write every 7 bytes
    upstream.reply(529, error("overloaded_error", "Overloaded"))
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterable
from typing import Any

import orjson
from aiohttp import web

from .upstream import Handler

Event = tuple[str, dict[str, Any]]

MODEL = "claude-sonnet-4-5-20250929"
USAGE = {"input_tokens": 21, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0, "output_tokens": 9}


def text(value: str) -> dict[str, Any]:
    return {"type": "text", "text": value}


def tool_use(call_id: str, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {"type": "tool_use", "id": call_id, "name": name, "input": arguments}


def thinking(value: str, signature: str = "sig-abc") -> dict[str, Any]:
    return {"type": "thinking", "thinking": value, "signature": signature}


def message(
    content: list[dict[str, Any]] | None = None,
    stop_reason: str | None = "end_turn",
    usage: dict[str, Any] | None = None,
    model: str = MODEL,
) -> dict[str, Any]:
    return {
        "id": "msg_01FakeFakeFake",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [text("Hello!")] if content is None else content,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": dict(USAGE) if usage is None else usage,
    }


def error(kind: str, text_: str, **details: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"type": "error", "error": {"type": kind, "message": text_}, "request_id": "req_011Fake"}
    if details:
        body["error"]["details"] = details
    return body


def _pieces(value: str, size: int) -> list[str]:
    return [value[i : i + size] for i in range(0, len(value), size)] or [""]


def stream_of(
    blocks: list[dict[str, Any]],
    stop_reason: str = "end_turn",
    start_usage: dict[str, Any] | None = None,
    delta_usage: dict[str, Any] | None = None,
    piece: int = 4,
    model: str = MODEL,
) -> list[Event]:
    """The events Anthropic streams for a message of these blocks: message_start with its usage
    (output_tokens 1), each block started, its text or JSON in pieces of `piece` characters (a tool's
    JSON after an empty first partial_json), stopped; a ping after the first block start;
    message_delta with the stop reason and cumulative usage; message_stop."""
    start = {"input_tokens": 21, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0, "output_tokens": 1}
    events: list[Event] = [
        (
            "message_start",
            {
                "type": "message_start",
                "message": {
                    **message([], None, start if start_usage is None else start_usage, model),
                    "content": [],
                },
            },
        )
    ]
    for index, block in enumerate(blocks):
        kind = block["type"]
        if kind == "text":
            opening: dict[str, Any] = text("")
            deltas = [{"type": "text_delta", "text": p} for p in _pieces(block["text"], piece)]
        elif kind == "thinking":
            opening = {"type": "thinking", "thinking": "", "signature": ""}
            deltas = [{"type": "thinking_delta", "thinking": p} for p in _pieces(block["thinking"], piece)]
            deltas.append({"type": "signature_delta", "signature": block["signature"]})
        elif kind == "tool_use":
            opening = {**block, "input": {}}
            arguments = orjson.dumps(block["input"]).decode() if block["input"] else ""
            deltas = [{"type": "input_json_delta", "partial_json": ""}]
            if arguments:
                deltas += [{"type": "input_json_delta", "partial_json": p} for p in _pieces(arguments, piece)]
        elif kind == "redacted_thinking":
            opening, deltas = block, []
        else:
            raise ValueError(kind)
        events.append(
            ("content_block_start", {"type": "content_block_start", "index": index, "content_block": opening})
        )
        if index == 0:
            events.append(("ping", {"type": "ping"}))
        events += [("content_block_delta", {"type": "content_block_delta", "index": index, "delta": d}) for d in deltas]
        events.append(("content_block_stop", {"type": "content_block_stop", "index": index}))
    events.append(
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                "usage": {"output_tokens": 9} if delta_usage is None else delta_usage,
            },
        )
    )
    events.append(("message_stop", {"type": "message_stop"}))
    return events


def encode(events: Iterable[Event]) -> bytes:
    return b"".join(b"event: %s\ndata: %s\n\n" % (name.encode(), orjson.dumps(data)) for name, data in events)


def sse(
    events: list[Event] | bytes,
    cuts: Iterable[int] | None = None,
    pause: float = 0.002,
    end: bool = True,
) -> Handler:
    """A 200 text/event-stream of these events: in one write, or written in pieces cut at the byte
    offsets `cuts` with a short pause between them, so the gateway reads them apart. `end: False`
    drops the connection after the last byte instead of ending the body."""
    payload = events if isinstance(events, bytes) else encode(events)
    offsets = sorted({0, *(c for c in (cuts or ()) if 0 < c < len(payload)), len(payload)})

    async def handle(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream", "request-id": "req_011Fake"})
        await response.prepare(request)
        for start, stop in itertools.pairwise(offsets):
            await response.write(payload[start:stop])
            if pause and stop < len(payload):
                await asyncio.sleep(pause)
        if not end:
            assert request.transport is not None
            request.transport.close()
        return response

    return handle
