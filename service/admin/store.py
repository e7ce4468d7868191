"""The admin API's key store: created keys in the ledger's database, one row each, the secret only as its
SHA-256. One interface, one module per backend (`store_sqlite`, `store_postgres`), each on the ledger
backend's own connection and thread, so the usage queries and the keys share them.

    llm_gateway_keys(name PRIMARY KEY, sha256 UNIQUE, spec JSON, created_at, revoked_at, changed)

`changed` is the time of a row's last change (created, revoked): `version()` is the row count and the
latest change, one index-only query, so a replica polling for changes every two seconds pays next to
nothing until something changes. A revoked key keeps its row (and its name), for the record.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from service.ledger import Ledger, open_ledger

TABLE = "llm_gateway_keys"


@dataclass(frozen=True, slots=True)
class StoredKey:
    name: str
    sha256: str  # hex
    spec: dict[str, Any]  # models, limits, budget, metadata: as the config's auth.keys[] holds them
    created_at: float  # epoch seconds
    revoked_at: float | None = None


class KeyExists(Exception):
    """A key with that name or secret is stored already."""


class KeyStore(ABC):
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger  # the usage queries go to it too
        self._ready = False

    @abstractmethod
    async def create(self, key: StoredKey) -> None:
        """Insert; raises KeyExists when the name or the digest is taken (revoked keys included)."""

    @abstractmethod
    async def revoke(self, name: str, at: float) -> StoredKey | None:
        """Mark it revoked (once: a second revoke changes nothing); None when no such key."""

    @abstractmethod
    async def keys(self, include_revoked: bool = False) -> list[StoredKey]: ...

    @abstractmethod
    async def version(self) -> tuple[int, float]:
        """Changes whenever a key is created or revoked."""

    async def close(self) -> None:
        await self.ledger.close()


def open_store(url: str) -> KeyStore:
    """The key store in the database of a `usage.database` URL; nothing is connected yet."""
    ledger = open_ledger(url)
    if urlsplit(url).scheme == "sqlite":
        from .store_sqlite import SqliteKeyStore

        return SqliteKeyStore(ledger)
    from .store_postgres import PostgresKeyStore

    return PostgresKeyStore(ledger)
