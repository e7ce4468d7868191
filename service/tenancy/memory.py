"""Limit state in this process: exact for one process. With `share` = 1/N (N workers, no Redis),
every limit is scaled by it, so the workers together enforce the configured limits."""

from __future__ import annotations

import time
from collections.abc import Sequence

from .state import (
    EPSILON_MS,
    MISSING,
    WINDOW_MS,
    Bucket,
    BudgetCounter,
    Budgets,
    Charges,
    Level,
    SlotPool,
    Verdict,
)

_monotonic = time.monotonic  # a module global, not an attribute of `time`, read per request


class _Rate:
    """One bucket in this process: its GCRA state, with its limit and interval worked out once, not per request."""

    __slots__ = ("bucket", "charged", "interval", "limit", "prev", "prev_charged", "tat")

    def __init__(self, bucket: Bucket, share: float, tat: float, charged: float) -> None:
        self.bucket = bucket  # a reload's Bucket of the same id (its limit may differ) is worked out anew
        self.limit = limit = bucket.limit * share
        self.interval = WINDOW_MS / limit
        self.tat = self.prev = tat  # 0.0: idle, so full (any monotonic `now` is past it)
        self.charged = self.prev_charged = charged


class MemoryState:
    name = "memory"

    def __init__(self, share: float = 1.0) -> None:
        self.share = share
        self._rates: dict[str, _Rate] = {}  # bucket id -> its state
        self._slots: dict[str, set[str]] = {}
        self._budgets: dict[str, int] = {}  # budget counter id -> micro-dollars spent (this process's share)
        self._held: dict[str, int] = {}  # budget counter id -> micro-dollars reserved by calls in flight
        self._holds: dict[tuple[str, str], int] = {}  # (counter id, lease) -> its reservation
        self._expiry: dict[str, int] = {}  # budget counter id -> epoch ms when its period is long over

    async def close(self) -> None:
        return None

    async def admit(self, charges: Charges, pools: Sequence[SlotPool], lease: str, budgets: Budgets = ()) -> Verdict:
        return self.admit_now(charges, pools, lease, budgets)

    def admit_now(self, charges: Charges, pools: Sequence[SlotPool], lease: str, budgets: Budgets = ()) -> Verdict:
        taken = self.take(charges, pools, lease, budgets)
        return Verdict(True, taken, state=self) if isinstance(taken, list) else taken

    def _rate(self, bucket: Bucket) -> _Rate:
        old = self._rates.get(bucket.id)
        rate = self._rates[bucket.id] = _Rate(bucket, self.share, *((old.tat, old.charged) if old else (0.0, 0.0)))
        return rate

    def take(
        self, charges: Charges, pools: Sequence[SlotPool], lease: str, budgets: Budgets = ()
    ) -> list[Level] | Verdict:
        """As `admit_now`, but an admission returns its levels alone (one per charge): the common case
        builds no Verdict. A rejection returns its Verdict, and has taken nothing."""
        now = _monotonic() * 1000.0
        rates = self._rates
        levels: list[Level] = []
        for bucket, cost in charges:
            rate = rates.get(bucket.id)
            if rate is None or rate.bucket is not bucket:  # first seen, or a reload's bucket
                rate = self._rate(bucket)
            start = tat = rate.tat
            if start < now:  # an idle bucket: full
                start = now
            limit = rate.limit
            interval = rate.interval
            # A reservation larger than this worker's share still passes when the bucket is full.
            debt = start - now + (cost if cost < limit else limit) * interval
            if debt > WINDOW_MS + EPSILON_MS:
                failed = len(levels)  # one level per charge taken so far
                self._undo(charges, failed)
                return Verdict(False, [], failed, debt - WINDOW_MS, (start - now) / interval, limit, self)
            # Taken at once, undone if a later charge fails (rare): no second loop to commit them.
            rate.prev = tat
            rate.tat = new = start + cost * interval
            rate.prev_charged = charged = rate.charged
            rate.charged = charged + cost
            ahead = new - now
            levels.append((limit, (WINDOW_MS - ahead) / interval, ahead))
        if pools:
            for index, pool in enumerate(pools):
                limit = max(1, int(pool.limit * self.share))
                held = self._slots.get(pool.id)
                if held is not None and len(held) >= limit:
                    self._undo(charges, len(levels))
                    return Verdict(False, [], len(charges) + index, 1000.0, len(held), limit, self)
        if budgets:
            counters = self._budgets
            missing = tuple(counter for counter, _ in budgets if counter.id not in counters)
            if missing:
                self._undo(charges, len(levels))
                return Verdict(False, [], MISSING, state=self, missing=missing)
            reserved = self._held
            share = self.share
            for index, (counter, reserve) in enumerate(budgets):
                used, limit = counters[counter.id] + reserved.get(counter.id, 0), int(counter.limit * share)
                if used >= limit or used + reserve > limit:
                    self._undo(charges, len(levels))
                    failed = len(charges) + len(pools) + index
                    return Verdict(False, [], failed, counter.expire_ms - time.time() * 1000, used, limit, self)
            for counter, reserve in budgets:
                if reserve:
                    reserved[counter.id] = reserved.get(counter.id, 0) + reserve
                    self._holds[(counter.id, lease)] = reserve
        for pool in pools:
            self._slots.setdefault(pool.id, set()).add(lease)
        return levels

    def _undo(self, charges: Charges, taken: int) -> None:
        """A rejection takes nothing: the first `taken` charges go back as they were."""
        rates = self._rates
        for bucket, _ in charges[:taken]:
            rate = rates[bucket.id]
            rate.tat, rate.charged = rate.prev, rate.prev_charged

    def settle(self, adjustments: Charges, pools: Sequence[SlotPool], lease: str, budgets: Budgets = ()) -> None:
        if budgets:
            counters = self._budgets
            for counter, cost in budgets:
                reserved = self._holds.pop((counter.id, lease), 0)
                if reserved:
                    self._held[counter.id] -= reserved
                if counter.id in counters:  # a counter seeded afresh since has the ledger's word
                    counters[counter.id] += cost
        if adjustments:
            rates = self._rates
            now = _monotonic() * 1000.0
            for bucket, delta in adjustments:
                rate = rates.get(bucket.id)
                if rate is None or rate.bucket is not bucket:
                    rate = self._rate(bucket)
                tat = rate.tat
                tat = (tat if tat > now else now) + delta * rate.interval
                rate.tat = tat if tat > now else now
                rate.charged += delta
        for pool in pools:
            held = self._slots.get(pool.id)
            if held is not None:
                held.discard(lease)

    async def seed(self, values: Budgets, overwrite: bool) -> None:
        counters = self._budgets
        for counter, spent in values:
            if overwrite or counter.id not in counters:
                counters[counter.id] = round(spent * self.share)  # each of N workers holds its share
        if len(counters) > 4 * len(values) + 1024:  # counters of past periods: dropped now and then
            now_ms = time.time() * 1000
            self._expiry = {k: v for k, v in self._expiry.items() if v > now_ms}
            for key in [k for k in counters if k not in self._expiry]:
                del counters[key]
        for counter, _ in values:
            self._expiry[counter.id] = counter.expire_ms

    async def spent(self, counters: Sequence[BudgetCounter]) -> list[int | None]:
        out: list[int | None] = []
        for counter in counters:
            value = self._budgets.get(counter.id)
            out.append(None if value is None else value + self._held.get(counter.id, 0))
        return out

    def charged(self, bucket_id: str) -> float:
        """Net units charged to a bucket since this process started (reservations, then settlements)."""
        rate = self._rates.get(bucket_id)
        return rate.charged if rate is not None else 0.0

    def in_use(self, pool_id: str) -> int:
        return len(self._slots.get(pool_id, ()))
