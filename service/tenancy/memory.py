"""Limit state in this process: exact for one process. With `share` = 1/N (N workers, no Redis),
every limit is scaled by it, so the workers together enforce the configured limits."""

from __future__ import annotations

import time
from collections.abc import Sequence

from .state import (
    EPSILON_MS,
    MISSING,
    WINDOW_MS,
    BudgetCounter,
    Budgets,
    Charges,
    Level,
    SlotPool,
    Verdict,
)


class MemoryState:
    name = "memory"

    def __init__(self, share: float = 1.0) -> None:
        self.share = share
        self._tat: dict[str, float] = {}
        self._charged: dict[str, float] = {}
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
        now = time.monotonic() * 1000.0
        share = self.share
        tats = self._tat
        new_tats: list[float] = []
        levels: list[Level] = []
        for index, (bucket, cost) in enumerate(charges):
            limit = bucket.limit * share
            interval = WINDOW_MS / limit
            start = tats.get(bucket.id, now)
            if start < now:  # an idle bucket: full
                start = now
            # A reservation larger than this worker's share still passes when the bucket is full.
            debt = start - now + (cost if cost < limit else limit) * interval
            if debt > WINDOW_MS + EPSILON_MS:
                used = (start - now) / interval
                return Verdict(False, [], index, debt - WINDOW_MS, used, limit, self)
            new = start + cost * interval
            new_tats.append(new)
            ahead = new - now
            levels.append((limit, (WINDOW_MS - ahead) / interval, ahead))
        for index, pool in enumerate(pools):
            limit = max(1, int(pool.limit * share))
            held = self._slots.get(pool.id)
            if held is not None and len(held) >= limit:
                return Verdict(False, [], len(charges) + index, 1000.0, len(held), limit, self)
        if budgets:
            counters = self._budgets
            missing = tuple(counter for counter, _ in budgets if counter.id not in counters)
            if missing:
                return Verdict(False, [], MISSING, state=self, missing=missing)
            reserved = self._held
            for index, (counter, reserve) in enumerate(budgets):
                used, limit = counters[counter.id] + reserved.get(counter.id, 0), int(counter.limit * share)
                if used >= limit or used + reserve > limit:
                    failed = len(charges) + len(pools) + index
                    return Verdict(False, [], failed, counter.expire_ms - time.time() * 1000, used, limit, self)
            for counter, reserve in budgets:
                if reserve:
                    reserved[counter.id] = reserved.get(counter.id, 0) + reserve
                    self._holds[(counter.id, lease)] = reserve
        charged = self._charged
        for (bucket, cost), new in zip(charges, new_tats, strict=True):
            tats[bucket.id] = new
            charged[bucket.id] = charged.get(bucket.id, 0.0) + cost
        for pool in pools:
            self._slots.setdefault(pool.id, set()).add(lease)
        return Verdict(True, levels, -1, 0.0, 0.0, 0.0, self)

    def settle(self, adjustments: Charges, pools: Sequence[SlotPool], lease: str, budgets: Budgets = ()) -> None:
        counters = self._budgets
        for counter, cost in budgets:
            reserved = self._holds.pop((counter.id, lease), 0)
            if reserved:
                self._held[counter.id] -= reserved
            if counter.id in counters:  # a counter seeded afresh since has the ledger's word
                counters[counter.id] += cost
        tats, charged, share = self._tat, self._charged, self.share
        now = time.monotonic() * 1000.0 if adjustments else 0.0
        for bucket, delta in adjustments:
            tat = tats.get(bucket.id, now)
            tat = (tat if tat > now else now) + delta * WINDOW_MS / (bucket.limit * share)
            tats[bucket.id] = tat if tat > now else now
            charged[bucket.id] = charged.get(bucket.id, 0.0) + delta
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
        return self._charged.get(bucket_id, 0.0)

    def in_use(self, pool_id: str) -> int:
        return len(self._slots.get(pool_id, ()))
