"""The key store in the PostgreSQL ledger database, on the ledger backend's own connection. The table is
created under the ledger's advisory lock, so replicas starting together do not race on the catalog."""

from __future__ import annotations

from typing import Any

import asyncpg  # type: ignore[import-untyped]
import orjson

from service.ledger.postgres import LOCK_ID, PostgresLedger

from .store import TABLE, KeyExists, KeyStore, StoredKey

_SCHEMA = f"""CREATE TABLE IF NOT EXISTS {TABLE} (
    name text PRIMARY KEY,
    sha256 text NOT NULL UNIQUE,
    spec jsonb NOT NULL,
    created_at double precision NOT NULL,
    revoked_at double precision,
    changed double precision NOT NULL
)"""
_COLUMNS = "name, sha256, spec::text AS spec, created_at, revoked_at"


def _row(row: Any) -> StoredKey:
    return StoredKey(row["name"], row["sha256"], orjson.loads(row["spec"]), row["created_at"], row["revoked_at"])


class PostgresKeyStore(KeyStore):
    ledger: PostgresLedger

    async def _ensure(self, conn: asyncpg.Connection) -> None:
        if not self._ready:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", LOCK_ID)
                await conn.execute(_SCHEMA)
            self._ready = True

    async def create(self, key: StoredKey) -> None:
        async def insert(conn: asyncpg.Connection) -> None:
            await self._ensure(conn)
            await conn.execute(
                f"INSERT INTO {TABLE} (name, sha256, spec, created_at, revoked_at, changed)"
                " VALUES ($1, $2, $3::jsonb, $4, NULL, $4)",
                key.name,
                key.sha256,
                orjson.dumps(key.spec).decode(),
                key.created_at,
            )

        try:
            await self.ledger._run(insert)
        except asyncpg.UniqueViolationError:
            raise KeyExists(key.name) from None

    async def revoke(self, name: str, at: float) -> StoredKey | None:
        async def update(conn: asyncpg.Connection) -> Any:
            await self._ensure(conn)
            await conn.execute(
                f"UPDATE {TABLE} SET revoked_at = $1, changed = $1 WHERE name = $2 AND revoked_at IS NULL", at, name
            )
            return await conn.fetchrow(f"SELECT {_COLUMNS} FROM {TABLE} WHERE name = $1", name)

        row = await self.ledger._run(update)
        return None if row is None else _row(row)

    async def keys(self, include_revoked: bool = False) -> list[StoredKey]:
        where = "" if include_revoked else " WHERE revoked_at IS NULL"

        async def select(conn: asyncpg.Connection) -> Any:
            await self._ensure(conn)
            return await conn.fetch(f"SELECT {_COLUMNS} FROM {TABLE}{where} ORDER BY name")

        return [_row(row) for row in await self.ledger._run(select)]

    async def version(self) -> tuple[int, float]:
        async def select(conn: asyncpg.Connection) -> Any:
            await self._ensure(conn)
            return await conn.fetchrow(f"SELECT count(*) AS n, coalesce(max(changed), 0) AS c FROM {TABLE}")

        row = await self.ledger._run(select)
        return int(row["n"]), float(row["c"])
