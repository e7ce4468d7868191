"""The usage ledger: a durable record of every call, in SQLite (the default) or PostgreSQL.

    usage:
      database: sqlite:///./llm-gateway-usage.db   # or postgresql://user:password@host:5432/db; "" is off

One interface (`base.Ledger`), one module per backend, and the writer that batches records off the
request path (`writer.LedgerWriter`).
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

from gateway.config import UsageConfig

from .base import GROUPS, SCHEMA_VERSION, Ledger, UsageRecord, redacted
from .writer import LedgerWriter


def open_ledger(url: str) -> Ledger:
    """The backend for a `usage.database` URL (validated by the config); nothing is connected yet."""
    scheme = urlsplit(url).scheme
    if scheme == "sqlite":
        from .sqlite import SqliteLedger

        return SqliteLedger(url)
    from .postgres import PostgresLedger

    return PostgresLedger(url)


# The writers running in this process, by their settings and loop: a config reload that keeps `usage`
# as it was shares the running writer (and what it holds while the database is away) with the new core.
_running: dict[tuple[UsageConfig, asyncio.AbstractEventLoop], LedgerWriter] = {}


def writer_for(usage: UsageConfig) -> LedgerWriter | None:
    """The started writer of the configured ledger, or None when it is off; give it back with `release`.
    Needs a running loop."""
    if not usage.database:
        return None
    key = (usage, asyncio.get_running_loop())
    writer = _running.get(key)
    if writer is None or writer.closing:
        writer = _running[key] = LedgerWriter(
            open_ledger(usage.database),
            redacted(usage.database),
            batch_size=usage.batch_size,
            flush_interval=usage.flush_interval,
            capacity=usage.buffer,
        )
        writer.start()
    writer.users += 1
    return writer


async def release(writer: LedgerWriter) -> None:
    """One user fewer; the last one's release writes what is left and closes the database."""
    writer.users -= 1
    if writer.users > 0:
        return
    for key, running in list(_running.items()):
        if running is writer:
            del _running[key]
    await writer.close()


__all__ = [
    "GROUPS",
    "SCHEMA_VERSION",
    "Ledger",
    "LedgerWriter",
    "UsageRecord",
    "open_ledger",
    "redacted",
    "release",
    "writer_for",
]
