"""The ledger in PostgreSQL, through asyncpg.

A batch is one transaction: COPY into a temporary staging table, then `INSERT ... SELECT FROM staging
ON CONFLICT DO NOTHING`, so a batch written twice inserts nothing twice. The schema is migrated in a transaction that
first takes `pg_advisory_xact_lock`, so replicas starting together migrate one after another (a bare
`CREATE TABLE IF NOT EXISTS` races on PostgreSQL's catalog).

Driver and statement chosen by measurement (tests/service/ledger/measure_postgres.py: 2 shared cores,
PostgreSQL 15 on loopback, 20 000 records in batches of 500, best of 3; the gateway's CPU per record
and records per second, which vary with the machine's other load):

    asyncpg 0.32, COPY to staging, then INSERT      3.1 us    37 000-60 000/s   <- this module
    asyncpg, executemany in a transaction           3.8-4.0   42 000-54 000/s
    asyncpg, INSERT ... SELECT FROM unnest(arrays)  7.4-7.9   45 000-58 000/s
    psycopg 3.3 (binary), executemany (pipelined)  13.0-13.2  18 000-32 000/s
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import asyncpg  # type: ignore[import-untyped]

from .base import COLUMNS, MIGRATIONS, SCHEMA_TABLE, TABLE, Ledger, UsageRecord, totals_query, utc

T = TypeVar("T")
LOCK_ID = 0x6C6C6D67_6C646772  # "llmgldgr": the advisory lock the migration holds
_STAGING = "llm_gateway_usage_staging"
# A temporary table per connection, emptied at each commit: COPY goes there, then one INSERT moves the rows.
_CREATE_STAGING = f"CREATE TEMP TABLE IF NOT EXISTS {_STAGING} (LIKE {TABLE}) ON COMMIT DELETE ROWS"
_FROM_STAGING = f"INSERT INTO {TABLE} SELECT * FROM {_STAGING} ON CONFLICT DO NOTHING"
_CONNECT_TIMEOUT = 5.0
_COMMAND_TIMEOUT = 30.0


class PostgresLedger(Ledger):
    dialect = "postgresql"

    def __init__(self, url: str) -> None:
        self._url = url
        self._conn: asyncpg.Connection | None = None
        self._lock = asyncio.Lock()  # one statement at a time on the one connection

    async def _connection(self) -> asyncpg.Connection:
        conn = self._conn
        if conn is None or conn.is_closed():
            self._conn = None
            conn = await asyncpg.connect(self._url, timeout=_CONNECT_TIMEOUT, command_timeout=_COMMAND_TIMEOUT)
            try:
                await migrate(conn)
                await conn.execute(_CREATE_STAGING)
            except BaseException:
                await _close(conn)
                raise
            self._conn = conn
        return conn

    async def _run(self, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        async with self._lock:
            conn = await self._connection()
            try:
                return await work(conn)
            except BaseException:
                # The connection may be half-dead (server restarted, a timeout mid-statement): start afresh.
                self._conn = None
                await _close(conn)
                raise

    async def open(self) -> None:
        async with self._lock:
            await self._connection()

    async def write(self, records: Sequence[UsageRecord]) -> int:
        rows = [(utc(r[0]), *r[1:]) for r in records]

        async def insert(conn: asyncpg.Connection) -> str:
            async with conn.transaction():
                await conn.copy_records_to_table(_STAGING, records=rows, columns=COLUMNS)
                status: str = await conn.execute(_FROM_STAGING)
                return status

        status = await self._run(insert)
        return int(status.rsplit(" ", 1)[-1])  # "INSERT 0 <n>"

    async def records(self) -> list[UsageRecord]:
        sql = f"SELECT {', '.join(COLUMNS)} FROM {TABLE} ORDER BY ts, request_id"
        rows = await self._run(lambda conn: conn.fetch(sql))
        return [UsageRecord(row["ts"].timestamp(), *(row[c] for c in COLUMNS[1:])) for row in rows]

    async def totals(
        self, group_by: Sequence[str], since: float | None = None, until: float | None = None
    ) -> list[dict[str, Any]]:
        day = "to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD')"
        sql, params = totals_query(group_by, since, until, day, lambda n: f"${n}", utc)
        rows = await self._run(lambda conn: conn.fetch(sql, *params))
        return [_plain(dict(row)) for row in rows if row["requests"]]

    async def schema_version(self) -> int:
        sql = f"SELECT coalesce(max(version), 0) FROM {SCHEMA_TABLE}"
        version: int = await self._run(lambda conn: conn.fetchval(sql))
        return version

    async def close(self) -> None:
        async with self._lock:
            if self._conn is not None:
                await _close(self._conn)
                self._conn = None


async def migrate(conn: asyncpg.Connection) -> None:
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", LOCK_ID)
        await conn.execute(f"CREATE TABLE IF NOT EXISTS {SCHEMA_TABLE} (version integer NOT NULL)")
        version = await conn.fetchval(f"SELECT coalesce(max(version), 0) FROM {SCHEMA_TABLE}")
        for number, statements in enumerate(MIGRATIONS["postgresql"], start=1):
            if number > version:
                for statement in statements:
                    await conn.execute(statement)
                await conn.execute(f"INSERT INTO {SCHEMA_TABLE} (version) VALUES ($1)", number)


async def _close(conn: asyncpg.Connection) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(conn.close(), 2.0)
    if not conn.is_closed():
        conn.terminate()


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    """sum() of bigint is numeric in PostgreSQL: back to int, as SQLite gives it."""
    return {
        k: (int(v) if k in ("prompt_tokens", "cached_tokens", "completion_tokens", "cost_micro") else v)
        for k, v in row.items()
    }
