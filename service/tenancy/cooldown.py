"""Deployment cooldowns shared through Redis, so that every worker and replica benches a failing
deployment once any of them has.

    {llm-gateway}:cooldowns   sorted set: "<model>\\n<deployment>" -> when its cooldown ends (Redis ms)

A worker that benches a deployment adds it at once (one call, and only then: cooldowns are rare); one
that sees it answer again removes it. Every worker reads the set once a second, never per request, and
benches locally what others benched for what is left of their cooldown, or heals what they healed. A
Redis that cannot be reached only leaves each worker with its own view, as without Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable
from typing import Any

import redis.asyncio
import redis.exceptions

from gateway import metrics
from gateway.config import Config

from ..balancer import COOLDOWN, DeploymentState
from .redis import PREFIX

KEY = PREFIX + "cooldowns"
SYNC_INTERVAL = 1.0

# KEYS: the set; ARGV: member, seconds. Only ever lengthens a cooldown (GT).
COOL = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
redis.call('ZADD', KEYS[1], 'GT', now + tonumber(ARGV[2]) * 1000, ARGV[1])
return 1
"""
# KEYS: the set. Drops what has ended; returns member, milliseconds left, ...
READ = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local items = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
for i = 2, #items, 2 do
  items[i] = tostring(tonumber(items[i]) - now)
end
return items
"""

_FAILURES = (redis.exceptions.RedisError, OSError, asyncio.TimeoutError)


class CooldownSync:
    def __init__(self, url: str, timeout: float, states: Iterable[DeploymentState]) -> None:
        self._redis: Any = redis.asyncio.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, retry=None, health_check_interval=0
        )
        self._timeout = timeout
        self._cool = self._redis.register_script(COOL)
        self._read = self._redis.register_script(READ)
        self._errors = metrics.STATE_BACKEND_ERRORS.labels("redis")
        self._states = {_member(state): state for state in states}
        self._seen: set[str] = set()  # members in the set at the last read
        self._tasks: set[asyncio.Task[None]] = set()
        for state in self._states.values():
            state.shared = self
        self._loop = asyncio.get_running_loop().create_task(self._sync_forever())

    @classmethod
    def build(cls, config: Config, states: Iterable[DeploymentState]) -> CooldownSync | None:
        if not config.state.redis_url:
            return None
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # built outside the serving loop (a check, a test): nothing to sync
            return None
        return cls(config.state.redis_url, max(config.state.timeout, 0.5), states)

    # ------------------------------------------------------------------ this worker's transitions

    def cooled(self, state: DeploymentState, seconds: float) -> None:
        self._send(self._cool(keys=[KEY], args=[_member(state), seconds]))

    def healed(self, state: DeploymentState) -> None:
        self._send(self._redis.zrem(KEY, _member(state)))

    def _send(self, call: Any) -> None:
        task = asyncio.get_running_loop().create_task(self._guarded(call))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _guarded(self, call: Any) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                await call
        except _FAILURES:
            self._errors.inc()

    # ------------------------------------------------------------------ the others'

    async def _sync_forever(self) -> None:
        while True:
            await asyncio.sleep(SYNC_INTERVAL)
            try:
                async with asyncio.timeout(self._timeout):
                    items = await self._read(keys=[KEY])
            except _FAILURES:
                self._errors.inc()
                continue
            self.apply({items[i].decode(): float(items[i + 1]) / 1000 for i in range(0, len(items), 2)})

    def apply(self, cooling: dict[str, float]) -> None:
        """`cooling`: member -> seconds of cooldown left, as Redis holds them."""
        now = time.monotonic()
        for member, seconds in cooling.items():
            state = self._states.get(member)
            if state is not None:
                state.cool_remotely(seconds)
        for member in self._seen - cooling.keys():
            state = self._states.get(member)
            # Gone before its end: another worker saw it answer. (One that merely ended gets its trial.)
            if state is not None and state.state == COOLDOWN and state.cooldown_until > now + SYNC_INTERVAL:
                state.heal_remotely()
        self._seen = set(cooling)

    async def close(self) -> None:
        self._loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._loop
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._redis.aclose()


def _member(state: DeploymentState) -> str:
    return f"{state.model}\n{state.deployment.name}"
