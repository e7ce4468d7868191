"""A lean HTTP/1.1 client for upstream calls: one keep-alive pool per origin, httptools' C parser.

Measured on this machine against nginx (bench/profile-notes.md): aiohttp's client spends about 80 µs
of CPU per POST, this one about 16. The difference is what aiohttp does per request that an LLM
gateway does not need: header multidicts, payload and cookie machinery, trace signals, a timer per
phase. Here the request head is bytes rendered once per provider, a request is one `write`, and the
response is parsed in C as it arrives.

What it does: HTTP and HTTPS (the system's CA store; `SSL_CERT_FILE` is honoured), keep-alive reuse
(LIFO, idle connections dropped after `keepalive` seconds or when the server closes them), a cap on
open connections per origin, Content-Length, chunked and close-delimited bodies, a connect timeout,
a read timeout on upstream silence (between any two reads, as aiohttp's `sock_read`), a 64 KiB
cap on a response head, one immediate retry on a new connection when a reused one was closed before
any byte of an answer (see Pool), and egress through an http:// proxy (proxy.py decides which):
HTTPS through a CONNECT tunnel with TLS verified for the upstream's name, plain HTTP in absolute
form, `Proxy-Authorization: Basic` from the proxy URL. What it does not: https:// or SOCKS proxies,
redirects, compression (no Accept-Encoding is sent, so bodies come as they are), pipelining, HTTP/2.

Why proxies are spoken here rather than by httpx behind a transport interface: measured on this
machine (uvloop, 8 concurrent, loopback nginx behind tinyproxy), CPU per request through the proxy
is 34-36 µs for this client over a kept-alive CONNECT tunnel and 85-110 µs in forward mode (tinyproxy
closes each connection), against 990-1110 µs for httpx 0.28 (830 µs direct, against 11-19 µs here).
CONNECT, absolute-form targets and the auth header cost about 90 lines here; an httpx backend would
cost as many for its adapter (response, timeouts, errors) and would need this client's keep-alive
retry, head cap and read timeout again, and the proxy resolution (per-provider key, NO_PROXY once
at start-up) is needed either way. One client also means one set of tests and failure semantics.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import AsyncIterator, Callable
from urllib.parse import urlsplit

import httptools

from gateway.proxy import Proxy

# A slow reader of a fast stream: stop reading the socket past this many buffered bytes.
_HIGH_WATER = 256 * 1024
# llhttp sets no limit on a response head, and httptools gathers a header in memory until it ends:
# an upstream that sends header bytes forever is cut off here (aiohttp's limit is 8 KiB per field).
MAX_HEAD_BYTES = 64 * 1024


class HTTPClientError(Exception):
    """The upstream could not be reached, or broke the exchange."""


class ConnectError(HTTPClientError):
    """Connecting (TCP or TLS) failed: refused, unresolvable, bad certificate."""


class ConnectTimeout(HTTPClientError):
    """Connecting took longer than the connect timeout."""


class ReadTimeout(HTTPClientError):
    """The upstream sent nothing for the read timeout."""


class Disconnected(HTTPClientError):
    """The upstream closed the connection before its response was complete."""


class ProtocolError(HTTPClientError):
    """The upstream's bytes are not valid HTTP/1.1."""


class ProxyError(HTTPClientError):
    """The egress proxy refused the request or the CONNECT tunnel, or broke it."""


class Response:
    """One response; its body is read with `read()` or `blocks()`. `release()` hands a complete
    response's connection back to the pool; `close()` drops the connection (the upstream sees it)."""

    __slots__ = ("_connection", "_head", "_headers", "status")

    def __init__(self, connection: _Connection, status: int, head: list[bytes]) -> None:
        self._connection: _Connection | None = connection
        self.status = status
        self._head = head
        self._headers: dict[str, str] | None = None

    @property
    def headers(self) -> dict[str, str]:
        """The head's fields, names lower-cased, repeated ones joined with ", ". Parsed on first use from
        the bytes llhttp already checked: a 200 answer's head is never read (error answers pass it on)."""
        if self._headers is None:
            self._headers = parse_head(self._head)
        return self._headers

    def _owned(self) -> _Connection:
        if self._connection is None:
            raise RuntimeError("the response was released")
        return self._connection

    async def read(self) -> bytes:
        connection = self._owned()
        parts: list[bytes] = []
        while not connection.complete:
            if connection.paused:
                # A body past the read-ahead limit (16 embeddings of 1536 floats is 0.5 MB): taking what is
                # buffered resumes the socket reads, which would otherwise wait for a take() forever.
                parts.append(connection.take())
            await connection.wait()
        if not parts:
            return connection.take()
        parts.append(connection.take())
        return b"".join(parts)

    async def blocks(self) -> AsyncIterator[bytes]:
        """The body as it arrives: everything buffered since the last step, one block per step."""
        while block := await self.next_block():
            yield block

    async def next_block(self) -> bytes:
        """Everything buffered since the last call, once there is some; b"" when the body has ended.
        A coroutine, not an async generator: no generator registered with the loop per response."""
        connection = self._owned()
        while not connection.buffered:
            if connection.complete:
                return b""
            await connection.wait()
        return connection.take()

    def release(self) -> None:
        """Done with the response: its connection goes back to the pool if the body was read to its
        end, else it is closed. The response is unusable afterwards; calling this again is a no-op."""
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.finish()

    def close(self) -> None:
        """Drop the connection (the upstream sees it close); a no-op after release()."""
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()


class _Connection(asyncio.Protocol):
    """One keep-alive connection carrying one exchange at a time; the parser's callbacks fill it."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.reused = False  # it carried an exchange before: the upstream may close it as we reuse it
        self.idle_since = 0.0
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.head_bytes = 0  # bytes received before the final response head was complete
        # The bytes received until the final head was complete (interim heads, some body too): the fields
        # are parsed from them only when asked (parse_head), so the parser has no per-header callback.
        self.head_parts: list[bytes] = []
        self.headers_done: asyncio.Future[None] | None = None
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.complete = False
        self.keep_alive = False
        self.error: HTTPClientError | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.paused = False
        self.last_read = 0.0
        self.timer: asyncio.TimerHandle | None = None

    def usable(self) -> bool:
        """Open, and not closing: the upstream may have sent its FIN before connection_lost ran."""
        return not self.closed and self.transport is not None and not self.transport.is_closing()

    # ---------------------------------------------------------------- the exchange

    def send(self, data: bytes) -> asyncio.Future[None]:
        assert self.transport is not None
        self.headers_done = self.loop.create_future()
        self.transport.write(data)
        timeout = self.pool.read_timeout
        if timeout:
            # One timer per exchange, re-armed lazily: a read only stamps the time (see _silence).
            self.last_read = self.loop.time()
            self.timer = self.loop.call_at(self.last_read + timeout, self._silence)
        return self.headers_done

    def response(self) -> Response:
        return Response(self, self.status, self.head_parts)

    def _delimited(self) -> bool:
        """The body has a length or is chunked; otherwise it ends at EOF. Asked only when the connection
        is lost mid-body, so the head is not parsed per response."""
        headers = parse_head(self.head_parts)
        return "content-length" in headers or "transfer-encoding" in headers

    async def wait(self) -> None:
        if self.error is not None:
            raise self.error
        self.waiter = self.loop.create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None

    def take(self) -> bytes:
        chunks = self.chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self.chunks = []
        self.buffered = 0
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return data

    def finish(self) -> None:
        """Back to the pool when the response is complete and the upstream keeps the connection."""
        if self.timer is not None:
            self.timer.cancel()
        if self.complete and self.keep_alive and not self.closed and not self.buffered:
            self._reset()
            self.reused = True
            self.pool.put_back(self)
        else:
            self.close()

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()
            self.pool.forget(self)

    def _fail(self, error: HTTPClientError) -> None:
        if self.error is None and not self.complete:
            self.error = error
        self._wake()
        if self.headers_done is not None and not self.headers_done.done():
            self.headers_done.set_exception(error)

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _silence(self) -> None:
        timeout = self.pool.read_timeout
        assert timeout is not None
        due = self.last_read + timeout
        if self.loop.time() < due:  # data came meanwhile: sleep again until the new due time
            self.timer = self.loop.call_at(due, self._silence)
            return
        self.timer = None
        self._fail(ReadTimeout(f"no data for {timeout:g}s"))
        self.close()

    # ---------------------------------------------------------------- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.timer is not None:
            self.last_read = self.loop.time()
        if not self.status:  # the head is not complete yet: keep its bytes for parse_head
            self.head_parts.append(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ProtocolError(f"invalid HTTP response: {exc}"))
            self.close()
            return
        if not self.status:  # all of it was head so far (interim 1xx heads included)
            self.head_bytes += len(data)
            if self.head_bytes > MAX_HEAD_BYTES:
                self._fail(ProtocolError(f"the response head is larger than {MAX_HEAD_BYTES} bytes"))
                self.close()
                return
        if self.buffered > _HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool | None:
        return False  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is None and self.status and not self.complete and not self._delimited():
            self.complete = True  # a body without length or chunking ends when the connection does
            self._wake()
        else:
            self._fail(Disconnected("the upstream closed the connection mid-response"))
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
        self.pool.forget(self)

    # ---------------------------------------------------------------- httptools callbacks

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:  # an interim response (103 Early Hints): the real one follows
            return
        self.status = status
        if self.headers_done is not None and not self.headers_done.done():
            self.headers_done.set_result(None)

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        self._wake()

    def on_message_complete(self) -> None:
        if not self.status:  # the end of an interim response
            return
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()  # llhttp forgets it once the message is done
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self._wake()


class _Tunnel(asyncio.Protocol):
    """The proxy's answer to CONNECT: its status line, once its head is complete."""

    def __init__(self, loop: asyncio.AbstractEventLoop, proxy: Proxy) -> None:
        self.established: asyncio.Future[tuple[int, str]] = loop.create_future()
        self.proxy = proxy
        self.head = b""

    def data_received(self, data: bytes) -> None:
        if self.established.done():
            return
        self.head += data
        if b"\r\n\r\n" not in self.head:
            if len(self.head) > MAX_HEAD_BYTES:
                self.established.set_exception(
                    ProxyError(f"proxy {self.proxy} sent an answer to CONNECT that is too large")
                )
            return
        line = self.head.split(b"\r\n", 1)[0].decode("latin-1")
        version, _, rest = line.partition(" ")
        code, _, reason = rest.partition(" ")
        if not version.startswith("HTTP/") or not code.isdigit():
            self.established.set_exception(ProxyError(f"proxy {self.proxy} answered CONNECT with {line[:80]!r}"))
        else:
            self.established.set_result((int(code), "".join(c for c in reason[:80] if c.isprintable())))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.established.done():
            self.established.set_exception(ProxyError(f"proxy {self.proxy} closed the connection during CONNECT"))


class Pool:
    """Keep-alive connections to one origin (scheme, host, port), directly or through an HTTP proxy.

    `retry_reused`: a request that fails on a kept-alive connection before any byte of an answer
    arrived (the upstream closed the idle connection just as it was reused: EOF, reset, broken pipe)
    is sent again at once, once, on a new connection, as Go's net/http does. A chat request may be
    replayed: the upstream saw at most a request it never answered. `on_retry` is called per retry.
    """

    def __init__(
        self,
        url: str,
        max_connections: int = 100,
        connect_timeout: float | None = None,
        read_timeout: float | None = None,
        keepalive: float = 60.0,
        proxy: Proxy | None = None,
        retry_reused: bool = True,
        on_retry: Callable[[], None] | None = None,
    ) -> None:
        self.host, self.port, tls, self.authority, _ = _parse(url)
        self.ssl: ssl.SSLContext | None = ssl.create_default_context() if tls else None
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.keepalive = keepalive
        self.proxy = proxy
        # Plain HTTP through a proxy: requests go to the proxy in absolute form (see render_head).
        self._forward = proxy is not None and not tls
        self.retry_reused = retry_reused
        self.on_retry = on_retry
        self.loop = asyncio.get_running_loop()
        self._idle: list[_Connection] = []
        self._open: set[_Connection] = set()
        self._waiters: collections.deque[asyncio.Future[_Connection | None]] = collections.deque()
        self._handed = 0  # free slots handed to waiters that have not connected yet: still taken
        self._closed = False

    async def request(self, data: bytes, connect_timeout: float | None = None) -> Response:
        """Send one request (head and body, already rendered); return once the response head is in.
        Cancelling it closes the connection."""
        timeout = connect_timeout or self.connect_timeout
        # A kept-alive connection is taken without a coroutine; only a new one (or a wait at the cap) awaits.
        connection = self._reuse() or await self._acquire(timeout)
        try:
            await connection.send(data)
        except Disconnected:
            connection.close()
            if not (self.retry_reused and connection.reused and not connection.status and not connection.head_bytes):
                raise
            if self.on_retry is not None:
                self.on_retry()
            connection = await self._acquire(timeout, fresh=True)
            try:
                await connection.send(data)
            except BaseException:
                connection.close()
                raise
        except BaseException:
            connection.close()
            raise
        if self._forward and connection.status == 407:  # one attribute test on a direct pool
            connection.close()
            raise ProxyError(f"proxy {self.proxy} refused the request: 407 Proxy Authentication Required")
        return connection.response()

    # ---------------------------------------------------------------- connections

    async def _acquire(self, connect_timeout: float | None, fresh: bool = False) -> _Connection:
        """An idle connection (unless `fresh`), else a new one; at the cap, the next one freed."""
        if self._closed:
            raise ConnectError("the client is closed")
        if not fresh and (connection := self._reuse()) is not None:
            return connection
        if len(self._open) + self._handed >= self.max_connections:
            connection_or_slot = await self._wait_turn()
            if connection_or_slot is not None:
                if connection_or_slot.usable():
                    return connection_or_slot
                connection_or_slot.close()  # it closed while handed over: its slot went on; queue again
                return await self._acquire(connect_timeout, fresh)
            self._handed -= 1  # the slot is ours: _connect holds it from here
        return await self._connect(connect_timeout)

    def _reuse(self) -> _Connection | None:
        """The most recently idle connection still open and fresh enough, if any (stale ones are closed)."""
        if self._closed:
            return None  # _acquire raises
        now = self.loop.time()
        while self._idle:
            connection = self._idle.pop()
            if connection.usable() and now - connection.idle_since < self.keepalive:
                return connection
            connection.close()
        return None

    async def _wait_turn(self) -> _Connection | None:
        """At the cap: wait for a released connection, or for a closed one's free slot (None)."""
        waiter: asyncio.Future[_Connection | None] = self.loop.create_future()
        self._waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # handed one just as we were cancelled: pass it on
                handed = waiter.result()
                if handed is not None:
                    self.put_back(handed)
                else:
                    self._handed -= 1
                    self._hand_slot()
            raise
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    async def _connect(self, connect_timeout: float | None) -> _Connection:
        connection = _Connection(self)
        self._open.add(connection)  # holds the slot while connecting
        proxy = self.proxy
        try:
            async with asyncio.timeout(connect_timeout):
                if proxy is None:
                    await self.loop.create_connection(
                        lambda: connection,
                        self.host,
                        self.port,
                        ssl=self.ssl,
                        server_hostname=self.host if self.ssl else None,
                    )
                elif self.ssl is None:
                    await self._connect_proxy(lambda: connection)
                else:
                    await self._tunnel(connection, proxy)
        except TimeoutError:
            self.forget(connection)
            via = f" through proxy {proxy}" if proxy else ""
            raise ConnectTimeout(f"connecting to {self.authority}{via} took over {connect_timeout:g}s") from None
        except OSError as exc:
            self.forget(connection)
            via = f" through proxy {proxy}" if proxy else ""
            raise ConnectError(f"cannot connect to {self.authority}{via}: {exc.strerror or exc}") from None
        except BaseException:
            self.forget(connection)
            raise
        return connection

    async def _connect_proxy(self, protocol: Callable[[], asyncio.Protocol]) -> asyncio.BaseTransport:
        assert self.proxy is not None
        try:
            transport, _ = await self.loop.create_connection(protocol, self.proxy.host, self.proxy.port)
        except OSError as exc:
            raise ConnectError(f"cannot connect to proxy {self.proxy}: {exc.strerror or exc}") from None
        return transport

    async def _tunnel(self, connection: _Connection, proxy: Proxy) -> None:
        """HTTPS through a proxy: CONNECT, then TLS to the upstream inside the tunnel (SNI and
        certificate checks for the upstream's name, as on a direct connection)."""
        tunnel = _Tunnel(self.loop, proxy)
        transport = await self._connect_proxy(lambda: tunnel)
        try:
            target = f"{_bracketed(self.host)}:{self.port}"
            auth = f"proxy-authorization: {proxy.authorization}\r\n" if proxy.authorization else ""
            transport.write(f"CONNECT {target} HTTP/1.1\r\nhost: {target}\r\n{auth}\r\n".encode("latin-1"))  # type: ignore[attr-defined]
            status, reason = await tunnel.established
            if not 200 <= status < 300:
                raise ProxyError(f"proxy {proxy} refused CONNECT to {target}: {status} {reason}".rstrip())
            assert self.ssl is not None
            tls = await self.loop.start_tls(transport, connection, self.ssl, server_hostname=self.host)  # type: ignore[arg-type]
        except BaseException:
            transport.close()
            raise
        if tls is None:  # the transport closed meanwhile
            raise ProxyError(f"proxy {proxy} closed the tunnel to {target}")
        connection.connection_made(tls)

    def put_back(self, connection: _Connection) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(connection)
                return
        if self._closed:
            connection.close()
            return
        connection.idle_since = self.loop.time()
        self._idle.append(connection)

    def forget(self, connection: _Connection) -> None:
        """A connection is gone: its slot is free."""
        if connection in self._open:
            self._open.discard(connection)
            if connection in self._idle:
                self._idle.remove(connection)
            self._hand_slot()

    def _hand_slot(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                self._handed += 1
                return

    async def close(self) -> None:
        self._closed = True
        for waiter in self._waiters:
            if not waiter.done():
                waiter.cancel()
        for connection in list(self._open):
            connection.close()


def parse_head(parts: list[bytes]) -> dict[str, str]:
    """The fields of the final (non-1xx) response head at the start of `parts`, which llhttp has parsed
    and accepted already: names lower-cased, repeated fields joined with ", "."""
    data = b"".join(parts).replace(b"\r\n", b"\n")
    start = 0
    while True:
        end = data.find(b"\n\n", start)
        if end < 0:
            return {}
        lines = data[start:end].split(b"\n")
        start = end + 2
        code = lines[0].split(b" ", 2)[1:2]
        if not (code and code[0].startswith(b"1")):  # interim heads (1xx) come before the real one
            break
    headers: dict[str, str] = {}
    for line in lines[1:]:  # no obs-fold continuation lines: llhttp refuses them
        raw_name, _, raw_value = line.partition(b":")
        name = raw_name.strip().decode("latin-1").lower()
        value = raw_value.strip(b" \t").decode("latin-1")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return headers


def _parse(url: str) -> tuple[str, int, bool, str, str]:
    """Host, port, TLS or not, the Host header's value, and the request target of an http(s) URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    tls = parts.scheme == "https"
    default = 443 if tls else 80
    port = parts.port or default
    host = _bracketed(parts.hostname)
    authority = host if port == default else f"{host}:{port}"
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.hostname, port, tls, authority, target


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def render_head(method: str, url: str, headers: dict[str, str], proxy: Proxy | None = None) -> bytes:
    """The head of a request to `url`, without its Content-Length and final blank line; built once
    per provider. Header values that could end the head early (CR, LF) are refused. Plain HTTP
    through `proxy` has an absolute-form target and carries the proxy's credentials; HTTPS goes
    through a tunnel, and the proxy's credentials only in its CONNECT (see Pool._tunnel)."""
    _, _, tls, authority, target = _parse(url)
    forward = proxy is not None and not tls
    lines = [f"{method} http://{authority}{target} HTTP/1.1" if forward else f"{method} {target} HTTP/1.1"]
    lines.append(f"host: {authority}")
    if forward and proxy is not None and proxy.authorization:
        lines.append(f"proxy-authorization: {proxy.authorization}")
    for name, value in headers.items():
        if not safe_header(name, value):
            raise ValueError(f"header {name!r} holds a line break")
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n").encode("latin-1")


def safe_header(name: str, value: str) -> bool:
    return not any(c in name or c in value for c in "\r\n\0")


def with_body(head: bytes, body: bytes, extra: bytes = b"") -> bytes:
    return b"%s%scontent-length: %d\r\n\r\n%s" % (head, extra, len(body), body)
