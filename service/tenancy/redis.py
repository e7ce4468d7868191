"""Limit state in Redis, shared by every worker and replica.

One Lua script does a request's whole admission in one round trip, atomically: it first applies the
settlements this process has queued since its last call (so settling costs no round trip of its own
under load), purges expired slot leases, checks every bucket and pool, and takes them all or none. The
clock is Redis's own (TIME), so replicas with skewed clocks agree. Every key shares one hash tag, so
the script's keys live in one slot and it runs on Redis Cluster too.

    {llm-gateway}:b:<bucket id>   hash: t = the bucket's tat (ms), n = net units charged while it is not idle
    {llm-gateway}:s:<pool id>     sorted set: lease -> expiry (ms)
    {llm-gateway}:<budget id>     string: micro-dollars spent, "budget:key:<name>:2026-12" (the ledger's)
    {llm-gateway}:<budget id>:held   hash: lease -> micro-dollars reserved by a call in flight, "*" = their sum
    {llm-gateway}:<budget id>:exp    sorted set: lease -> when its hold ends (a dead replica's calls)

A bucket's hash expires a minute after it is full again, a pool's set once its last lease has expired,
a budget counter a day after its period.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Sequence
from typing import Any

import redis.asyncio
import redis.exceptions

from gateway.logs import get_logger

from .redis_pipe import RedisPipe
from .state import (
    MISSING,
    WINDOW_MS,
    Bucket,
    BudgetCounter,
    Budgets,
    Charges,
    Level,
    SlotPool,
    StateUnavailable,
    Verdict,
)

log = get_logger("tenancy")

PREFIX = "{llm-gateway}:"
# Queued settlements go out with the next admission, or after this many seconds when none comes.
SETTLE_DELAY = 0.01

# KEYS: admission buckets (nb), admission pools (np), settled buckets (nsb), released pools (nr),
#       (spent, held, expiry) * admission budgets (nbu), (spent, held, expiry) * settled budgets (nbs)
# ARGV: nb, np, nsb, nr, lease, lease_ms, nbu, nbs, then (interval, cost) * nb, limit * np,
#       (interval, delta) * nsb, lease * nr, (limit, reserve, expire_ms, hold_ms) * nbu, (cost, lease) * nbs
# Returns {1, debt...}, {0, failed index (1-based), retry ms, used}, or {2, index...} of the budget
# counters that are not there yet (to seed from the ledger); numbers as strings (a Lua number would
# come back truncated to an integer).
ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local nb, np, nsb, nr = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local lease, lease_ms = ARGV[5], tonumber(ARGV[6])
local nbu, nbs = tonumber(ARGV[7]), tonumber(ARGV[8])
local window = 60000
local function tat_of(key)
  local v = redis.call('HGET', key, 't')
  if v then return math.max(tonumber(v), now) end
  return now
end
local function store(key, tat, units)
  redis.call('HSET', key, 't', string.format('%.17g', tat))
  redis.call('HINCRBYFLOAT', key, 'n', units)
  redis.call('PEXPIRE', key, math.ceil(tat - now + window))
end
local a = 8 + 2 * nb + np
local k = nb + np
for i = 1, nsb do
  local key = KEYS[k + i]
  local interval, delta = tonumber(ARGV[a + 2 * i - 1]), tonumber(ARGV[a + 2 * i])
  store(key, math.max(tat_of(key) + delta * interval, now), delta)
end
a = a + 2 * nsb
k = k + nsb
for i = 1, nr do
  redis.call('ZREM', KEYS[k + i], ARGV[a + i])
end
a = a + nr
k = k + nr
local ba, bk = a, k
a = a + 4 * nbu
k = k + 3 * nbu
local function release(held, expiry, holder)
  local amount = redis.call('HGET', held, holder)
  if amount then
    redis.call('HINCRBY', held, '*', -tonumber(amount))
    redis.call('HDEL', held, holder)
    redis.call('ZREM', expiry, holder)
  end
end
for i = 1, nbs do
  release(KEYS[k + 3 * i - 1], KEYS[k + 3 * i], ARGV[a + 2 * i])
  -- a counter that is gone (a restarted Redis) is seeded from the ledger, which has this cost
  if redis.call('EXISTS', KEYS[k + 3 * i - 2]) == 1 then
    redis.call('INCRBY', KEYS[k + 3 * i - 2], ARGV[a + 2 * i - 1])
  end
end
local news = {}
for i = 1, nb do
  local interval, cost = tonumber(ARGV[7 + 2 * i]), tonumber(ARGV[8 + 2 * i])
  local tat = tat_of(KEYS[i])
  local new = tat + cost * interval
  if new - now > window + 0.000001 then
    return {0, i, string.format('%.17g', new - now - window), string.format('%.17g', (tat - now) / interval)}
  end
  news[i] = new
end
for j = 1, np do
  local key = KEYS[nb + j]
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  local held = redis.call('ZCARD', key)
  if held >= tonumber(ARGV[8 + 2 * nb + j]) then
    return {0, nb + j, '1000', tostring(held)}
  end
end
if nbu > 0 then
  local missing, used = {2}, {}
  for i = 1, nbu do
    local spent, held, expiry = KEYS[bk + 3 * i - 2], KEYS[bk + 3 * i - 1], KEYS[bk + 3 * i]
    -- holds of calls a dead replica never settled end with their lease
    for _, holder in ipairs(redis.call('ZRANGEBYSCORE', expiry, '-inf', now)) do release(held, expiry, holder) end
    local value = redis.call('GET', spent)
    if value then
      used[i] = tonumber(value) + tonumber(redis.call('HGET', held, '*') or '0')
    else
      missing[#missing + 1] = i
    end
  end
  if #missing > 1 then return missing end
  for i = 1, nbu do
    local limit, reserve = tonumber(ARGV[ba + 4 * i - 3]), tonumber(ARGV[ba + 4 * i - 2])
    if used[i] >= limit or used[i] + reserve > limit then
      return {0, nb + np + i, string.format('%.17g', tonumber(ARGV[ba + 4 * i - 1]) - now), tostring(used[i])}
    end
  end
end
local out = {1}
for i = 1, nb do
  store(KEYS[i], news[i], tonumber(ARGV[8 + 2 * i]))
  out[i + 1] = string.format('%.17g', news[i] - now)
end
for j = 1, np do
  redis.call('ZADD', KEYS[nb + j], now + lease_ms, lease)
  redis.call('PEXPIRE', KEYS[nb + j], math.ceil(lease_ms))
end
for i = 1, nbu do
  local held, expiry, reserve = KEYS[bk + 3 * i - 1], KEYS[bk + 3 * i], tonumber(ARGV[ba + 4 * i - 2])
  if reserve > 0 then
    redis.call('HSET', held, lease, reserve)
    redis.call('HINCRBY', held, '*', reserve)
    redis.call('ZADD', expiry, now + tonumber(ARGV[ba + 4 * i]), lease)
    redis.call('PEXPIREAT', held, ARGV[ba + 4 * i - 1])
    redis.call('PEXPIREAT', expiry, ARGV[ba + 4 * i - 1])
  end
end
return out
"""

# KEYS: pools; ARGV: lease_ms, then the lease held in each pool. Only leases still held are renewed.
RENEW = """
local t = redis.call('TIME')
local expiry = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000 + tonumber(ARGV[1])
for i = 1, #KEYS do
  if redis.call('ZADD', KEYS[i], 'XX', 'CH', expiry, ARGV[i + 1]) == 1 then
    redis.call('PEXPIRE', KEYS[i], math.ceil(tonumber(ARGV[1])))
  end
end
return #KEYS
"""

_FAILURES = (redis.exceptions.RedisError, OSError, asyncio.TimeoutError)


def _number(value: float) -> bytes:
    return b"%d" % value if value == int(value) else repr(value).encode()


def _bulk(value: bytes) -> bytes:
    """A RESP bulk string."""
    return b"$%d\r\n%s\r\n" % (len(value), value)


_COUNTS = tuple(_bulk(b"%d" % n) for n in range(64))
_EMPTY = _bulk(b"")


def _count(n: int) -> bytes:
    return _COUNTS[n] if n < 64 else _bulk(b"%d" % n)


def _unavailable(exc: BaseException) -> StateUnavailable:
    slow = isinstance(exc, (asyncio.TimeoutError, redis.exceptions.TimeoutError))
    return StateUnavailable(type(exc).__name__, timeout=slow)


class RedisState:
    name = "redis"

    def __init__(self, url: str, timeout: float, lease_seconds: float, hold_seconds: float = 660.0) -> None:
        # The client's own timeouts bound every call; no retries: a slow Redis means the in-process
        # limiter answers this request, not a second wait.
        self._redis: Any = redis.asyncio.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry_on_timeout=False,
            retry=None,
            health_check_interval=0,
        )
        self._timeout = timeout
        self._pipe = RedisPipe(url, timeout)  # the admissions' connection
        sha = hashlib.sha1(ADMIT.encode()).hexdigest().encode()
        self._evalsha_head = _bulk(b"EVALSHA") + _bulk(sha)
        self._encoded: dict[str, tuple[bytes, bytes]] = {}
        self._budgets: dict[BudgetCounter, tuple[bytes, bytes, bytes, bytes, bytes]] = {}
        self._lease_arg = _bulk(_number(lease_seconds * 1000.0))
        # How long a budget reservation holds unless settled: longer than a call may run.
        self._hold_arg = _bulk(b"%d" % int(hold_seconds * 1000))
        self._renew = self._redis.register_script(RENEW)
        self._lease_ms = lease_seconds * 1000.0
        self._lease_seconds = lease_seconds
        self._settles: list[tuple[Bucket, float]] = []
        self._releases: list[tuple[SlotPool, str]] = []
        self._budget_settles: list[tuple[BudgetCounter, int, str]] = []
        self._flush: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._renewer: asyncio.Task[None] | None = None
        # Leases held by calls in flight in this process, renewed together every third of the lease.
        self._leases: dict[str, Sequence[SlotPool]] = {}
        self.on_failure: Any = None  # set by the failover wrapper: called with the exception

    async def warm(self, connections: int = 4) -> None:
        """Open a few pooled connections and load the scripts, so that the first requests do not pay a
        connect and a NOSCRIPT round trip inside their short timeout. Failures are left to the first call."""
        with contextlib.suppress(*_FAILURES):
            async with asyncio.timeout(max(1.0, self._timeout)):
                await asyncio.gather(*(self._redis.ping() for _ in range(connections)))
                await self._redis.script_load(ADMIT)
                await self._redis.script_load(RENEW)
                await self._pipe.connect()

    async def reconnect(self) -> None:
        """Back from an outage: drop the pooled connections (a restarted server closed them all) and warm
        up fresh ones, the scripts loaded again."""
        with contextlib.suppress(*_FAILURES):
            await self._redis.connection_pool.disconnect()
        await self._pipe.reset()
        await self.warm()

    async def ping(self) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                await self._redis.ping()
        except _FAILURES as exc:
            raise _unavailable(exc) from None

    async def admit(self, charges: Charges, pools: Sequence[SlotPool], lease: str, budgets: Budgets = ()) -> Verdict:
        settles, releases, spends = self._settles, self._releases, self._budget_settles
        if settles or releases or spends:
            self._settles, self._releases, self._budget_settles = [], [], []
        # The command is packed here, RESP and all, from bulk strings packed once per bucket, pool and
        # counter: redis-py's own packing of the ~20 arguments cost more CPU than the round trip itself.
        keys: list[bytes] = []
        args: list[bytes] = [
            _count(len(charges)),
            _count(len(pools)),
            _count(len(settles)),
            _count(len(releases)),
            _bulk(lease.encode()) if lease else _EMPTY,
            self._lease_arg,
            _count(len(budgets)),
            _count(len(spends)),
        ]
        for bucket, cost in charges:
            key, per_unit = self._bucket(bucket)
            keys.append(key)
            args += (per_unit, _bulk(_number(cost)))
        for pool in pools:
            key, limit = self._pool(pool)
            keys.append(key)
            args.append(limit)
        for bucket, delta in settles:
            key, per_unit = self._bucket(bucket)
            keys.append(key)
            args += (per_unit, _bulk(_number(delta)))
        for pool, held in releases:
            keys.append(self._pool(pool)[0])
            args.append(_bulk(held.encode()))
        for counter, reserve in budgets:
            spent, holds, expiry, limit, expire = self._budget(counter)
            keys += (spent, holds, expiry)
            args += (limit, _bulk(b"%d" % reserve), expire, self._hold_arg)
        for counter, cost, holder in spends:
            keys += self._budget(counter)[:3]
            args += (_bulk(b"%d" % cost), _bulk(holder.encode()))
        packed = b"".join(
            (b"*%d\r\n" % (3 + len(keys) + len(args)), self._evalsha_head, _count(len(keys)), *keys, *args)
        )
        try:
            # The pipe's own timer bounds the call (no asyncio.timeout: three getpid() calls on 3.11).
            try:
                reply = await self._pipe.call(packed)
            except redis.exceptions.NoScriptError:
                await self._load_admit()  # a restarted or flushed Redis
                reply = await self._pipe.call(packed)
        except _FAILURES as exc:
            # The queued settlements are dropped, never sent twice: leases expire on their own, and a lost
            # refund only errs on the strict side.
            raise _unavailable(exc) from None
        answer = int(reply[0])
        if answer == 2:
            return Verdict(False, [], MISSING, state=self, missing=tuple(budgets[int(i) - 1][0] for i in reply[1:]))
        if answer != 1:
            failed = int(reply[1]) - 1
            if failed < len(charges):
                bucket = charges[failed][0]
                return Verdict(False, [], failed, float(reply[2]), float(reply[3]), bucket.limit, self)
            if failed < len(charges) + len(pools):
                pool = pools[failed - len(charges)]
                return Verdict(False, [], failed, float(reply[2]), float(reply[3]), pool.limit, self)
            counter = budgets[failed - len(charges) - len(pools)][0]
            return Verdict(False, [], failed, float(reply[2]), float(reply[3]), counter.limit, self)
        if pools:
            self._leases[lease] = pools
            if self._renewer is None:  # started with the first slot held, on the serving loop
                self._renewer = asyncio.get_running_loop().create_task(self._renew_forever())
        levels: list[Level] = []
        for (bucket, _), debt in zip(charges, reply[1:], strict=True):
            reset = float(debt)
            interval = WINDOW_MS / bucket.limit
            levels.append((bucket.limit, (WINDOW_MS - reset) / interval, reset))
        return Verdict(True, levels, state=self)

    def _bucket(self, bucket: Bucket) -> tuple[bytes, bytes]:
        encoded = self._encoded.get(bucket.id)
        if encoded is None:
            encoded = self._encoded[bucket.id] = (
                _bulk((PREFIX + "b:" + bucket.id).encode()),
                _bulk(_number(WINDOW_MS / bucket.limit)),
            )
        return encoded

    def _budget(self, counter: BudgetCounter) -> tuple[bytes, bytes, bytes, bytes, bytes]:
        encoded = self._budgets.get(counter)
        if encoded is None:  # once per counter (a budget's period and limit: a reload may change the limit)
            key = (PREFIX + counter.id).encode()
            encoded = self._budgets[counter] = (
                _bulk(key),
                _bulk(key + b":held"),
                _bulk(key + b":exp"),
                _bulk(b"%d" % counter.limit),
                _bulk(b"%d" % counter.expire_ms),
            )
        return encoded

    def _pool(self, pool: SlotPool) -> tuple[bytes, bytes]:
        encoded = self._encoded.get(pool.id)
        if encoded is None:
            encoded = self._encoded[pool.id] = (
                _bulk((PREFIX + "s:" + pool.id).encode()),
                _bulk(b"%d" % pool.limit),
            )
        return encoded

    async def _load_admit(self) -> None:
        async with asyncio.timeout(max(self._timeout, 1.0)):
            await self._redis.script_load(ADMIT)

    def settle(self, adjustments: Charges, pools: Sequence[SlotPool], lease: str, budgets: Budgets = ()) -> None:
        if pools:
            self._leases.pop(lease, None)
            self._releases += [(pool, lease) for pool in pools]
        self._settles += [(bucket, delta) for bucket, delta in adjustments if delta]
        self._budget_settles += [(counter, cost, lease) for counter, cost in budgets]
        if (self._settles or self._releases or self._budget_settles) and self._flush is None:
            self._flush = asyncio.get_running_loop().call_later(SETTLE_DELAY, self._flush_now)

    def _flush_now(self) -> None:
        self._flush = None
        if self._settles or self._releases or self._budget_settles:
            task = asyncio.get_running_loop().create_task(self._send_settlements())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send_settlements(self) -> None:
        try:
            await self.admit((), (), "")
        except StateUnavailable as exc:
            if self.on_failure is not None:
                self.on_failure(exc)

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self._lease_seconds / 3)
            if not self._leases:
                continue
            held = [(pool, lease) for lease, pools in self._leases.items() for pool in pools]
            keys = [PREFIX + "s:" + pool.id for pool, _ in held]
            try:
                async with asyncio.timeout(self._timeout):
                    await self._renew(keys, [self._lease_ms, *(lease for _, lease in held)])
            except _FAILURES as exc:
                if self.on_failure is not None:
                    self.on_failure(_unavailable(exc))

    async def seed(self, values: Budgets, overwrite: bool) -> None:
        """SET each counter (NX unless `overwrite`), expiring a day after its period: one pipeline."""
        if not values:
            return
        try:
            async with asyncio.timeout(max(self._timeout, 1.0)):
                async with self._redis.pipeline(transaction=False) as pipe:
                    for counter, spent in values:
                        pipe.set(PREFIX + counter.id, spent, pxat=counter.expire_ms, nx=not overwrite)
                    await pipe.execute()
        except _FAILURES as exc:
            raise _unavailable(exc) from None

    async def spent(self, counters: Sequence[BudgetCounter]) -> list[int | None]:
        if not counters:
            return []
        try:
            async with asyncio.timeout(max(self._timeout, 1.0)):
                async with self._redis.pipeline(transaction=True) as pipe:
                    for counter in counters:
                        pipe.get(PREFIX + counter.id)
                        pipe.hget(PREFIX + counter.id + ":held", "*")
                    values = await pipe.execute()
        except _FAILURES as exc:
            raise _unavailable(exc) from None
        spent, held = values[0::2], values[1::2]
        return [None if value is None else int(value) + int(hold or 0) for value, hold in zip(spent, held, strict=True)]

    async def charged(self, bucket_id: str) -> float:
        """Net units charged to a bucket while it has not been idle for a minute."""
        value = await self._redis.hget(PREFIX + "b:" + bucket_id, "n")
        return float(value or 0)

    async def in_use(self, pool_id: str) -> int:
        key = PREFIX + "s:" + pool_id
        now_s, now_us = await self._redis.time()
        return int(await self._redis.zcount(key, now_s * 1000 + now_us / 1000, "+inf"))

    async def close(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        if self._settles or self._releases or self._budget_settles:
            await self._send_settlements()
        if self._renewer is not None:
            self._renewer.cancel()
        await asyncio.gather(*self._tasks, *(t for t in (self._renewer,) if t), return_exceptions=True)
        await self._pipe.close()
        await self._redis.aclose()
