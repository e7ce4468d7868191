"""The ledger's writer: records are buffered in memory and written in batches by one background task.

On the request path a record costs a deque append. The task writes a batch when `batch_size` records
wait, or every `flush_interval` seconds. While the database is away the records stay in the buffer
(bounded by `capacity`; when full, the oldest are dropped and counted), and the task retries with a
backoff; one warning when writes start failing, one line when they work again. Requests never wait
for the database and never fail because of it. `close()` writes what is left (within a deadline).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

from gateway import metrics
from gateway.logs import get_logger

from .base import Ledger, UsageRecord

log = get_logger("ledger")

_RETRY_FIRST = 0.2  # seconds before the first retry of a failed write, doubling up to _RETRY_MAX
_RETRY_MAX = 5.0


class LedgerWriter:
    def __init__(
        self, ledger: Ledger, where: str, batch_size: int = 500, flush_interval: float = 1.0, capacity: int = 100_000
    ) -> None:
        self.ledger = ledger
        self.where = where  # the database, as a log line may show it (no password)
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.capacity = capacity
        self._buffer: deque[UsageRecord] = deque()
        self._flight: list[UsageRecord] = []  # the batch being written
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.users = 0  # the cores sharing this writer (service.ledger.writer_for / release)
        self._up: bool | None = None  # None: no write tried yet
        self.dropped = 0
        self._dropping = 0  # dropped since the buffer became full; logged once then, and when it ends

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def pending(self) -> list[UsageRecord]:
        """The records not written yet, the batch being written included (budgets count them when they
        seed from the ledger: a batch whose commit races the seed's read is counted twice, never missed)."""
        return [*self._flight, *self._buffer]

    def add(self, record: UsageRecord) -> None:
        """Hand a record over (on the request path: an append, and a length check or two)."""
        buffer = self._buffer
        if len(buffer) >= self.capacity:
            buffer.popleft()
            self._drop(1)
        buffer.append(record)
        if len(buffer) >= self.batch_size:
            self._wake.set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="ledger-writer")

    async def close(self, grace: float = 5.0) -> None:
        """Write every buffered record (trying for up to `grace` seconds: less than the supervisor's
        KILL_MARGIN, so a worker is never killed mid-flush), then close the database."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), grace)
            except TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
                self._buffer.extendleft(reversed(self._flight))  # cut short mid-write: not written either
                self._flight = []
        if self._buffer:
            lost = len(self._buffer)
            self._buffer.clear()
            self.dropped += lost
            metrics.LEDGER_DROPPED.inc(lost)
            log.error(
                "usage records lost: the database was unreachable until the stop", count=lost, database=self.where
            )
        metrics.LEDGER_BUFFERED.set(0)
        with contextlib.suppress(Exception):
            await self.ledger.close()

    async def _run(self) -> None:
        retry = _RETRY_FIRST
        buffer = self._buffer
        try:
            await self.ledger.open()
            self._set_up(True)
        except Exception as exc:
            self._set_up(False, exc)
        while True:
            if not self._closing and len(buffer) < self.batch_size:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.flush_interval):
                        await self._wake.wait()
                self._wake.clear()
            metrics.LEDGER_BUFFERED.set(len(buffer))
            if not buffer:
                if self._closing:
                    return
                continue
            batch = self._flight = [buffer.popleft() for _ in range(min(self.batch_size, len(buffer)))]
            if len(buffer) < self.batch_size:
                self._wake.clear()  # set for the batch just taken: the next wait is a real one
            try:
                await self.ledger.write(batch)
            except Exception as exc:
                metrics.LEDGER_ERRORS.inc()
                self._flight = []
                self._put_back(batch)
                self._set_up(False, exc)
                metrics.LEDGER_BUFFERED.set(len(buffer))
                await self._pause(retry)
                retry = min(retry * 2, _RETRY_MAX)
                continue
            self._flight = []
            retry = _RETRY_FIRST
            metrics.LEDGER_WRITTEN.inc(len(batch))
            self._set_up(True)
            if self._dropping and len(buffer) < self.capacity:
                log.warning("usage records were dropped while the buffer was full", count=self._dropping)
                self._dropping = 0

    async def _pause(self, seconds: float) -> None:
        """Wait before a retry; a close cuts it short once, so the stop's deadline is spent writing."""
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wake.wait()

    def _put_back(self, batch: list[UsageRecord]) -> None:
        """A failed batch goes back to the front, in order; what no longer fits is the oldest, dropped."""
        buffer = self._buffer
        buffer.extendleft(reversed(batch))
        excess = len(buffer) - self.capacity
        if excess > 0:
            for _ in range(excess):
                buffer.popleft()
            self._drop(excess)

    def _drop(self, count: int) -> None:
        """The oldest records go: counted always, logged when the buffer first overflows."""
        self.dropped += count
        metrics.LEDGER_DROPPED.inc(count)
        if not self._dropping:
            log.error(
                "usage ledger buffer full: dropping the oldest records", capacity=self.capacity, database=self.where
            )
        self._dropping += count

    def _set_up(self, up: bool, exc: BaseException | None = None) -> None:
        if up == self._up:
            return
        was, self._up = self._up, up
        if up:
            if was is False:
                log.warning("usage ledger reachable again", database=self.where, buffered=len(self._buffer))
            else:
                log.info("usage ledger ready", database=self.where)
        else:
            log.warning(
                "usage ledger unreachable; records are kept in memory and written when it is back",
                database=self.where,
                error=f"{type(exc).__name__}: {exc}",
                buffered=len(self._buffer),
                capacity=self.capacity,
            )
