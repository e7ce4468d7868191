"""The ledger in an embedded SQLite file (the default): the stdlib sqlite3 driver on a thread of its own.

Every call runs on one dedicated thread, so the connection never crosses threads and the event loop
never waits on the disk. WAL journal with synchronous=NORMAL: a commit is one append to the log, and
several worker processes share the file (one writer at a time; busy_timeout makes the others wait).
The schema is migrated under BEGIN IMMEDIATE, which serialises workers that start together.

Chosen by measurement (tests/service/ledger/measure_sqlite.py: 2 shared cores, 20 000 records in
batches of 500, three rounds; the gateway's CPU per record, threads included):

    stdlib sqlite3 on its own thread   9.3-9.7 us   45 000-48 000 records/s   <- this module
    aiosqlite 0.22                     9.8-11.1 us  49 000-55 000 records/s

aiosqlite is the same driver behind a thread and a queue, one loop hop per statement: no less CPU,
and one more dependency. Most of a record's cost is SQLite's own (the row and its three indexes).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import sqlite3
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import urlsplit

from .base import COLUMNS, MIGRATIONS, SCHEMA_TABLE, TABLE, Ledger, UsageRecord, totals_query, utc

T = TypeVar("T")

_ROW = f"({', '.join('?' for _ in COLUMNS)})"
# Rows per INSERT statement: one sqlite3_step writes them all, so the ledger thread gives the GIL up and
# takes it back once per chunk (executemany does it once per row: a thread switch each time the event
# loop holds the GIL). 50 rows are 900 parameters, well under SQLite's limit of 32,766.
CHUNK_ROWS = 50


def _insert(rows: int) -> str:
    return f"INSERT INTO {TABLE} ({', '.join(COLUMNS)}) VALUES {', '.join([_ROW] * rows)} ON CONFLICT DO NOTHING"


_INSERT_CHUNK = _insert(CHUNK_ROWS)
_TS = "%Y-%m-%dT%H:%M:%S.%fZ"  # UTC, microseconds: sorts as text, and SQLite's date functions read it
_BUSY_MS = 30_000


def path_of(url: str) -> str:
    """sqlite:///relative.db -> relative.db; sqlite:////abs/file.db -> /abs/file.db."""
    return urlsplit(url).path[1:]


_second: list[tuple[int, str]] = [(-1, "")]  # the last second formatted, and its text: records come in order


def _stamp(ts: float) -> str:
    """_TS, as datetime rounds it (half to even, to the microsecond); the date and time of day are formatted
    once per second (datetime's isoformat per record took a third of a record's write)."""
    fraction, whole = math.modf(ts)
    micros = round(fraction * 1e6)
    second = int(whole)
    if micros >= 1_000_000:
        second, micros = second + 1, micros - 1_000_000
    if micros < 0 or second < 0:  # before 1970: not a record's time, but keep datetime's answer
        return utc(ts).isoformat(timespec="microseconds")[:26] + "Z"
    last, text = _second[0]
    if last != second:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _second[0] = (second, text)
    return f"{text}.{micros:06d}Z"


class SqliteLedger(Ledger):
    dialect = "sqlite"

    def __init__(self, url: str) -> None:
        self.path = path_of(url)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-sqlite")
        self._conn: sqlite3.Connection | None = None

    async def _call(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    # ------------------------------------------------------------------ on the ledger thread

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            directory = os.path.dirname(self.path)
            if directory:
                os.makedirs(directory, exist_ok=True)
            # isolation_level=None: transactions are the explicit BEGIN / COMMIT below.
            conn = sqlite3.connect(self.path, timeout=_BUSY_MS / 1000, isolation_level=None, check_same_thread=False)
            try:
                conn.execute(f"PRAGMA busy_timeout = {_BUSY_MS}")
                _wal(conn)
                conn.execute("PRAGMA synchronous = NORMAL")
                self._migrate(conn)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(f"CREATE TABLE IF NOT EXISTS {SCHEMA_TABLE} (version INTEGER NOT NULL)")
            version = conn.execute(f"SELECT coalesce(max(version), 0) FROM {SCHEMA_TABLE}").fetchone()[0]
            for number, statements in enumerate(MIGRATIONS["sqlite"], start=1):
                if number > version:
                    for statement in statements:
                        conn.execute(statement)
                    conn.execute(f"INSERT INTO {SCHEMA_TABLE} (version) VALUES (?)", (number,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _write(self, records: Sequence[UsageRecord]) -> int:
        conn = self._connection()
        # The booleans go in as 0/1: sqlite3 binds only exact int, float and str without its adapter
        # lookup, which for a bool looks for __adapt__ and __conform__ first (a third of binding a row).
        values = [
            value
            for r in records
            for value in (_stamp(r[0]), *r[1:13], 1 if r[13] else 0, *r[14:17], 1 if r[17] else 0)
        ]
        width = len(COLUMNS) * CHUNK_ROWS
        whole = len(values) - len(values) % width
        try:
            conn.execute("BEGIN IMMEDIATE")
            before = conn.total_changes
            for start in range(0, whole, width):
                conn.execute(_INSERT_CHUNK, values[start : start + width])
            if whole < len(values):  # the last rows: a statement of their own size (sqlite3 caches 128)
                conn.execute(_insert((len(values) - whole) // len(COLUMNS)), values[whole:])
            inserted = conn.total_changes - before
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            self._drop()  # a broken file or a full disk: open afresh next time
            raise
        return inserted

    def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = None

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        conn = self._connection()
        cursor = conn.execute(sql, params)
        cursor.row_factory = sqlite3.Row
        return cursor.fetchall()

    # ------------------------------------------------------------------ the interface

    async def open(self) -> None:
        await self._call(self._connection)

    async def write(self, records: Sequence[UsageRecord]) -> int:
        inserted: int = await self._call(self._write, records)
        return inserted

    async def records(self) -> list[UsageRecord]:
        rows = await self._call(self._query, f"SELECT {', '.join(COLUMNS)} FROM {TABLE} ORDER BY ts, request_id")
        booleans = ("estimated", "streamed")
        return [
            UsageRecord._make(
                _epoch(row["ts"]) if c == "ts" else bool(row[c]) if c in booleans else row[c] for c in COLUMNS
            )
            for row in rows
        ]

    async def totals(
        self, group_by: Sequence[str], since: float | None = None, until: float | None = None
    ) -> list[dict[str, Any]]:
        sql, params = totals_query(group_by, since, until, "substr(ts, 1, 10)", lambda _: "?", _stamp)
        rows = await self._call(self._query, sql, params)
        return [dict(row) for row in rows if row["requests"]]

    async def schema_version(self) -> int:
        rows = await self._call(self._query, f"SELECT coalesce(max(version), 0) AS v FROM {SCHEMA_TABLE}")
        return int(rows[0]["v"])

    async def close(self) -> None:
        await self._call(self._drop)
        self._thread.shutdown(wait=True)


def _epoch(text: str) -> float:
    return datetime.strptime(text, _TS).replace(tzinfo=UTC).timestamp()


def _wal(conn: sqlite3.Connection) -> None:
    """WAL mode, set once per file. Switching needs the file to itself, and SQLite answers "locked" at
    once there rather than through the busy handler: another worker or replica opening the file at the
    same moment is waited for here (this runs on the ledger's own thread)."""
    for attempt in range(50):
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal":
                return
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == 49:
                raise
            time.sleep(0.1)
