"""Created keys into every replica's key table, within seconds of a change.

Each worker of each replica holds a `KeySync`. It loads the stored keys at start, and again whenever
they change: at once when another worker says so on Redis pub/sub (`state.redis_url` set), else (and
while Redis is away) by polling the store's version every POLL_INTERVAL seconds, a query that reads
two aggregates. The key table is rebuilt aside and swapped in one assignment (`Tenancy.set_keys`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from typing import Any

from gateway.config import ApiKeyConfig, Config, ConfigError, parse_api_key
from gateway.logs import get_logger

from ..tenancy import Tenancy
from .store import KeyStore, StoredKey, open_store

log = get_logger("admin")

CHANNEL = "{llm-gateway}:keys"
POLL_INTERVAL = 2.0  # seconds: how stale a replica's keys may be without Redis
# With pub/sub, a poll still runs this often, for a message lost while the subscription was down.
SUBSCRIBED_POLL = 30.0


def key_config(stored: StoredKey, config: Config) -> ApiKeyConfig:
    """A stored key as the key table holds it; raises ConfigError when it no longer fits the config."""
    spec = {"name": stored.name, "key_sha256": stored.sha256, **stored.spec}
    key = parse_api_key(f"admin key {stored.name}", spec, config.models)
    return dataclasses.replace(key, source="admin")


class KeySync:
    def __init__(self, config: Config, tenancy: Tenancy) -> None:
        self.store: KeyStore = open_store(config.usage.database)
        self._config = config
        self._tenancy = tenancy
        self._version: tuple[int, float] | None = None
        self._skipped: set[str] = set()
        self._failing = False  # the store could not be read at the last look (logged once per outage)
        self._redis_url = config.state.redis_url
        self._redis: Any = None  # redis.asyncio, imported only where Redis is configured (redis-py: ~5 MB a worker)
        self._redis_errors: tuple[type[BaseException], ...] = (OSError,)
        if self._redis_url:
            import redis.asyncio
            import redis.exceptions

            self._redis, self._redis_errors = redis.asyncio, (redis.exceptions.RedisError, OSError)
        self._publisher: Any = None
        self._lock = asyncio.Lock()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="key-sync")

    @classmethod
    def build(cls, config: Config, tenancy: Tenancy | None) -> KeySync | None:
        """Created keys apply where the admin API is on (a master key) and there is a database to hold them."""
        if tenancy is None or not config.auth.master_sha256 or not config.usage.database:
            return None
        return cls(config, tenancy)

    async def refresh(self) -> None:
        """Load the stored keys if they changed since the last look."""
        async with self._lock:
            version = await self.store.version()
            if version == self._version:
                return
            keys = []
            for stored in await self.store.keys():
                try:
                    keys.append(key_config(stored, self._config))
                except ConfigError as exc:
                    if stored.name not in self._skipped:
                        log.warning("a created key does not fit the config and is not in force", error=str(exc))
                        self._skipped.add(stored.name)
            self._tenancy.set_keys(keys)
            self._version = version
            log.debug("created keys loaded", keys=len(keys))

    async def changed(self) -> None:
        """After this worker changed the store: in force here now, and everywhere else told."""
        await self.refresh()
        if self._redis_url:
            try:
                if self._publisher is None:
                    self._publisher = self._redis.Redis.from_url(self._redis_url, socket_timeout=1.0)
                await self._publisher.publish(CHANNEL, b"changed")
            except self._redis_errors as exc:  # the others poll
                log.warning("key change not published; replicas see it at their next poll", error=type(exc).__name__)

    async def _refresh_or_keep(self) -> None:
        try:
            await self.refresh()
        except Exception as exc:  # the database is away: the keys loaded stay in force
            if not self._failing:
                log.warning("created keys cannot be read; the ones loaded stay in force", error=type(exc).__name__)
            self._failing = True
        else:
            if self._failing:
                log.warning("created keys can be read again")
            self._failing = False

    async def _run(self) -> None:
        while True:
            await self._refresh_or_keep()
            if self._redis_url:
                with contextlib.suppress(*self._redis_errors):
                    await self._listen()
            await asyncio.sleep(POLL_INTERVAL)

    async def _listen(self) -> None:
        """Refresh on every message; returns when the subscription fails (Redis away)."""
        client: Any = self._redis.Redis.from_url(self._redis_url, socket_connect_timeout=1.0)
        try:
            async with client.pubsub(ignore_subscribe_messages=True) as pubsub:
                await pubsub.subscribe(CHANNEL)
                await self._refresh_or_keep()  # what changed while unsubscribed
                while True:
                    await pubsub.get_message(timeout=SUBSCRIBED_POLL)
                    await self._refresh_or_keep()
        finally:
            await client.aclose()

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        if self._publisher is not None:
            with contextlib.suppress(Exception):
                await self._publisher.aclose()
        await self.store.close()
