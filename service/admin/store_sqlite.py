"""The key store in the SQLite ledger file, on the ledger backend's own thread and connection."""

from __future__ import annotations

import sqlite3

import orjson

from service.ledger.sqlite import SqliteLedger

from .store import TABLE, KeyExists, KeyStore, StoredKey

_SCHEMA = f"""CREATE TABLE IF NOT EXISTS {TABLE} (
    name TEXT PRIMARY KEY,
    sha256 TEXT NOT NULL UNIQUE,
    spec TEXT NOT NULL,
    created_at REAL NOT NULL,
    revoked_at REAL,
    changed REAL NOT NULL
)"""
_COLUMNS = "name, sha256, spec, created_at, revoked_at"


def _row(row: sqlite3.Row) -> StoredKey:
    return StoredKey(row["name"], row["sha256"], orjson.loads(row["spec"]), row["created_at"], row["revoked_at"])


class SqliteKeyStore(KeyStore):
    ledger: SqliteLedger

    def _conn(self) -> sqlite3.Connection:
        conn = self.ledger._connection()  # on the ledger's thread: its connection never crosses threads
        if not self._ready:
            conn.execute(_SCHEMA)
            self._ready = True
        return conn

    def _create(self, key: StoredKey) -> None:
        conn = self._conn()
        try:
            conn.execute(
                f"INSERT INTO {TABLE} ({_COLUMNS}, changed) VALUES (?, ?, ?, ?, NULL, ?)",
                (key.name, key.sha256, orjson.dumps(key.spec).decode(), key.created_at, key.created_at),
            )
        except sqlite3.IntegrityError:
            raise KeyExists(key.name) from None

    def _revoke(self, name: str, at: float) -> StoredKey | None:
        conn = self._conn()
        conn.execute(
            f"UPDATE {TABLE} SET revoked_at = ?, changed = ? WHERE name = ? AND revoked_at IS NULL", (at, at, name)
        )
        cursor = conn.execute(f"SELECT {_COLUMNS} FROM {TABLE} WHERE name = ?", (name,))
        cursor.row_factory = sqlite3.Row
        row = cursor.fetchone()
        return None if row is None else _row(row)

    def _keys(self, include_revoked: bool) -> list[StoredKey]:
        where = "" if include_revoked else " WHERE revoked_at IS NULL"
        cursor = self._conn().execute(f"SELECT {_COLUMNS} FROM {TABLE}{where} ORDER BY name")
        cursor.row_factory = sqlite3.Row
        return [_row(row) for row in cursor.fetchall()]

    def _version(self) -> tuple[int, float]:
        count, changed = self._conn().execute(f"SELECT count(*), coalesce(max(changed), 0) FROM {TABLE}").fetchone()
        return int(count), float(changed)

    async def create(self, key: StoredKey) -> None:
        await self.ledger._call(self._create, key)

    async def revoke(self, name: str, at: float) -> StoredKey | None:
        found: StoredKey | None = await self.ledger._call(self._revoke, name, at)
        return found

    async def keys(self, include_revoked: bool = False) -> list[StoredKey]:
        found: list[StoredKey] = await self.ledger._call(self._keys, include_revoked)
        return found

    async def version(self) -> tuple[int, float]:
        found: tuple[int, float] = await self.ledger._call(self._version)
        return found
