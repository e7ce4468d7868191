"""The interface of limit state, which one module per backend implements: `memory` (this process) and
`redis` (every worker and replica), with `failover` putting the first behind the second.

Buckets hold a per-minute limit refilled continuously (GCRA: the state of a bucket is its theoretical
arrival time, `tat`, in milliseconds). A charge of `cost` units moves `tat` by `cost * interval`; it is
admitted when the debt that leaves, `tat - now`, is at most one minute. Slot pools hold leases, one per
call in flight.

`admit` checks every charge and pool of a request and takes them all, or none: a rejection consumes
nothing. `settle` replaces a reservation with what was used and releases slots; it never waits and
never fails (a backend may send it with its next admission).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

WINDOW_MS = 60_000.0
# Float slack when a burst of exactly `limit` lands on the window's edge (7 * 60000/7 != 60000).
EPSILON_MS = 1e-6


@dataclass(frozen=True, slots=True)
class Bucket:
    """One per-minute limit of one scope, built at start-up."""

    id: str  # "key:<name>:rpm", "model:<name>:tpm": the state's own key
    scope: str  # "key" | "model"
    owner: str  # the key's or the model's name
    kind: str  # "requests" | "tokens"
    limit: float  # per minute, as configured

    @property
    def label(self) -> str:
        return "RPM" if self.kind == "requests" else "TPM"


@dataclass(frozen=True, slots=True)
class SlotPool:
    """A key's max_parallel."""

    id: str  # "key:<name>:parallel"
    owner: str
    limit: int


@dataclass(frozen=True, slots=True)
class BudgetCounter:
    """A key's or a team's spend in one calendar period, in integer micro-dollars. Its id carries the
    period ("budget:key:<name>:2026-12"), so a new period starts a new counter: nothing resets."""

    id: str
    scope: str  # "key" | "team"
    owner: str
    limit: int  # micro-dollars
    period: str  # "2026-12", "2026-W49", "2026-12-01"
    expire_ms: int  # epoch ms: a day after the period ends, the counter goes


# A request's budget charges: each counter and micro-dollars; at admission the reservation (held under
# the request's lease, apart from the spend), at settlement the actual cost (added to the spend, and the
# lease's reservation released). A reseed sets the spend only, so calls in flight are never lost by it.
Budgets = Sequence[tuple[BudgetCounter, int]]

# Verdict.failed when a budget counter is not in the state yet (a new period, a restarted Redis): the
# caller seeds it from the ledger and asks again; nothing was taken.
MISSING = -2
# Verdict.failed when budgets cannot be checked (Redis down with budgets.when_state_down: deny).
UNCHECKED = -3


# A bucket after an admission: (the limit enforced, units left, milliseconds until it is full). A plain
# tuple: one is built per bucket per request, and a class instance costs several times as much.
Level = tuple[float, float, float]


@dataclass(slots=True)
class Verdict:
    ok: bool
    levels: list[Level]  # ok: one per charge, in order
    failed: int = -1  # not ok: the index of the failing charge, or len(charges) + the failing pool's index
    retry_ms: float = 0.0  # not ok: until the request would pass that scope
    used: float = 0.0  # not ok: units in use in that scope
    limit: float = 0.0  # not ok: that scope's enforced limit
    state: LimitState | None = None  # which backend decided: the one to settle with
    budgeted: bool = True  # ok: the budgets were taken (False: skipped while Redis is down)
    missing: tuple[BudgetCounter, ...] = ()  # failed == MISSING: the counters to seed


class StateUnavailable(Exception):
    """The backend could not answer (timeout, connection, server error)."""

    def __init__(self, reason: str, timeout: bool = False) -> None:
        super().__init__(reason)
        self.timeout = timeout  # slow rather than gone


Charges = Sequence[tuple[Bucket, float]]


class LimitState(Protocol):
    name: str

    async def admit(self, charges: Charges, pools: Sequence[SlotPool], lease: str, budgets: Budgets = ()) -> Verdict:
        """All of `charges`, a slot in each of `pools` (held under `lease`) and each budget's
        reservation, or nothing. A budget passes while its counter plus the reservation is within it."""
        ...

    def settle(self, adjustments: Charges, pools: Sequence[SlotPool], lease: str, budgets: Budgets = ()) -> None:
        """Add each adjustment (actual minus reserved, may be negative), release the lease's slots, and add
        each budget's cost while releasing the lease's reservation."""
        ...

    async def seed(self, values: Budgets, overwrite: bool) -> None:
        """Set budget counters' spend to these values (the ledger's): a SET, never an increment; only
        those not there yet unless `overwrite`. Reservations of calls in flight are kept apart."""
        ...

    async def spent(self, counters: Sequence[BudgetCounter]) -> list[int | None]:
        """Each counter's spend plus the reservations of calls in flight; None when not there."""
        ...

    async def close(self) -> None: ...
