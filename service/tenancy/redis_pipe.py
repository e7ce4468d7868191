"""One dedicated Redis connection that pipelines the admission script's calls of every request.

redis-py's pooled path costs more CPU per call than the round trip itself: a pool checkout and release
under an asyncio lock, a readiness poll of the socket, and a task (`wait_for`) plus a timeout context
per call for its socket timeout. Here each request writes its pre-packed command on one connection
and waits on a future; one reader task reads the replies in order (hiredis parses several from one
socket read) and hands each to its request. The connection has no socket timeout of its own: each
call's short timeout is one timer shared by all the calls in flight (replies come back in order, so
the oldest call is the next to expire), and a call that timed out leaves its reply to be read and
dropped, so the connection stays in step. A broken connection fails every call in flight; the next
call opens a new one.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from typing import Any

import redis.asyncio
import redis.exceptions


class RedisPipe:
    def __init__(self, url: str, timeout: float) -> None:
        # socket_timeout=None: the pipe's own timer bounds each call (see above); connecting is bounded here.
        self._pool: Any = redis.asyncio.ConnectionPool.from_url(
            url, socket_timeout=None, socket_connect_timeout=timeout, health_check_interval=0
        )
        self._timeout = timeout
        self._connection: Any = None
        self._connecting: asyncio.Future[Any] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # (deadline, future) per call sent and not yet answered, oldest first.
        self._waiting: deque[tuple[float, asyncio.Future[Any]]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self._writer: asyncio.Task[None] | None = None
        self._outbox: list[bytes] = []  # commands queued for the writer task, in the order of `_waiting`
        self._wakeup: asyncio.Future[None] | None = None  # the writer's, while it waits for commands

    async def call(self, packed: bytes) -> Any:
        """Send one packed command and return its reply; raises redis-py's errors, or TimeoutError."""
        if self._connection is None:
            await self.connect()
        loop = self._loop
        assert loop is not None
        future = loop.create_future()
        deadline = loop.time() + self._timeout
        self._waiting.append((deadline, future))
        if self._timer is None:
            self._timer = loop.call_at(deadline, self._expire)
        # The writer task sends what the calls of one loop iteration queued in one write (one system
        # call, and one socket read on each side, for several requests).
        self._outbox.append(packed)
        wakeup = self._wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)
        return await future

    async def connect(self) -> Any:
        """The pipe's connection, opened once by the first call that needs it (the others wait for it)."""
        if self._connection is not None:
            return self._connection
        if self._connecting is not None:
            return await asyncio.shield(self._connecting)
        loop = self._loop = asyncio.get_running_loop()
        self._connecting = loop.create_future()
        try:
            connection = self._pool.make_connection()
            async with asyncio.timeout(self._timeout):
                await connection.connect()
        except BaseException as exc:
            self._connecting.set_exception(exc)
            self._connecting.exception()  # retrieved: the waiters, if any, get it
            raise
        finally:
            connecting, self._connecting = self._connecting, None
        self._connection = connection
        self._reader = loop.create_task(self._read(connection))
        self._writer = loop.create_task(self._write(connection))
        connecting.set_result(connection)
        return connection

    async def _write(self, connection: Any) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._outbox:
                self._wakeup = loop.create_future()
                await self._wakeup
                self._wakeup = None
            batch, self._outbox = self._outbox, []
            try:
                # No socket timeout: writelines (one writev) and a drain that returns at once unless the
                # socket's buffer is full.
                await connection.send_packed_command(batch, check_health=False)
            except BaseException as exc:
                self._broken(connection, exc)
                return

    async def _read(self, connection: Any) -> None:
        waiting = self._waiting
        while True:
            try:
                # math.inf: no timeout on this read (the calls' timer is the pipe's); errors Redis replied
                # with (NOSCRIPT, a script error) are raised, and belong to one call only.
                reply: Any = await connection.read_response(timeout=math.inf, disconnect_on_error=False)
            except redis.exceptions.ResponseError as exc:
                reply = exc
            except BaseException as exc:
                self._broken(connection, exc)
                return
            if not waiting:  # nothing asked for it: out of step, never trust the connection again
                self._broken(connection, redis.exceptions.ConnectionError("unexpected reply"))
                return
            _, future = waiting.popleft()
            if not future.done():  # a call that timed out: its reply is dropped
                if isinstance(reply, Exception):
                    future.set_exception(reply)
                else:
                    future.set_result(reply)

    def _expire(self) -> None:
        """The oldest calls past their deadline fail with TimeoutError; re-armed for the next one."""
        self._timer = None
        loop = self._loop
        assert loop is not None
        now = loop.time()
        for deadline, future in self._waiting:
            if not future.done():
                if deadline > now:
                    self._timer = loop.call_at(deadline, self._expire)
                    return
                future.set_exception(TimeoutError())

    def _broken(self, connection: Any, exc: BaseException) -> None:
        """The connection is cut or out of step: every call in flight fails, the next call reconnects."""
        if self._connection is not connection:
            return
        self._connection = None
        current = asyncio.current_task()
        for task in (self._reader, self._writer):
            if task is not None and task is not current:
                task.cancel()
        self._reader = self._writer = None
        self._wakeup = None
        self._outbox = []
        error = exc if isinstance(exc, Exception) else redis.exceptions.ConnectionError(type(exc).__name__)
        while self._waiting:
            _, future = self._waiting.popleft()
            if not future.done():
                future.set_exception(error)
        closing = asyncio.get_running_loop().create_task(connection.disconnect(nowait=True))
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)

    async def reset(self) -> None:
        """Drop the connection (after an outage: a restarted server closed it); the next call opens one."""
        connection = self._connection
        if connection is not None:
            self._broken(connection, redis.exceptions.ConnectionError("reset"))

    async def close(self) -> None:
        await self.reset()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        await asyncio.gather(*self._closing, return_exceptions=True)
        await self._pool.disconnect()
