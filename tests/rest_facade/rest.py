"""A small stdlib HTTP client for the tests: exact bytes in, status, headers and bytes out."""

from __future__ import annotations

import http.client
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import orjson

DOUBLE_KEYS = frozenset({"temperature", "top_p", "presence_penalty", "frequency_penalty"})


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return orjson.loads(self.body)

    @property
    def error(self) -> dict[str, Any]:
        value = self.json
        assert set(value) == {"error"}, value
        assert {"message", "type", "param", "code"} <= set(value["error"]), value
        return value["error"]  # type: ignore[no-any-return]


def _connection(base_url: str, timeout: float) -> http.client.HTTPConnection:
    parts = urlsplit(base_url)
    return http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=timeout)


def _encode(body: Any) -> bytes | None:
    if body is None or isinstance(body, bytes):
        return body
    return orjson.dumps(body)


def call(
    base_url: str,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30,
) -> Reply:
    conn = _connection(base_url, timeout)
    try:
        conn.request(method, path, body=_encode(body), headers=headers or {})
        response = conn.getresponse()
        data = response.read()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, data)
    finally:
        conn.close()


def post(base_url: str, body: Any, headers: dict[str, str] | None = None, timeout: float = 30) -> Reply:
    return call(
        base_url, "POST", "/v1/chat/completions", body, {"content-type": "application/json", **(headers or {})}, timeout
    )


def sse_events(body: bytes) -> list[bytes]:
    """The data of each event, checking OpenAI's exact framing: `data: <payload>\\n\\n`, nothing else."""
    assert body.endswith(b"\n\n"), body[-50:]
    events = body[:-2].split(b"\n\n")
    for event in events:
        assert event.startswith(b"data: ") and b"\n" not in event, event
    return [event[6:] for event in events]


def sse_json(body: bytes) -> list[Any]:
    events = sse_events(body)
    assert events[-1] == b"[DONE]"
    assert b"[DONE]" not in events[:-1]
    return [orjson.loads(e) for e in events[:-1]]


@contextmanager
def open_request(
    base_url: str, body: Any, headers: dict[str, str] | None = None
) -> Iterator[http.client.HTTPConnection]:
    """A chat request sent and left open (call getresponse() to read); leaving the block closes the socket."""
    conn = _connection(base_url, 30)
    try:
        conn.request(
            "POST",
            "/v1/chat/completions",
            body=_encode(body),
            headers={"content-type": "application/json", **(headers or {})},
        )
        yield conn
    finally:
        conn.close()


def same_json(sent: Any, got: Any, path: str = "$") -> None:
    """Semantic JSON equality that, unlike ==, tells 1 from 1.0 and 1 from true.

    Numbers under the proto's double-typed keys may come back as floats (0 -> 0.0): JSON numbers, same value.
    """
    if isinstance(sent, dict):
        assert isinstance(got, dict), f"{path}: {got!r} is not an object"
        assert sent.keys() == got.keys(), f"{path}: keys {sorted(sent)} != {sorted(got)}"
        for key in sent:
            if key in DOUBLE_KEYS and type(sent[key]) in (int, float) and type(got[key]) in (int, float):
                assert sent[key] == got[key], f"{path}.{key}: {sent[key]!r} != {got[key]!r}"
            else:
                same_json(sent[key], got[key], f"{path}.{key}")
    elif isinstance(sent, list):
        assert isinstance(got, list) and len(sent) == len(got), f"{path}: {got!r} != {sent!r}"
        for i, (a, b) in enumerate(zip(sent, got, strict=True)):
            same_json(a, b, f"{path}[{i}]")
    else:
        assert type(sent) is type(got) and sent == got, f"{path}: {got!r} != {sent!r}"
