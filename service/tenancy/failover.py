"""Redis first, the in-process limiter when Redis cannot answer: requests never fail because of it.

A failed call, or a few slow ones in a row, mark Redis down: `llm_gateway_state_backend_up` goes to 0, the error counter
rises, one warning is logged, and admissions go to the in-process limiter at once (no call waits on a
dead Redis). A probe then pings Redis every `PROBE_INTERVAL` seconds; the first answer brings it back,
with one more warning. A request settles with the backend that admitted it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

from gateway import metrics
from gateway.logs import get_logger

from .memory import MemoryState
from .redis import RedisState
from .state import Charges, SlotPool, StateUnavailable, Verdict

log = get_logger("tenancy")

PROBE_INTERVAL = 1.0
TIMEOUTS_TO_DOWN = 3


class FailoverState:
    name = "redis"

    def __init__(self, primary: RedisState, fallback: MemoryState) -> None:
        self.primary = primary
        self.fallback = fallback
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

    async def admit(self, charges: Charges, pools: Sequence[SlotPool], lease: str) -> Verdict:
        if self.up:
            try:
                verdict = await self.primary.admit(charges, pools, lease)
            except StateUnavailable as exc:
                self._failed(exc)
            else:
                self._timeouts = 0
                return verdict
        return self.fallback.admit_now(charges, pools, lease)

    def settle(self, adjustments: Charges, pools: Sequence[SlotPool], lease: str) -> None:
        # Not reached: a request settles with `Verdict.state`, the backend that admitted it.
        self.fallback.settle(adjustments, pools, lease)

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
