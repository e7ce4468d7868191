"""Redis first, the in-process limiter when Redis cannot answer: requests never fail because of it.

A failed call, or a few slow ones in a row, mark Redis down: `llm_gateway_state_backend_up` goes to 0, the error counter
rises, one warning is logged, and admissions go to the in-process limiter at once (no call waits on a
dead Redis). A probe then pings Redis every `PROBE_INTERVAL` seconds; the first answer brings it back,
with one more warning. A request settles with the backend that admitted it.

Budgets are not held in the fallback: while Redis is down they follow `budgets.when_state_down`, each
time: `allow` admits without them (the spend still reaches the ledger), `deny` refuses. When Redis is
back, `on_recovered` reseeds its counters from the ledger before it counts as up.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

from gateway import metrics
from gateway.logs import get_logger

from .memory import MemoryState
from .state import UNCHECKED, BudgetCounter, Budgets, Charges, SlotPool, StateUnavailable, Verdict

if TYPE_CHECKING:
    from .redis import RedisState

log = get_logger("tenancy")

PROBE_INTERVAL = 1.0
TIMEOUTS_TO_DOWN = 3


class FailoverState:
    name = "redis"

    def __init__(self, primary: RedisState, fallback: MemoryState, deny_budgets: bool = False) -> None:
        self.primary = primary
        self.fallback = fallback
        self.deny_budgets = deny_budgets
        # Awaited when Redis is back, before it counts as up (the budgets' reseed from the ledger).
        self.on_recovered: Callable[[], Awaitable[None]] | None = None
        self.up = True
        self._up_gauge = metrics.STATE_BACKEND_UP.labels(primary.name)
        self._errors = metrics.STATE_BACKEND_ERRORS.labels(primary.name)
        self._up_gauge.set(1)
        self._probe: asyncio.Task[None] | None = None
        self._timeouts = 0  # in a row
        primary.on_failure = self._failed
        self._warming: asyncio.Task[None] | None = None
        with contextlib.suppress(RuntimeError):  # built on the serving loop: warm up at once
            self._warming = asyncio.get_running_loop().create_task(primary.warm())

    async def admit(self, charges: Charges, pools: Sequence[SlotPool], lease: str, budgets: Budgets = ()) -> Verdict:
        if self.up:
            try:
                verdict = await self.primary.admit(charges, pools, lease, budgets)
            except StateUnavailable as exc:
                self._failed(exc)
            else:
                self._timeouts = 0
                return verdict
        if budgets and self.deny_budgets:
            return Verdict(False, [], UNCHECKED, state=self.fallback)
        verdict = self.fallback.admit_now(charges, pools, lease)
        verdict.budgeted = not budgets
        return verdict

    def settle(self, adjustments: Charges, pools: Sequence[SlotPool], lease: str, budgets: Budgets = ()) -> None:
        # Not reached: a request settles with `Verdict.state`, the backend that admitted it.
        self.fallback.settle(adjustments, pools, lease)

    async def seed(self, values: Budgets, overwrite: bool) -> None:
        await self.primary.seed(values, overwrite)

    async def spent(self, counters: Sequence[BudgetCounter]) -> list[int | None]:
        return await self.primary.spent(counters)

    def _failed(self, exc: StateUnavailable) -> None:
        self._errors.inc()
        if not self.up:
            return
        if exc.timeout:
            # One slow answer (a busy host, a pause) falls back for that request only; Redis counts as down
            # after a few in a row, or at once when the connection fails.
            self._timeouts += 1
            if self._timeouts < TIMEOUTS_TO_DOWN:
                return
        self._timeouts = 0
        self.up = False
        self._up_gauge.set(0)
        log.warning(
            "state backend down: limits are held in this process until it is back",
            backend=self.primary.name,
            error=str(exc),
        )
        self._probe = asyncio.get_running_loop().create_task(self._probe_until_up())

    async def _probe_until_up(self) -> None:
        while True:
            await asyncio.sleep(PROBE_INTERVAL)
            try:
                await self.primary.ping()
            except StateUnavailable:
                self._errors.inc()
                continue
            await self.primary.reconnect()
            if self.on_recovered is not None:
                try:
                    await self.on_recovered()
                except StateUnavailable:
                    self._errors.inc()
                    continue
            self.up = True
            self._up_gauge.set(1)
            log.warning("state backend back: limits are shared again", backend=self.primary.name)
            return

    async def close(self) -> None:
        if self._warming is not None:
            self._warming.cancel()
        if self._probe is not None:
            self._probe.cancel()
            await asyncio.gather(self._probe, return_exceptions=True)
        await self.primary.close()
