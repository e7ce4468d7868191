"""Budgets: what a key, and a team of keys, may spend per calendar period in UTC.

    auth:
      keys:
        - {name: search, key: ..., metadata: {team: search}, budget: {usd: 100, period: month}}
      teams:
        search: {budget: {usd: 1000, period: month}}
    budgets: {when_state_down: allow}

A budget is a counter of integer micro-dollars in the limit state (this process, or Redis), checked and
taken in the same atomic round trip as the rate limits. Its id carries the period
(`budget:key:search:2026-12`), so a new period is a new counter and no reset job exists. A request
reserves its largest possible cost (the prompt's estimate at the input price, and its completion cap
at the output price, of the dearest deployment it may reach, fallbacks included) and settles to the
actual cost when it ends; a request passes while the spend, the reservations of calls in flight and its
own reservation fit. Reservations are held apart from the spend, each under its call's lease, which
lapses (`server.request_timeout` + 60 s) if the call is never settled: a replica killed mid-call leaves
nothing behind for good.

The ledger is the truth the counters come from: a counter that is not in the state (a new period, a
restarted Redis, a new process without Redis) is seeded from the ledger's spend for its period with a
SET, never an increment, so replicas seeding together agree and nothing is counted twice; when Redis
comes back from an outage every counter's spend is overwritten from the ledger (the reservations of
calls in flight, kept apart, survive it, and their costs land when they settle).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta

from gateway import metrics
from gateway.config import ApiKeyConfig, BudgetConfig, Config
from gateway.errors import BudgetUnavailableError, InsufficientQuotaError
from gateway.logs import get_logger
from service.ledger import Ledger, LedgerWriter, open_ledger

from .state import BudgetCounter, LimitState, StateUnavailable

log = get_logger("tenancy")

_DAY = 86_400.0
_GROUP = {"key": "key_name", "team": "team"}  # the ledger's column for each scope


def period_of(kind: str, now: float) -> tuple[str, float, float]:
    """The calendar period (UTC) holding `now`: its label, start and end (epoch seconds)."""
    moment = datetime.fromtimestamp(now, UTC)
    day = moment.replace(hour=0, minute=0, second=0, microsecond=0)
    if kind == "day":
        return day.strftime("%Y-%m-%d"), day.timestamp(), (day + timedelta(days=1)).timestamp()
    if kind == "week":  # ISO weeks, from Monday
        start = day - timedelta(days=day.weekday())
        year, week, _ = start.isocalendar()
        return f"{year}-W{week:02d}", start.timestamp(), (start + timedelta(days=7)).timestamp()
    start = day.replace(day=1)
    end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
    return start.strftime("%Y-%m"), start.timestamp(), end.timestamp()


class Budget:
    """One configured budget; its counter for the current period is built once per period."""

    __slots__ = ("_counter", "_end", "_start", "config", "owner", "scope")

    def __init__(self, scope: str, owner: str, config: BudgetConfig) -> None:
        self.scope = scope
        self.owner = owner
        self.config = config
        self._end = 0.0
        self._start = 0.0
        self._counter: BudgetCounter | None = None

    def counter(self, now: float) -> BudgetCounter:
        counter = self._counter
        if counter is None or now >= self._end or now < self._start:
            label, self._start, self._end = period_of(self.config.period, now)
            counter = self._counter = BudgetCounter(
                f"budget:{self.scope}:{self.owner}:{label}",
                self.scope,
                self.owner,
                self.config.micro_usd,
                label,
                int((self._end + _DAY) * 1000),
            )
        return counter

    def bounds(self, now: float) -> tuple[float, float]:
        self.counter(now)
        return self._start, self._end


class Pricing:
    """Per model: the dearest input and output price (micro-dollars per 1M tokens) of every deployment a
    request for it may reach, its fallbacks' included; resolved once at start-up."""

    def __init__(self, config: Config) -> None:
        from service.spend.meter import resolve_prices
        from service.spend.prices import builtin

        prices = resolve_prices(config, builtin())
        self._dearest: dict[str, tuple[int, int]] = {}
        for name in config.models:
            reach, todo = set[str](), [name]
            while todo:
                model = todo.pop()
                if model not in reach and model in config.models:
                    reach.add(model)
                    todo.extend(config.models[model].fallback)
            found = [p for (m, _), p in prices.items() if m in reach and p is not None]
            self._dearest[name] = (max((p.input for p in found), default=0), max((p.output for p in found), default=0))

    def reserve(self, model: str, prompt: int, completion: int) -> int:
        """The most a request can cost, in micro-dollars (rounded up)."""
        price_in, price_out = self._dearest.get(model, (0, 0))
        return math.ceil((prompt * price_in + completion * price_out) / 1_000_000)


def refusal(counter: BudgetCounter, used: float, reserve: int) -> InsufficientQuotaError:
    """The 429 of a spent budget, as OpenAI words its own."""
    who = counter.owner if counter.scope == "key" else f"team {counter.owner}"
    return InsufficientQuotaError(
        f"You exceeded your current quota: the budget of {who} for {counter.period} is USD "
        f"{counter.limit / 1_000_000:.6f}, USD {max(used, 0) / 1_000_000:.6f} is spent or reserved, and this "
        f"request may cost up to USD {reserve / 1_000_000:.6f}. Ask the gateway's operator to raise the budget.",
        subject=f"{counter.scope}:{counter.owner}",
        description=f"budget (USD per {kind_of(counter.period)})",
    )


def kind_of(label: str) -> str:
    """The kind of period a label names: 2026-12-01 a day, 2026-W49 a week, 2026-12 a month."""
    return "day" if label.count("-") == 2 else "week" if "W" in label else "month"


def unchecked() -> BudgetUnavailableError:
    return BudgetUnavailableError(
        "Budgets cannot be checked right now (the gateway's state backend is unavailable); retry shortly."
    )


class BudgetBook:
    """Every budget of a config: by key, by team, and their seeding from the ledger."""

    def __init__(self, config: Config, writer: LedgerWriter | None = None) -> None:
        self.pricing = Pricing(config)
        self.teams: dict[str, Budget] = {
            team: Budget("team", team, spec.budget) for team, spec in config.auth.teams.items() if spec.budget
        }
        self._by_key: dict[str, Budget] = {}
        self._database = config.usage.database
        self._ledger: Ledger | None = None
        self.writer = writer  # this process's ledger writer: its unwritten records count too
        self._seeding: dict[str, asyncio.Task[None]] = {}
        self._interval = config.budgets.metrics_interval
        self._gauges: asyncio.Task[None] | None = None
        self._warned = False
        self._seed_failing = False

    def for_key(self, key: ApiKeyConfig) -> tuple[Budget, ...]:
        """The budgets a key's calls must pass: its own, then its team's."""
        budgets: list[Budget] = []
        if key.budget is not None:
            budget = self._by_key.get(key.name)
            if budget is None or budget.config != key.budget:
                budget = self._by_key[key.name] = Budget("key", key.name, key.budget)
            budgets.append(budget)
        team = self.teams.get(key.metadata.get("team", ""))
        if team is not None:
            budgets.append(team)
        return tuple(budgets)

    def forget(self, names: Iterable[str]) -> None:
        for name in names:
            self._by_key.pop(name, None)

    def all(self) -> list[Budget]:
        return [*self._by_key.values(), *self.teams.values()]

    # ------------------------------------------------------------------ seeding

    async def seed(self, state: LimitState, counters: Sequence[BudgetCounter]) -> bool:
        """Seed the counters the state does not hold yet (SET NX); concurrent callers share one seeding.
        False when the ledger or the state could not be reached (logged once per outage)."""
        waits = []
        for counter in counters:
            task = self._seeding.get(counter.id)
            if task is None:
                task = self._seeding[counter.id] = asyncio.get_running_loop().create_task(
                    self._seed_one(state, counter)
                )
                task.add_done_callback(self._seeded(counter.id))
            waits.append(task)
        try:
            await asyncio.gather(*(asyncio.shield(task) for task in waits))
        except Exception as exc:  # StateUnavailable, or the ledger's database is away
            if not self._seed_failing:
                log.warning("budget counters cannot be seeded", error=f"{type(exc).__name__}: {exc}")
            self._seed_failing = True
            return False
        self._seed_failing = False
        return True

    def _seeded(self, key: str) -> Callable[[asyncio.Task[None]], None]:
        def done(_: asyncio.Task[None]) -> None:
            self._seeding.pop(key, None)

        return done

    async def _seed_one(self, state: LimitState, counter: BudgetCounter) -> None:
        spent = await self.ledger_spent([counter])
        await state.seed([(counter, spent[0])], overwrite=False)

    async def reseed_all(self, state: LimitState) -> None:
        """Back from an outage: every counter of the current periods becomes the ledger's spend (a SET)."""
        now = time.time()
        counters = [budget.counter(now) for budget in self.all()]
        if not counters:
            return
        try:
            spent = await self.ledger_spent(counters)
        except Exception as exc:  # the ledger is away too: the counters keep what Redis holds
            log.warning("budgets not reseeded: the ledger cannot be read", error=f"{type(exc).__name__}: {exc}")
            return
        await state.seed(list(zip(counters, spent, strict=True)), overwrite=True)
        log.info("budget counters reseeded from the ledger", counters=len(counters))

    async def ledger_spent(self, counters: Sequence[BudgetCounter]) -> list[int]:
        """Micro-dollars each counter's owner spent in its period, by the ledger (records this process
        has not written yet included). 0 without a ledger."""
        ledger = await self._open()
        if ledger is None:
            return [0] * len(counters)
        groups: dict[tuple[str, str], dict[str, int]] = {}
        for counter in counters:
            where = (counter.scope, counter.period)
            if where not in groups:
                start, end = self._bounds(counter)
                rows = await ledger.totals([_GROUP[counter.scope]], since=start, until=end)
                totals = {str(row[_GROUP[counter.scope]]): int(row["cost_micro"] or 0) for row in rows}
                if self.writer is not None:
                    for record in self.writer.pending():
                        if start <= record.ts < end:
                            owner = record.key_name if counter.scope == "key" else record.team
                            totals[owner] = totals.get(owner, 0) + record.cost_micro
                groups[where] = totals
        return [groups[(c.scope, c.period)].get(c.owner, 0) for c in counters]

    def _bounds(self, counter: BudgetCounter) -> tuple[float, float]:
        budget = self._by_key.get(counter.owner) if counter.scope == "key" else self.teams.get(counter.owner)
        if budget is not None and budget.counter(time.time()) == counter:
            return budget.bounds(time.time())
        kind = kind_of(counter.period)
        start = datetime.strptime(counter.period + ("-1" if kind == "week" else ""), _FORMATS[kind]).replace(tzinfo=UTC)
        _, begin, end = period_of(kind, start.timestamp())
        return begin, end

    async def _open(self) -> Ledger | None:
        if not self._database:
            if not self._warned:
                log.warning("budgets without a usage ledger (usage.database is empty): they count from 0 per process")
                self._warned = True
            return None
        if self._ledger is None:
            ledger = open_ledger(self._database)
            await ledger.open()
            self._ledger = ledger
        return self._ledger

    # ------------------------------------------------------------------ reading

    async def levels(self, state: LimitState | None) -> list[tuple[Budget, BudgetCounter, int, int | None]]:
        """Each budget now: its counter, the ledger's spend, and the state's counter (None: not held)."""
        now = time.time()
        budgets = self.all()
        counters = [budget.counter(now) for budget in budgets]
        spent = await self.ledger_spent(counters)
        held: list[int | None] = [None] * len(counters)
        if state is not None:
            with contextlib.suppress(StateUnavailable):
                held = await state.spent(counters)
        return list(zip(budgets, counters, spent, held, strict=True))

    def start_gauges(self) -> None:
        """llm_gateway_budget_spent_usd and _limit_usd from the ledger, every metrics_interval, off the
        request path."""
        if self._gauges is None and self.all() and self._database:
            self._gauges = asyncio.get_running_loop().create_task(self._update_gauges())

    async def _update_gauges(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                for budget, counter, spent, _ in await self.levels(None):
                    metrics.BUDGET_SPENT.labels(budget.scope, budget.owner).set(spent / 1_000_000)
                    metrics.BUDGET_LIMIT.labels(budget.scope, budget.owner).set(counter.limit / 1_000_000)
            await asyncio.sleep(self._interval)

    async def close(self) -> None:
        if self._gauges is not None:
            self._gauges.cancel()
            await asyncio.gather(self._gauges, return_exceptions=True)
        for task in list(self._seeding.values()):
            task.cancel()
        if self._ledger is not None:
            with contextlib.suppress(Exception):
                await self._ledger.close()
            self._ledger = None


_FORMATS: Mapping[str, str] = {"day": "%Y-%m-%d", "week": "%G-W%V-%u", "month": "%Y-%m"}
