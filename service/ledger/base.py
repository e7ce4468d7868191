"""The usage ledger's record, its schema, and the interface each database backend implements.

One table, `llm_gateway_usage`, one row per chat or embedding call (failed ones included), and
`llm_gateway_schema`, the schema version. A record's identity is its request id, its attempt count
and its start time: a batch written again (after a timeout whose commit did land) inserts nothing
twice (`ON CONFLICT DO NOTHING`), and a client that reuses an `x-request-id` still gets a row per call.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, NamedTuple
from urllib.parse import urlsplit, urlunsplit

TABLE = "llm_gateway_usage"
SCHEMA_TABLE = "llm_gateway_schema"


class UsageRecord(NamedTuple):
    """One call. Built on the request path, so a plain tuple; the backend converts the time."""

    ts: float  # start, seconds since the epoch (UTC)
    request_id: str
    attempts: int  # upstream attempts made, retries and fallbacks included; 0: none was made
    kind: str  # "chat" or "embedding"
    key_name: str  # the gateway key's name; "none" when auth is off
    team: str  # the key's metadata.team, or ""
    model: str  # the model asked for
    served_model: str  # the configured model that answered (a fallback, maybe); "" when none did
    provider: str
    deployment: str
    prompt_tokens: int
    cached_tokens: int  # the part of prompt_tokens read from the provider's cache
    completion_tokens: int  # reasoning tokens included
    estimated: bool  # the usage was estimated by the gateway, the upstream reported none
    cost_micro: int  # USD * 1_000_000
    latency_ms: float
    status: int  # the HTTP status the client got (499: the client left)
    streamed: bool


COLUMNS = UsageRecord._fields
GROUPS = ("key_name", "team", "model", "provider", "day")


def utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


# Schema versions in order; each is the statements that take a database from the one before to it.
MIGRATIONS: dict[str, list[list[str]]] = {
    "postgresql": [
        [
            f"""CREATE TABLE {TABLE} (
                ts timestamptz NOT NULL,
                request_id text NOT NULL,
                attempts integer NOT NULL,
                kind text NOT NULL,
                key_name text NOT NULL,
                team text NOT NULL,
                model text NOT NULL,
                served_model text NOT NULL,
                provider text NOT NULL,
                deployment text NOT NULL,
                prompt_tokens bigint NOT NULL,
                cached_tokens bigint NOT NULL,
                completion_tokens bigint NOT NULL,
                estimated boolean NOT NULL,
                cost_micro bigint NOT NULL,
                latency_ms double precision NOT NULL,
                status integer NOT NULL,
                streamed boolean NOT NULL,
                PRIMARY KEY (request_id, attempts, ts)
            )""",
            f"CREATE INDEX {TABLE}_ts ON {TABLE} (ts)",
            f"CREATE INDEX {TABLE}_key_ts ON {TABLE} (key_name, ts)",
        ],
    ],
    "sqlite": [
        [
            f"""CREATE TABLE {TABLE} (
                ts TEXT NOT NULL,
                request_id TEXT NOT NULL,
                attempts INTEGER NOT NULL,
                kind TEXT NOT NULL,
                key_name TEXT NOT NULL,
                team TEXT NOT NULL,
                model TEXT NOT NULL,
                served_model TEXT NOT NULL,
                provider TEXT NOT NULL,
                deployment TEXT NOT NULL,
                prompt_tokens INTEGER NOT NULL,
                cached_tokens INTEGER NOT NULL,
                completion_tokens INTEGER NOT NULL,
                estimated INTEGER NOT NULL,
                cost_micro INTEGER NOT NULL,
                latency_ms REAL NOT NULL,
                status INTEGER NOT NULL,
                streamed INTEGER NOT NULL,
                PRIMARY KEY (request_id, attempts, ts)
            ) WITHOUT ROWID""",
            f"CREATE INDEX {TABLE}_ts ON {TABLE} (ts)",
            f"CREATE INDEX {TABLE}_key_ts ON {TABLE} (key_name, ts)",
        ],
    ],
}
SCHEMA_VERSION = len(MIGRATIONS["postgresql"])


class Ledger(ABC):
    """A database holding usage records. Methods may raise any exception while the database is away;
    the writer keeps the records and tries again."""

    dialect: str

    @abstractmethod
    async def open(self) -> None:
        """Connect, and create or migrate the schema (safe when other replicas do it at the same time)."""

    @abstractmethod
    async def write(self, records: Sequence[UsageRecord]) -> int:
        """Insert in one transaction, skipping records already there; the number inserted."""

    @abstractmethod
    async def records(self) -> list[UsageRecord]:
        """Every record, oldest first."""

    @abstractmethod
    async def totals(
        self, group_by: Sequence[str], since: float | None = None, until: float | None = None
    ) -> list[dict[str, Any]]:
        """Requests, tokens and cost summed by some of GROUPS, for calls started in [since, until)."""

    @abstractmethod
    async def schema_version(self) -> int: ...

    @abstractmethod
    async def close(self) -> None: ...


SUMS = (
    "count(*) AS requests, sum(prompt_tokens) AS prompt_tokens, sum(cached_tokens) AS cached_tokens, "
    "sum(completion_tokens) AS completion_tokens, sum(cost_micro) AS cost_micro"
)


def totals_query(
    group_by: Sequence[str],
    since: float | None,
    until: float | None,
    day: str,
    placeholder: Callable[[int], str],
    stamp: Callable[[float], Any],
) -> tuple[str, list[Any]]:
    """`Ledger.totals`'s SQL in a dialect: its expression for a row's UTC day, its n-th parameter, its times."""
    for name in group_by:
        if name not in GROUPS:
            raise ValueError(f"cannot group usage by {name!r} (one of {', '.join(GROUPS)})")
    columns = [f"{day} AS day" if name == "day" else name for name in group_by]
    where, params = [], []
    for op, bound in ((">=", since), ("<", until)):
        if bound is not None:
            params.append(stamp(bound))
            where.append(f"ts {op} {placeholder(len(params))}")
    sql = f"SELECT {', '.join([*columns, SUMS])} FROM {TABLE}"
    if where:
        sql += " WHERE " + " AND ".join(where)
    if group_by:
        sql += f" GROUP BY {', '.join(group_by)} ORDER BY {', '.join(group_by)}"
    return sql, params


def redacted(url: str) -> str:
    """A database URL fit for a log line: the password replaced."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
