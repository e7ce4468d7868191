"""Limit state in this process: exact for one process. With `share` = 1/N (N workers, no Redis),
every limit is scaled by it, so the workers together enforce the configured limits."""

from __future__ import annotations

import time
from collections.abc import Sequence

from .state import EPSILON_MS, WINDOW_MS, Charges, Level, SlotPool, Verdict


class MemoryState:
    name = "memory"

    def __init__(self, share: float = 1.0) -> None:
        self.share = share
        self._tat: dict[str, float] = {}
        self._charged: dict[str, float] = {}
        self._slots: dict[str, set[str]] = {}

    async def close(self) -> None:
        return None

    async def admit(self, charges: Charges, pools: Sequence[SlotPool], lease: str) -> Verdict:
        return self.admit_now(charges, pools, lease)

    def admit_now(self, charges: Charges, pools: Sequence[SlotPool], lease: str) -> Verdict:
        now = time.monotonic() * 1000.0
        share = self.share
        tats = self._tat
        new_tats: list[float] = []
        levels: list[Level] = []
        for index, (bucket, cost) in enumerate(charges):
            limit = bucket.limit * share
            interval = WINDOW_MS / limit
            start = max(tats.get(bucket.id, now), now)
            # A reservation larger than this worker's share still passes when the bucket is full.
            debt = start - now + min(cost, limit) * interval
            if debt > WINDOW_MS + EPSILON_MS:
                used = (start - now) / interval
                return Verdict(False, [], index, debt - WINDOW_MS, used, limit, self)
            new = start + cost * interval
            new_tats.append(new)
            levels.append(Level(limit, (WINDOW_MS - (new - now)) / interval, new - now))
        for index, pool in enumerate(pools):
            limit = max(1, int(pool.limit * share))
            held = self._slots.get(pool.id)
            if held is not None and len(held) >= limit:
                return Verdict(False, [], len(charges) + index, 1000.0, len(held), limit, self)
        for (bucket, cost), new in zip(charges, new_tats, strict=True):
            tats[bucket.id] = new
            self._charged[bucket.id] = self._charged.get(bucket.id, 0.0) + cost
        for pool in pools:
            self._slots.setdefault(pool.id, set()).add(lease)
        return Verdict(True, levels, state=self)

    def settle(self, adjustments: Charges, pools: Sequence[SlotPool], lease: str) -> None:
        now = time.monotonic() * 1000.0
        for bucket, delta in adjustments:
            interval = WINDOW_MS / (bucket.limit * self.share)
            tat = max(self._tat.get(bucket.id, now), now)
            self._tat[bucket.id] = max(tat + delta * interval, now)
            self._charged[bucket.id] = self._charged.get(bucket.id, 0.0) + delta
        for pool in pools:
            held = self._slots.get(pool.id)
            if held is not None:
                held.discard(lease)

    def charged(self, bucket_id: str) -> float:
        """Net units charged to a bucket since this process started (reservations, then settlements)."""
        return self._charged.get(bucket_id, 0.0)

    def in_use(self, pool_id: str) -> int:
        return len(self._slots.get(pool_id, ()))
