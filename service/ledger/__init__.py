"""The usage ledger: a durable record of every call, in SQLite (the default) or PostgreSQL.

    usage:
      database: sqlite:///./llm-gateway-usage.db   # or postgresql://user:password@host:5432/db; "" is off

One interface (`base.Ledger`), one module per backend, and the writer that batches records off the
request path (`writer.LedgerWriter`).
"""

from __future__ import annotations

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


def writer_for(usage: UsageConfig) -> LedgerWriter | None:
    """The started writer of the configured ledger, or None when it is off. Needs a running loop."""
    if not usage.database:
        return None
    writer = LedgerWriter(
        open_ledger(usage.database),
        redacted(usage.database),
        batch_size=usage.batch_size,
        flush_interval=usage.flush_interval,
        capacity=usage.buffer,
    )
    writer.start()
    return writer


__all__ = ["GROUPS", "SCHEMA_VERSION", "Ledger", "LedgerWriter", "UsageRecord", "open_ledger", "redacted", "writer_for"]
