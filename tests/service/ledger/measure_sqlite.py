"""How the SQLite ledger's driver was chosen: batch inserts through the stdlib sqlite3 on a thread of its own (the
ledger) and through aiosqlite when it is importable. Not a test; run it by hand:

    .venv/bin/python -m tests.service.ledger.measure_sqlite
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

from service.ledger.base import COLUMNS, TABLE
from service.ledger.sqlite import SqliteLedger, _insert, _stamp
from tests.service.ledger.measure_postgres import BATCH, RECORDS, records


def report(name: str, spent: tuple[float, float]) -> None:
    print(f"{name:28s} {spent[0] / RECORDS * 1e6:5.1f} us CPU/record  {RECORDS / spent[1]:8.0f} records/s")


async def main() -> None:
    with tempfile.TemporaryDirectory() as directory:
        for round_ in range(3):
            ledger = SqliteLedger(f"sqlite:///{directory}/ledger-{round_}.db")
            await ledger.open()
            rows = records(f"r{round_}-")
            cpu, wall = time.process_time(), time.perf_counter()
            for start in range(0, len(rows), BATCH):
                await ledger.write(rows[start : start + BATCH])
            spent = time.process_time() - cpu, time.perf_counter() - wall
            await ledger.close()
            report("stdlib sqlite3, own thread", spent)
        try:
            import aiosqlite  # type: ignore[import-not-found,unused-ignore]
        except ImportError:
            print("aiosqlite is not installed: skipped")
            return
        for round_ in range(3):
            path = Path(directory) / f"aio-{round_}.db"
            ledger = SqliteLedger(f"sqlite:///{path}")
            await ledger.open()  # the schema
            await ledger.close()
            db = await aiosqlite.connect(path, isolation_level=None)
            await db.execute("PRAGMA journal_mode = WAL")
            await db.execute("PRAGMA synchronous = NORMAL")
            rows = records(f"a{round_}-")
            cpu, wall = time.process_time(), time.perf_counter()
            for start in range(0, len(rows), BATCH):
                await db.execute("BEGIN IMMEDIATE")
                await db.executemany(_insert(1), [(_stamp(r[0]), *r[1:]) for r in rows[start : start + BATCH]])
                await db.execute("COMMIT")
            spent = time.process_time() - cpu, time.perf_counter() - wall
            count = await (await db.execute(f"SELECT count(*) FROM {TABLE}")).fetchone()
            assert count is not None and count[0] == RECORDS, (count, len(COLUMNS))
            await db.close()
            report(f"aiosqlite {aiosqlite.__version__}", spent)


if __name__ == "__main__":
    asyncio.run(main())
