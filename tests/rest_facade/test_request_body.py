"""Request bodies however they arrive on the socket: whole with the headers (the facade's own read),
late, in pieces, chunked, after a 100 Continue, too large, or followed by the next pipelined request."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

import orjson

from tests.fakes.upstream import FakeUpstream

from .conftest import MAX_BODY, Stack

BODY = orjson.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})


def head(length: int | None = None, *extra: str) -> bytes:
    lines = ["POST /v1/chat/completions HTTP/1.1", "host: x", "content-type: application/json", *extra]
    if length is not None:
        lines.append(f"content-length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@contextmanager
def connection(stack: Stack) -> Iterator[socket.socket]:
    parts = urlsplit(stack.base_url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        yield sock


def read_response(sock: socket.socket, buffered: bytearray) -> tuple[int, bytes]:
    """One response's status and body (Content-Length framed, as the facade answers a unary call)."""
    while b"\r\n\r\n" not in buffered:
        buffered += sock.recv(65536)
    end = buffered.index(b"\r\n\r\n")
    lines = bytes(buffered[:end]).decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    length = int(headers["content-length"])
    while len(buffered) < end + 4 + length:
        buffered += sock.recv(65536)
    body = bytes(buffered[end + 4 : end + 4 + length])
    del buffered[: end + 4 + length]
    return int(lines[0].split()[1]), body


def answered(status: int, body: bytes) -> bool:
    return status == 200 and orjson.loads(body)["object"] == "chat.completion"


def test_a_body_with_its_headers(stack: Stack, fake: FakeUpstream) -> None:
    with connection(stack) as sock:
        sock.sendall(head(len(BODY)) + BODY)
        assert answered(*read_response(sock, bytearray()))
    assert orjson.loads(fake.received[-1].body)["messages"][0]["content"] == "hi"


def test_a_body_arriving_late_and_in_pieces(stack: Stack) -> None:
    with connection(stack) as sock:
        sock.sendall(head(len(BODY)))
        time.sleep(0.1)
        sock.sendall(BODY[:10])
        time.sleep(0.1)
        sock.sendall(BODY[10:])
        assert answered(*read_response(sock, bytearray()))


def test_a_chunked_body(stack: Stack) -> None:
    chunked = b"".join(b"%x\r\n%b\r\n" % (len(part), part) for part in (BODY[:7], BODY[7:])) + b"0\r\n\r\n"
    with connection(stack) as sock:
        sock.sendall(head(None, "transfer-encoding: chunked") + chunked)
        assert answered(*read_response(sock, bytearray()))


def test_a_body_after_100_continue(stack: Stack) -> None:
    with connection(stack) as sock:
        sock.sendall(head(len(BODY), "expect: 100-continue"))
        buffered = bytearray()
        while b"\r\n\r\n" not in buffered:
            buffered += sock.recv(65536)
        assert buffered.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"), buffered
        del buffered[: len(b"HTTP/1.1 100 Continue\r\n\r\n")]
        sock.sendall(BODY)
        assert answered(*read_response(sock, buffered))


def test_pipelined_requests_are_each_read_to_their_own_length(stack: Stack, fake: FakeUpstream) -> None:
    second = orjson.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "second"}]})
    with connection(stack) as sock:
        sock.sendall(head(len(BODY)) + BODY + head(len(second)) + second)
        buffered = bytearray()
        assert answered(*read_response(sock, buffered))
        assert answered(*read_response(sock, buffered))
    assert [orjson.loads(r.body)["messages"][0]["content"] for r in fake.received[-2:]] == ["hi", "second"]


def test_a_body_over_the_limit_with_its_headers_is_413(stack: Stack) -> None:
    big = b'{"model": "gpt-4o", "messages": [], "user": "' + b"x" * MAX_BODY + b'"}'
    with connection(stack) as sock:
        sock.sendall(head(len(big)) + big)
        status, body = read_response(sock, bytearray())
    assert status == 413 and orjson.loads(body)["error"]["type"] == "invalid_request_error"
    assert stack.alive()


def test_an_empty_body_is_400(stack: Stack) -> None:
    with connection(stack) as sock:
        sock.sendall(head(0))
        status, body = read_response(sock, bytearray())
    assert status == 400 and "empty" in orjson.loads(body)["error"]["message"]
