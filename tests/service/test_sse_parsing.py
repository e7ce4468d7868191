"""Reading an upstream's Server-Sent Events however the bytes are cut into network reads."""

from __future__ import annotations

import pytest

from service.providers.http_provider import event_data, sse_split

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


def _batches(blocks: list[bytes]) -> list[list[bytes]]:
    """What HTTPProvider._events does with the body's reads: one batch per read that completed events."""
    out: list[list[bytes]] = []
    buffer = b""
    for block in blocks:
        batch, buffer = sse_split(buffer, block)
        if batch:
            out.append(batch)
    last = event_data(buffer)
    if last is not None:
        out.append([last])
    return out


def _read(blocks: list[bytes]) -> list[bytes]:
    return [event for batch in _batches(blocks) for event in batch]


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 16, 1000])
def test_events_survive_any_cut(size: int) -> None:
    assert _read([STREAM[i : i + size] for i in range(0, len(STREAM), size)]) == EXPECTED


def test_a_last_event_without_its_blank_line() -> None:
    assert _read([b'data: {"a": 1}\n\ndata: {"z": 0}']) == [b'{"a": 1}', b'{"z": 0}']


def test_events_that_arrive_in_one_read_come_as_one_batch() -> None:
    """One batch per network read: the gateway then pays one step per read, not one per token."""
    assert _batches([STREAM]) == [EXPECTED]
    blocks = [b'data: {"a": 1}\n\ndata: {"b"', b": 2}\n\n", b"data: [DO", b"NE]\n\n"]
    assert _batches(blocks) == [[b'{"a": 1}'], [b'{"b": 2}'], [b"[DONE]"]]


def test_no_empty_batches() -> None:
    assert _batches([b": ping\n\n", b"data: 1", b"\n\n", b"\n\n"]) == [[b"1"]]
