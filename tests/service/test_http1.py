"""The gateway's upstream HTTP/1.1 client against real loopback servers that answer byte for byte:
keep-alive reuse, every way a body can end, the ways an upstream breaks an exchange, the connection
cap, cancellation, and TLS."""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest
import trustme

from service.providers import http1
from tests.fakes.upstream import completion

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
OK = b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{"ok":true}'
_BODY = orjson.dumps(completion())
# A chat completion, for a gateway process in front of these servers.
COMPLETION = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(_BODY), _BODY)


class Server:
    """A loopback TCP server running `script` per connection; counts connections and their peaks."""

    def __init__(self, script: Script, tls: ssl.SSLContext | None = None) -> None:
        self.script = script
        self.tls = tls
        self.connections = 0
        self.open = 0
        self.peak = 0
        self.closed_by_client = asyncio.Event()
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Server:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        self.peak = max(self.peak, self.open)
        try:
            await self.script(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.open -= 1
            writer.close()

    def url(self, scheme: str = "http", host: str = "127.0.0.1") -> str:
        return f"{scheme}://{host}:{self.port}/v1/chat/completions"


class ThreadedServer:
    """A Server on an event loop in a thread of its own, for a gateway process to call."""

    def __init__(self, script: Script, tls: ssl.SSLContext | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server = Server(script, tls)
        self.port = 0

    def __enter__(self) -> ThreadedServer:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.__aenter__(), self.loop).result(10)
        self.port = self.server.port
        return self

    async def _stop(self) -> None:
        await self.server.__aexit__()
        for task in asyncio.all_tasks():  # connections still open: their scripts end here
            if task is not asyncio.current_task():
                task.cancel()

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """One request: its head, then its Content-Length of body."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    return head + await reader.readexactly(length)


def answering(*replies: bytes, then_close: bool = False) -> Script:
    """Each request on a connection gets the next reply (the last one repeats)."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for i in range(1000):
            try:
                await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            writer.write(replies[min(i, len(replies) - 1)])
            await writer.drain()
            if then_close:
                return

    return script


def request_bytes(pool: http1.Pool, body: bytes = b"{}", extra: bytes = b"") -> bytes:
    url = f"http://{pool.authority}/v1/chat/completions"
    head = http1.render_head("POST", url, {"content-type": "application/json"})
    return http1.with_body(head, body, extra)


async def post(pool: http1.Pool) -> tuple[int, bytes]:
    response = await pool.request(request_bytes(pool))
    try:
        return response.status, await response.read()
    finally:
        response.release()


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_sequential_requests_reuse_one_connection() -> None:
    async def main() -> None:
        async with Server(answering(OK)) as server:
            pool = http1.Pool(server.url())
            assert [await post(pool) for _ in range(5)] == [(200, b'{"ok":true}')] * 5
            assert server.connections == 1
            await pool.close()

    run(main())


def test_the_request_on_the_wire_is_the_head_plus_the_body() -> None:
    seen: list[bytes] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await read_request(reader))
        writer.write(OK)

    async def main() -> None:
        async with Server(script) as server:
            pool = http1.Pool(server.url())
            response = await pool.request(request_bytes(pool, b'{"a":1}', b"traceparent: 00-ab-cd-01\r\n"))
            await response.read()
            response.release()
            await pool.close()
            assert seen == [
                b"POST /v1/chat/completions HTTP/1.1\r\n"
                + f"host: 127.0.0.1:{server.port}\r\n".encode()
                + b"content-type: application/json\r\ntraceparent: 00-ab-cd-01\r\ncontent-length: 7\r\n\r\n"
                + b'{"a":1}'
            ]

    run(main())


def test_connection_close_is_honoured() -> None:
    closing = OK.replace(b"content-length", b"connection: close\r\ncontent-length")

    async def main() -> None:
        async with Server(answering(closing, then_close=True)) as server:
            pool = http1.Pool(server.url())
            assert [await post(pool) for _ in range(3)] == [(200, b'{"ok":true}')] * 3
            assert server.connections == 3

    run(main())


def test_chunked_body_arrives_block_by_block() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        for piece in (b"data: 1\n\n", b"data: 2\n\n", b"data: [DONE]\n\n"):
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
            await asyncio.sleep(0.05)
        writer.write(b"0\r\n\r\n")
        await read_request(reader)  # the connection is kept: a second request comes on it
        writer.write(OK)

    async def main() -> None:
        async with Server(script) as server:
            pool = http1.Pool(server.url())
            response = await pool.request(request_bytes(pool))
            assert response.headers["content-type"] == "text/event-stream"
            blocks = [block async for block in response.blocks()]
            response.release()
            assert blocks == [b"data: 1\n\n", b"data: 2\n\n", b"data: [DONE]\n\n"]
            assert await post(pool) == (200, b'{"ok":true}')
            assert server.connections == 1

    run(main())


def test_a_body_without_length_ends_with_the_connection() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n{"until":')
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b'"eof"}')

    async def main() -> None:
        async with Server(script) as server:
            pool = http1.Pool(server.url())
            assert await post(pool) == (200, b'{"until":"eof"}')
            assert await post(pool) == (200, b'{"until":"eof"}')
            assert server.connections == 2

    run(main())


def test_a_body_cut_short_is_a_disconnect() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n" + b"x" * 50)

    async def main() -> None:
        async with Server(script) as server:
            pool = http1.Pool(server.url())
            with pytest.raises(http1.Disconnected):
                await post(pool)
            assert not pool._open  # the slot is free again

    run(main())


def test_a_connection_closed_before_the_head_is_a_disconnect() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)

    async def main() -> None:
        async with Server(script) as server:
            with pytest.raises(http1.Disconnected):
                await post(http1.Pool(server.url()))

    run(main())


def test_silence_is_a_read_timeout_and_a_trickle_is_not() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\n")
        for byte in b"abcdef":  # one byte every 0.1 s: 0.6 s in all, never 0.3 s of silence
            await writer.drain()
            await asyncio.sleep(0.1)
            writer.write(bytes([byte]))
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nab")
        await asyncio.sleep(5)

    async def main() -> None:
        async with Server(script) as server:
            pool = http1.Pool(server.url(), read_timeout=0.3)
            assert await post(pool) == (200, b"abcdef")
            started = asyncio.get_running_loop().time()
            with pytest.raises(http1.ReadTimeout):
                await post(pool)
            assert 0.25 < asyncio.get_running_loop().time() - started < 3

    run(main())


def test_refused_is_a_connect_error() -> None:
    async def main() -> None:
        async with Server(answering(OK)) as server:
            url = server.url()
        with pytest.raises(http1.ConnectError, match="cannot connect"):
            await post(http1.Pool(url))

    run(main())


def test_garbage_is_a_protocol_error() -> None:
    async def main() -> None:
        async with Server(answering(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")) as server:
            with pytest.raises(http1.ProtocolError):
                await post(http1.Pool(server.url()))

    run(main())


@pytest.mark.parametrize("shape", ["one endless header", "endless headers", "endless interim responses"])
def test_an_endless_response_head_is_cut_off(shape: str) -> None:
    """llhttp has no limit on a head: the client stops at MAX_HEAD_BYTES and closes the connection."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        if shape == "one endless header":
            writer.write(b"HTTP/1.1 200 OK\r\nx-filler: ")
            piece = b"a" * 4096
        elif shape == "endless headers":
            writer.write(b"HTTP/1.1 200 OK\r\n")
            piece = b"x-filler: " + b"a" * 100 + b"\r\n"
        else:
            piece = b"HTTP/1.1 103 Early Hints\r\nlink: </x>\r\n\r\n"
        try:
            for _ in range(2 * http1.MAX_HEAD_BYTES // len(piece) + 100):
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0)
            writer.write(b"\r\n\r\n" if shape != "endless interim responses" else OK)
            await writer.drain()
            if await reader.read(1) == b"":
                server.closed_by_client.set()
        except ConnectionError:  # the client hung up while the head was still coming
            server.closed_by_client.set()

    async def main() -> None:
        nonlocal server
        async with Server(script) as server:
            with pytest.raises(http1.ProtocolError, match="head is larger"):
                await asyncio.wait_for(post(http1.Pool(server.url())), 10)  # without the cap it would hang
            await asyncio.wait_for(server.closed_by_client.wait(), 5)

    server: Server
    run(main())


def test_a_large_head_within_the_limit_is_read() -> None:
    big = b"".join(b"x-h%d: %s\r\n" % (i, b"v" * 200) for i in range(100))  # about 21 KB
    reply = b"HTTP/1.1 200 OK\r\n" + big + b'content-length: 11\r\n\r\n{"ok":true}'

    async def main() -> None:
        async with Server(answering(reply)) as server:
            pool = http1.Pool(server.url())
            assert [await post(pool) for _ in range(5)] == [(200, b'{"ok":true}')] * 5
            assert server.connections == 1  # the count starts again for each response on a connection

    run(main())


def test_an_interim_response_is_skipped() -> None:
    async def main() -> None:
        async with Server(answering(b"HTTP/1.1 103 Early Hints\r\nlink: </x>\r\n\r\n" + OK)) as server:
            assert await post(http1.Pool(server.url())) == (200, b'{"ok":true}')

    run(main())


def test_response_headers_are_the_final_heads_fields() -> None:
    """The head is parsed only when its fields are read: after an interim head, repeated fields joined,
    the body's bytes (arriving with the head, or in pieces) left alone."""
    reply = (
        b"HTTP/1.1 103 Early Hints\r\nlink: </x>\r\n\r\n"
        b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 7\r\nX-RateLimit-Remaining:  0\r\n"
        b"Vary: a\r\nvary: b\r\ncontent-length: 11\r\n\r\n"
        b'{"ok":true}'
    )

    async def pieces(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        for i in range(0, len(reply), 9):  # the head split across many reads
            writer.write(reply[i : i + 9])
            await writer.drain()
            await asyncio.sleep(0.001)

    expected = {
        "retry-after": "7",
        "x-ratelimit-remaining": "0",
        "vary": "a, b",
        "content-length": "11",
    }

    async def main() -> None:
        for script in (answering(reply), pieces):
            async with Server(script) as server:
                pool = http1.Pool(server.url())
                response = await pool.request(request_bytes(pool))
                assert response.status == 429
                assert await response.read() == b'{"ok":true}'
                assert response.headers == expected
                response.release()
                await pool.close()

    run(main())


def test_the_connection_cap_queues_requests() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            await asyncio.sleep(0.05)
            writer.write(OK)

    async def main() -> None:
        async with Server(script) as server:
            pool = http1.Pool(server.url(), max_connections=2)
            results = await asyncio.gather(*(post(pool) for _ in range(8)))
            assert results == [(200, b'{"ok":true}')] * 8
            assert (server.connections, server.peak) == (2, 2)

    run(main())


def test_the_cap_holds_while_connections_close_and_requests_keep_coming() -> None:
    """A slot freed by a closed connection belongs to the request waiting for it, not to a newcomer."""
    closing = OK.replace(b"content-length", b"connection: close\r\ncontent-length")

    async def main() -> None:
        async with Server(answering(closing, then_close=True)) as server:
            pool = http1.Pool(server.url(), max_connections=2)

            async def client() -> None:
                for _ in range(15):
                    assert await post(pool) == (200, b'{"ok":true}')

            await asyncio.gather(*(client() for _ in range(6)))
            assert server.connections == 90
            assert server.peak <= 2

    run(main())


def test_cancelling_a_request_closes_its_connection_and_frees_its_slot() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        if await reader.read(1) == b"":  # the client closed the connection
            server.closed_by_client.set()

    async def main() -> None:
        nonlocal server
        async with Server(script) as server:
            pool = http1.Pool(server.url(), max_connections=1)
            task = asyncio.create_task(post(pool))
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.wait_for(server.closed_by_client.wait(), 2)
            assert not pool._open

    server: Server
    run(main())


def test_a_partly_read_response_is_not_reused_and_close_after_release_is_harmless() -> None:
    async def main() -> None:
        async with Server(answering(OK)) as server:
            pool = http1.Pool(server.url())
            response = await pool.request(request_bytes(pool))
            response.release()  # the body was never read: this connection cannot carry another request
            assert await post(pool) == (200, b'{"ok":true}')
            reused = await pool.request(request_bytes(pool))
            await reused.read()
            reused.release()
            reused.close()  # after release: must not close the pooled connection
            assert await post(pool) == (200, b'{"ok":true}')
            assert server.connections == 2

    run(main())


def test_a_server_that_drops_an_idle_connection_costs_nothing() -> None:
    async def main() -> None:
        async with Server(answering(OK, then_close=True)) as server:  # closes right after answering
            pool = http1.Pool(server.url())
            for _ in range(3):
                assert await post(pool) == (200, b'{"ok":true}')
                await asyncio.sleep(0.05)  # the close reaches the pool while the connection is idle
            assert server.connections == 3

    run(main())


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def _tls(ca: trustme.CA, name: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(name).configure_cert(context)
    return context


def test_https_with_the_system_trust_store(ca: trustme.CA, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))  # how an operator adds a private CA

    async def main() -> None:
        async with Server(answering(OK), tls=_tls(ca, "localhost")) as server:
            pool = http1.Pool(server.url("https", "localhost"))
            assert pool.authority == f"localhost:{server.port}"
            assert [await post(pool) for _ in range(2)] == [(200, b'{"ok":true}')] * 2
            assert server.connections == 1
        async with Server(answering(OK), tls=_tls(ca, "other.example")) as server:
            with pytest.raises(http1.ConnectError, match="certificate"):
                await post(http1.Pool(server.url("https", "localhost")))

    run(main())


def test_header_values_with_line_breaks_are_refused() -> None:
    with pytest.raises(ValueError, match="line break"):
        http1.render_head("POST", "http://x/", {"x-evil": "a\r\nhost: other"})
    assert not http1.safe_header("traceparent", "00\nx")


def test_a_body_larger_than_the_read_ahead_limit_is_read_whole() -> None:
    """read() of a body past the point where the socket reads pause (256 KiB) must resume them itself."""
    body = bytes(range(256)) * (4 * 1024 * 4)  # 4 MiB, in several reads

    async def main() -> None:
        reply = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
        async with Server(answering(reply)) as server:
            pool = http1.Pool(server.url(), read_timeout=10)
            assert await post(pool) == (200, body)
            assert await post(pool) == (200, body)  # and the connection is reused
            assert server.connections == 1
            await pool.close()

    run(main())


def test_a_reader_that_falls_behind_stops_the_socket_reads() -> None:
    """Backpressure: past a small buffer the client stops reading, so a fast upstream waits for it
    instead of filling the gateway's memory."""
    size = 64 * 1024 * 1024
    written = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size)
        block = b"x" * (1024 * 1024)
        for _ in range(size // len(block)):
            writer.write(block)
            await writer.drain()
        written.set()

    async def main() -> None:
        async with Server(script) as server:
            pool = http1.Pool(server.url())
            response = await pool.request(request_bytes(pool))
            await asyncio.sleep(0.5)  # not reading
            assert not written.is_set()
            assert response._connection is not None and response._connection.buffered < 2 * 1024 * 1024
            total = 0
            async for block in response.blocks():
                total += len(block)
            response.release()
            assert total == size and written.is_set()

    run(main())
