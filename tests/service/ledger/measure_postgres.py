"""How the PostgreSQL ledger's insert was chosen: batch inserts through asyncpg three ways (and psycopg 3 when it
is importable), against a throw-away server. Not a test; run it by hand:

    .venv/bin/python -m tests.service.ledger.measure_postgres
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from service.ledger.base import COLUMNS, TABLE, UsageRecord, utc
from service.ledger.postgres import PostgresLedger
from tests.service.ledger.postgres_server import PostgresServer

RECORDS = 20_000
BATCH = 500
_ROW_INSERT = (
    f"INSERT INTO {TABLE} ({', '.join(COLUMNS)}) VALUES ({', '.join(f'${i}' for i in range(1, len(COLUMNS) + 1))})"
    " ON CONFLICT DO NOTHING"
)


def records(prefix: str) -> list[UsageRecord]:
    now = time.time()
    return [
        UsageRecord(now + i * 1e-3, f"{prefix}{i:08d}", 1, "chat", "search", "search-team", "gpt-4o", "gpt-4o",
                    "openai", "openai/gpt-4o", 1200, 256, 300, False, 4321, 812.5, 200, i % 2 == 0)
        for i in range(RECORDS)
    ]  # fmt: skip


async def timed(name: str, write: Callable[[list[UsageRecord]], Awaitable[Any]], url: str) -> None:
    best = None
    for round_ in range(3):
        conn = await asyncpg.connect(url)
        await conn.execute(f"TRUNCATE {TABLE}")
        await conn.close()
        rows = records(f"{name}-{round_}-")
        cpu, wall = time.process_time(), time.perf_counter()
        for start in range(0, len(rows), BATCH):
            await write(rows[start : start + BATCH])
        result = (time.process_time() - cpu, time.perf_counter() - wall)
        best = result if best is None or result[1] < best[1] else best
    assert best is not None
    print(f"{name:38s} {best[0] / RECORDS * 1e6:6.1f} us CPU/record  {RECORDS / best[1]:8.0f} records/s")


async def main() -> None:
    server = PostgresServer().start()
    try:
        url = server.create_database("measure")
        ledger = PostgresLedger(url)
        await ledger.open()
        conn = await asyncpg.connect(url)

        async def executemany(batch: list[UsageRecord]) -> None:
            async with conn.transaction():
                await conn.executemany(_ROW_INSERT, [(utc(r[0]), *r[1:]) for r in batch])

        types = [
            "timestamptz", "text", "int4", "text", "text", "text", "text", "text", "text", "text",
            "int8", "int8", "int8", "bool", "int8", "float8", "int4", "bool",
        ]  # fmt: skip
        unnest_insert = (
            f"INSERT INTO {TABLE} ({', '.join(COLUMNS)}) SELECT * FROM unnest("
            + ", ".join(f"${i}::{t}[]" for i, t in enumerate(types, start=1))
            + ") ON CONFLICT DO NOTHING"
        )

        async def unnest(batch: list[UsageRecord]) -> None:
            columns = [[utc(r[0]) for r in batch], *([r[i] for r in batch] for i in range(1, len(COLUMNS)))]
            await conn.execute(unnest_insert, *columns)

        await timed("asyncpg COPY to staging (the ledger)", ledger.write, url)
        await timed("asyncpg executemany in a transaction", executemany, url)
        await timed("asyncpg INSERT ... SELECT FROM unnest", unnest, url)
        await conn.close()
        await ledger.close()
        try:
            import psycopg  # type: ignore[import-not-found,unused-ignore]
        except ImportError:
            print("psycopg 3 is not installed: skipped")
            return
        aconn = await psycopg.AsyncConnection.connect(url)
        row_insert = _ROW_INSERT
        for i in range(len(COLUMNS), 0, -1):
            row_insert = row_insert.replace(f"${i}", "%s")

        async def psycopg_executemany(batch: list[UsageRecord]) -> None:
            async with aconn.transaction(), aconn.cursor() as cursor:
                await cursor.executemany(row_insert, [(utc(r[0]), *r[1:]) for r in batch])

        await timed(f"psycopg {psycopg.__version__} executemany (pipeline)", psycopg_executemany, url)
        await aconn.close()
    finally:
        server.remove()


if __name__ == "__main__":
    asyncio.run(main())
