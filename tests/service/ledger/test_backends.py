"""The ledger's backends against real databases, the same tests for each: SQLite in a file, PostgreSQL from Debian's
binaries. And the writer in front of them: batches, outages, a full buffer, the flush at stop."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from gateway import metrics
from service.ledger import SCHEMA_VERSION, LedgerWriter, UsageRecord, open_ledger
from service.ledger.base import SCHEMA_TABLE, TABLE, redacted
from service.ledger.sqlite import CHUNK_ROWS, path_of
from tests.service.ledger.postgres_server import PostgresServer

T0 = 1_796_000_000.0  # 2026-11-30T...Z


def record(n: int, **changes: Any) -> UsageRecord:
    base = UsageRecord(
        ts=T0 + n * 0.5,
        request_id=f"req-{n:06d}",
        attempts=1,
        kind="chat",
        key_name="search" if n % 2 else "none",
        team="search-team" if n % 2 else "",
        model="gpt-4o",
        served_model="gpt-4o",
        provider="openai",
        deployment="openai/gpt-4o",
        prompt_tokens=100 + n,
        cached_tokens=n % 7,
        completion_tokens=10 + n,
        estimated=n % 5 == 0,
        cost_micro=1000 + n,
        latency_ms=12.5 + n,
        status=200 if n % 3 else 502,
        streamed=n % 4 == 0,
    )
    return base._replace(**changes)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def same(a: list[UsageRecord], b: list[UsageRecord]) -> bool:
    """Equal, with times to the microsecond both databases keep."""
    return [r._replace(ts=round(r.ts, 6)) for r in a] == [r._replace(ts=round(r.ts, 6)) for r in b]


async def raw_count(url: str, sql: str) -> int:
    if url.startswith("sqlite"):
        with sqlite3.connect(path_of(url)) as conn:
            return int(conn.execute(sql).fetchone()[0])
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval(sql))
    finally:
        await conn.close()


# ---------------------------------------------------------------------------------------------- backends


def test_open_creates_the_schema_and_a_second_open_changes_nothing(ledger_url: str) -> None:
    async def go() -> None:
        for _ in range(2):
            ledger = open_ledger(ledger_url)
            await ledger.open()
            assert await ledger.schema_version() == SCHEMA_VERSION
            await ledger.close()
        assert await raw_count(ledger_url, f"SELECT count(*) FROM {SCHEMA_TABLE}") == SCHEMA_VERSION

    run(go())


def test_replicas_migrating_at_once_do_not_race(ledger_url: str) -> None:
    async def go() -> None:
        ledgers = [open_ledger(ledger_url) for _ in range(8)]
        await asyncio.gather(*(ledger.open() for ledger in ledgers))  # raises if two migrations collide
        await asyncio.gather(*(ledger.write([record(i)]) for i, ledger in enumerate(ledgers)))
        assert await raw_count(ledger_url, f"SELECT count(*) FROM {SCHEMA_TABLE}") == SCHEMA_VERSION
        assert await raw_count(ledger_url, f"SELECT count(*) FROM {TABLE}") == 8
        await asyncio.gather(*(ledger.close() for ledger in ledgers))

    run(go())


def test_records_come_back_as_written(ledger_url: str) -> None:
    async def go() -> None:
        ledger = open_ledger(ledger_url)
        written = [record(n) for n in range(40)]
        assert await ledger.write(written[:25]) == 25
        assert await ledger.write(written[25:]) == 15
        assert same(await ledger.records(), written)
        await ledger.close()

    run(go())


def test_a_large_batch_with_some_records_already_there_inserts_the_rest_once(ledger_url: str) -> None:
    # SQLite writes a batch as INSERTs of CHUNK_ROWS rows and one of the rest: sizes on either side of it.
    async def go() -> None:
        ledger = open_ledger(ledger_url)
        written = [record(n) for n in range(2 * CHUNK_ROWS + 23)]
        assert await ledger.write(written[CHUNK_ROWS - 3 : CHUNK_ROWS + 4]) == 7
        assert await ledger.write(written) == len(written) - 7
        assert await ledger.write(written[:CHUNK_ROWS]) == 0
        assert await ledger.write([*written[-1:], record(999)]) == 1
        assert same(await ledger.records(), [*written, record(999)])
        await ledger.close()

    run(go())


def test_a_batch_written_again_inserts_nothing_twice(ledger_url: str) -> None:
    async def go() -> None:
        ledger = open_ledger(ledger_url)
        batch = [record(n) for n in range(10)]
        assert await ledger.write(batch) == 10
        assert await ledger.write(batch) == 0  # a retry after a commit whose answer was lost
        assert await ledger.write([*batch[5:], record(10), record(11)]) == 2
        # The same request id and attempt at another time is another call (a client reusing x-request-id).
        assert await ledger.write([record(3, ts=T0 + 99)]) == 1
        # The same request with another attempt count is another record.
        assert await ledger.write([record(4, attempts=2)]) == 1
        assert len(await ledger.records()) == 14
        await ledger.close()

    run(go())


def test_totals_by_key_team_model_and_day_over_a_range(ledger_url: str) -> None:
    day = 86_400
    rows = [
        record(1, ts=T0, key_name="a", team="t1", cost_micro=5, prompt_tokens=1, cached_tokens=0, completion_tokens=2),
        record(2, ts=T0 + 1, key_name="a", team="t1", cost_micro=7, prompt_tokens=3, cached_tokens=1),
        record(3, ts=T0 + day, key_name="a", team="t1", model="mini", cost_micro=11),
        record(4, ts=T0 + day, key_name="b", team="t2", cost_micro=13),
        record(5, ts=T0 + 3 * day, key_name="b", team="t2", cost_micro=17),
    ]

    async def go() -> None:
        ledger = open_ledger(ledger_url)
        await ledger.write(rows)
        by_key = await ledger.totals(["key_name"])
        assert [(r["key_name"], r["requests"], r["cost_micro"]) for r in by_key] == [("a", 3, 23), ("b", 2, 30)]
        by_team_day = await ledger.totals(["team", "day"], since=T0, until=T0 + 2 * day)
        assert [(r["team"], r["day"], r["requests"], r["cost_micro"]) for r in by_team_day] == [
            ("t1", "2026-11-30", 2, 12),
            ("t1", "2026-12-01", 1, 11),
            ("t2", "2026-12-01", 1, 13),
        ]
        first = (await ledger.totals(["model"], until=T0 + 2))[0]
        assert first == {
            "model": "gpt-4o",
            "requests": 2,
            "prompt_tokens": 4,
            "cached_tokens": 1,
            "completion_tokens": rows[0].completion_tokens + rows[1].completion_tokens,
            "cost_micro": 12,
        }
        everything = await ledger.totals([])
        assert everything[0]["requests"] == 5 and everything[0]["cost_micro"] == 53
        with pytest.raises(ValueError, match="cannot group usage by 'secret'"):
            await ledger.totals(["secret"])
        await ledger.close()

    run(go())


def test_a_log_line_never_shows_the_database_password() -> None:
    assert redacted("postgresql://gw:s3cret@db:5432/usage") == "postgresql://gw:***@db:5432/usage"
    assert redacted("sqlite:///./usage.db") == "sqlite:///./usage.db"


# ---------------------------------------------------------------------------------------------- the writer


class Outage:
    """Takes a backend's database away and brings it back: PostgreSQL stopped; SQLite's directory made a file."""

    def __init__(self, url: str, postgres: PostgresServer | None) -> None:
        self.url = sqlite_in_subdirectory(url)
        self.postgres = postgres
        self.blocker = Path(path_of(self.url)).parent if url.startswith("sqlite") else None

    async def schema_then_away(self) -> None:
        """The database exists with its schema, then goes away."""
        first = open_ledger(self.url)
        await first.open()
        await first.close()
        self.begin()

    def begin(self) -> None:
        if self.postgres is not None:
            self.postgres.stop()
        else:
            assert self.blocker is not None
            if self.blocker.exists():
                self.blocker.rename(self.blocker.with_suffix(".away"))
            self.blocker.write_text("not a directory")

    def end(self) -> None:
        if self.postgres is not None:
            self.postgres.start()
        else:
            assert self.blocker is not None
            self.blocker.unlink()
            if self.blocker.with_suffix(".away").exists():
                self.blocker.with_suffix(".away").rename(self.blocker)


@pytest.fixture
def outage(ledger_url: str, request: pytest.FixtureRequest) -> Iterator[Outage]:
    postgres = request.getfixturevalue("postgres") if ledger_url.startswith("postgresql") else None
    control = Outage(ledger_url, postgres)
    yield control
    if postgres is not None and postgres.process is None:
        postgres.start()


def sqlite_in_subdirectory(url: str) -> str:
    if not url.startswith("sqlite"):
        return url
    path = Path(path_of(url))
    return f"sqlite:///{path.parent / 'ledger' / path.name}"


async def until(predicate: Callable[[], Any], limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while not await predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


def test_the_writer_batches_and_close_flushes_everything(ledger_url: str) -> None:
    async def go() -> None:
        ledger = open_ledger(ledger_url)
        writer = LedgerWriter(ledger, redacted(ledger_url), batch_size=50, flush_interval=30.0, capacity=10_000)
        writer.start()
        for n in range(120):
            writer.add(record(n))
        # Two full batches go at once; the last 20 wait for the interval (30 s) or the close.
        reader = open_ledger(ledger_url)
        await until(lambda: _count(reader, 100))
        await writer.close()
        assert same(await reader.records(), [record(n) for n in range(120)])
        await reader.close()

    run(go())


async def _count(ledger: Any, expected: int) -> bool:
    return len(await ledger.records()) == expected


def test_records_wait_out_an_outage_and_all_arrive(outage: Outage) -> None:
    url = outage.url
    buffered = metrics.LEDGER_BUFFERED

    async def go() -> None:
        # The database is away from the writer's start (an open SQLite file cannot be taken away from
        # under its connection; PostgreSQL going away mid-run is in test_gateway_ledger.py).
        errors = metrics.LEDGER_ERRORS._value.get()
        outage.begin()
        writer = LedgerWriter(open_ledger(url), redacted(url), batch_size=10, flush_interval=0.05, capacity=10_000)
        writer.start()
        for n in range(60):
            writer.add(record(n))
        await until(lambda: _true(metrics.LEDGER_ERRORS._value.get() > errors))
        await asyncio.sleep(0.5)
        assert writer.buffered > 0 and buffered._value.get() > 0
        outage.end()
        reader = open_ledger(url)
        await until(lambda: _count(reader, 60))
        assert same(await reader.records(), [record(n) for n in range(60)])
        await writer.close()
        await reader.close()

    run(go())


async def _true(value: bool) -> bool:
    return value


def test_a_full_buffer_drops_the_oldest_and_counts_them(outage: Outage) -> None:
    url = outage.url

    async def go() -> None:
        await outage.schema_then_away()
        dropped = metrics.LEDGER_DROPPED._value.get()
        writer = LedgerWriter(open_ledger(url), redacted(url), batch_size=4, flush_interval=0.05, capacity=10)
        writer.start()
        for n in range(25):
            writer.add(record(n))
            await asyncio.sleep(0.01)  # let failed batches go back to the buffer in between
        # Between two retries (a failing batch is out of the buffer while it is tried) it holds the newest ten.
        await until(lambda: _true(writer.buffered == 10))
        assert writer.dropped == 15 and metrics.LEDGER_DROPPED._value.get() - dropped == 15
        outage.end()
        reader = open_ledger(url)
        await until(lambda: _count(reader, 10))
        assert same(await reader.records(), [record(n) for n in range(15, 25)])  # the newest ten
        await writer.close()
        await reader.close()

    run(go())


class WriteLock:
    """Another connection holding the table's write lock: the writer's batch waits, in flight, until it goes."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._sqlite: sqlite3.Connection | None = None
        self._postgres: Any = None

    async def take(self) -> None:
        if self.url.startswith("sqlite"):
            self._sqlite = sqlite3.connect(path_of(self.url), isolation_level=None)
            self._sqlite.execute("BEGIN EXCLUSIVE")
        else:
            self._postgres = await asyncpg.connect(self.url)
            await self._postgres.execute(f"BEGIN; LOCK TABLE {TABLE} IN ACCESS EXCLUSIVE MODE")

    async def give_back(self) -> None:
        if self._sqlite is not None:
            self._sqlite.execute("ROLLBACK")
            self._sqlite.close()
        if self._postgres is not None:
            await self._postgres.execute("ROLLBACK")
            await self._postgres.close()


def test_pending_holds_every_unwritten_record_the_batch_being_written_included(ledger_url: str) -> None:
    async def go() -> None:
        writer = LedgerWriter(open_ledger(ledger_url), redacted(ledger_url), batch_size=2, flush_interval=0.01)
        writer.start()
        writer.add(record(0))
        reader = open_ledger(ledger_url)
        await until(lambda: _count(reader, 1))
        lock = WriteLock(ledger_url)
        await lock.take()
        for n in range(1, 6):
            writer.add(record(n))
        await asyncio.sleep(0.3)  # a batch of two is out of the buffer, waiting on the lock
        assert writer.buffered < 5
        assert writer.pending() == [record(n) for n in range(1, 6)]
        await lock.give_back()
        await until(lambda: _count(reader, 6))
        assert writer.pending() == []
        await writer.close()
        await reader.close()

    run(go())


def test_close_with_the_database_away_gives_up_after_its_deadline_and_counts_the_loss(outage: Outage) -> None:
    url = outage.url

    async def go() -> None:
        await outage.schema_then_away()
        writer = LedgerWriter(open_ledger(url), redacted(url), batch_size=100, flush_interval=0.05)
        writer.start()
        for n in range(7):
            writer.add(record(n))
        await writer.close(grace=1.0)
        assert writer.buffered == 0 and writer.dropped == 7
        outage.end()

    run(go())


def test_sqlite_creates_the_directory_of_its_file(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/a/b/usage.db"

    async def go() -> None:
        ledger = open_ledger(url)
        await ledger.write([record(1)])
        await ledger.close()

    run(go())
    assert os.path.exists(tmp_path / "a" / "b" / "usage.db")
