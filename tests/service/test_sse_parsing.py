"""Reading an upstream's Server-Sent Events however the bytes are cut into network reads."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from service.providers.openai_compat import sse_events

STREAM = (
    b": keep-alive comment\n\n"
    b'data: {"a": 1}\n\n'
    b'event: message\nid: 7\ndata: {"b":\n'
    b"data: 2}\n\n"
    b'data:{"c": 3}\r\n\r\n'
    b"retry: 100\n\n"
    b"data: [DONE]\n\n"
)
EXPECTED = [b'{"a": 1}', b'{"b":\n2}', b'{"c": 3}', b"[DONE]"]


def _read(blocks: list[bytes]) -> list[bytes]:
    async def source() -> AsyncIterator[bytes]:
        for block in blocks:
            yield block

    async def collect() -> list[bytes]:
        return [event async for event in sse_events(source())]

    return asyncio.run(collect())


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 16, 1000])
def test_events_survive_any_cut(size: int) -> None:
    assert _read([STREAM[i : i + size] for i in range(0, len(STREAM), size)]) == EXPECTED


def test_a_last_event_without_its_blank_line() -> None:
    assert _read([b'data: {"a": 1}\n\ndata: {"z": 0}']) == [b'{"a": 1}', b'{"z": 0}']
