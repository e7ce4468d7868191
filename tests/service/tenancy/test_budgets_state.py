"""Budgets in the state backends, the same suite on both (this process, and a real Redis), through the
real Tenancy; and their pieces: calendar periods, the reservation's prices, the config's checks."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from gateway.config import ConfigError, parse
from gateway.errors import InsufficientQuotaError
from service.ledger import UsageRecord, open_ledger
from service.tenancy import Tenancy
from service.tenancy.budgets import Budget, Pricing, period_of
from service.tenancy.failover import FailoverState
from service.tenancy.redis import RedisState
from service.tenancy.state import BudgetCounter, LimitState
from tests.service.tenancy.conftest import RedisServer
from tests.service.tenancy.limiter import KEY, OTHER, Client, chat, config
from tests.service.tenancy.test_limiter import Run, run

__all__ = ["run"]  # the fixture: each test runs on both backends

# gpt-4o at USD 1000 per 1M tokens in and out: 1000 micro-dollars a token. "Hello there" with max_tokens 1
# reserves (11 // 4 + 4 + 3) + 1 = 10 tokens: 10 000 micro-dollars.
RESERVE = 10_000
PRICED = {"gpt-4o": {"provider": "dummy", "price": {"input": 1000, "output": 1000}}, "mini": "dummy"}

NO_LEDGER = {"database": ""}


def keys(budget: float, **extra: Any) -> dict[str, Any]:
    return {
        "keys": [
            {"name": "alpha", "key": KEY, "budget": {"usd": budget, "period": "month"}, **extra},
            {"name": "beta", "key": OTHER},
        ]
    }


def state_of(tenancy: Tenancy) -> LimitState:
    state = tenancy.state
    return state.primary if isinstance(state, FailoverState) else state


async def spent(client: Client, name: str = "alpha") -> int | None:
    await client.sync()  # settlements queued for Redis go out
    (counter,) = [b.counter(datetime.now(UTC).timestamp()) for b in client.tenancy.book.all() if b.owner == name]
    (value,) = await state_of(client.tenancy).spent([counter])
    return value


def test_reservations_hold_the_budget_and_settle_to_the_cost(run: Run) -> None:
    async def body(client: Client) -> None:
        first, error = await client.admit(chat(max_tokens=1))
        assert error is None
        second, error = await client.admit(chat(max_tokens=1))
        assert error is None
        assert await spent(client) == 2 * RESERVE  # both in flight: the budget of 20 000 is all reserved
        _, refused = await client.admit(chat(max_tokens=1))
        assert isinstance(refused, InsufficientQuotaError)
        assert refused.headers == {"x-should-retry": "false"} and refused.quota_subject == "key:alpha"
        assert "USD 0.020000 is spent or reserved, and this request may cost up to USD 0.010000" in refused.message
        for record in (first, second):
            record.cost = 3_000
            record.finish()
        assert await spent(client) == 6_000  # the costs replaced the reservations
        third, error = await client.admit(chat(max_tokens=1))
        assert error is None
        _, refused = await client.admit(chat(max_tokens=1))  # 16 000 + 10 000 would not fit
        assert isinstance(refused, InsufficientQuotaError)
        third.finish()  # failed, no usage: the whole reservation is refunded
        assert await spent(client) == 6_000
        assert await client.statuses(3, key=OTHER) == [200] * 3  # a key without a budget

    run(body, {"auth": keys(0.02), "models": PRICED, "usage": NO_LEDGER})


def test_a_refusal_takes_nothing_from_the_budget_or_the_rate_limits(run: Run) -> None:
    async def body(client: Client) -> None:
        record, error = await client.admit(chat(max_tokens=1))
        assert error is None
        record.cost = RESERVE
        record.finish()
        for _ in range(2):  # over the budget: no rpm taken, and the counter as it was
            _, refused = await client.admit(chat(max_tokens=1))
            assert isinstance(refused, InsufficientQuotaError)
        assert await client.charged("key:alpha:rpm") == 1
        assert await spent(client) == RESERVE

    run(body, {"auth": keys(0.015, limits={"rpm": 2}), "models": PRICED, "usage": NO_LEDGER})


def test_a_rate_limited_request_takes_no_budget(run: Run) -> None:
    async def body(client: Client) -> None:
        assert await client.statuses(3) == [200, 429, 429]  # the rpm of 1; each finished with no cost
        _, error = await client.admit(chat(max_tokens=1))
        assert error is not None and error.type == "requests"
        assert await spent(client) == 0

    run(
        body, {"auth": keys(10, limits={"rpm": 1}), "models": PRICED, "usage": NO_LEDGER}
    )  # 4096 tokens reserved when max_tokens is unset: USD 4.1


def write_ledger(path: Path, cost: int, key: str = "alpha", at: float | None = None) -> None:
    async def write() -> None:
        ledger = open_ledger(f"sqlite:///{path}")
        await ledger.open()
        ts = at if at is not None else datetime.now(UTC).timestamp() - 1
        record = UsageRecord(
            ts, f"req-{cost}-{ts}", 1, "chat", key, "", "gpt-4o", "gpt-4o", "dummy", "dummy",
            1, 0, 1, False, cost, 1.0, 200, False,
        )  # fmt: skip
        await ledger.write([record])
        await ledger.close()

    asyncio.run(write())


def test_counters_are_seeded_from_the_ledger_with_a_set_never_an_increment(tmp_path: Path, run: Run) -> None:
    database = tmp_path / "usage.db"
    write_ledger(database, 7_000)
    write_ledger(database, 500_000, at=datetime(2020, 1, 15, tzinfo=UTC).timestamp())  # another month
    write_ledger(database, 900_000, key="beta")  # another key
    usage = {"database": f"sqlite:///{database}"}
    after: dict[str, int | None] = {}

    async def first(client: Client) -> None:
        backend = "redis" if isinstance(client.tenancy.state, FailoverState) else "memory"
        record, error = await client.admit(chat(max_tokens=1))
        assert error is None
        assert await spent(client) == 7_000 + RESERVE
        record.cost = 2_000
        record.finish()
        after[backend] = await spent(client)

    async def again(client: Client) -> None:
        backend = "redis" if isinstance(client.tenancy.state, FailoverState) else "memory"
        # A second start: Redis holds the counter, which a seed does not touch (NX); a process of its own
        # seeds from the ledger again (which never saw the 2 000: nothing wrote it), not added to anything.
        record, error = await client.admit(chat(max_tokens=1))
        assert error is None
        expected = (after[backend] if backend == "redis" else 7_000) or 0
        assert await spent(client) == expected + RESERVE
        record.finish()

    run(first, {"auth": keys(1), "models": PRICED, "usage": usage})
    assert set(after.values()) == {9_000}
    run(again, {"auth": keys(1), "models": PRICED, "usage": usage})


def test_back_from_an_outage_every_counter_is_overwritten_from_the_ledger(tmp_path: Path) -> None:
    database = tmp_path / "usage.db"
    write_ledger(database, 12_345)
    server = RedisServer(tmp_path).start()

    async def main() -> None:
        tenancy = Tenancy(config(server.url, models=PRICED, auth=keys(1), usage={"database": f"sqlite:///{database}"}))
        try:
            client = Client(tenancy)
            record, _ = await client.admit(chat(max_tokens=1))
            record.cost = 1_000
            record.finish()
            assert await spent(client) == 13_345
            state = tenancy.state
            assert isinstance(state, FailoverState) and state.on_recovered is not None
            await state.on_recovered()  # what the probe runs once Redis answers again
            assert await spent(client) == 12_345  # the ledger's truth (it never saw the 1 000), set, not added
        finally:
            await tenancy.close()

    try:
        asyncio.run(main())
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("kind", "moment", "label", "start", "end"),
    [
        ("day", "2026-12-31T23:59:59", "2026-12-31", "2026-12-31", "2027-01-01"),
        ("week", "2026-12-31T12:00:00", "2026-W53", "2026-12-28", "2027-01-04"),
        ("week", "2027-01-03T23:00:00", "2026-W53", "2026-12-28", "2027-01-04"),
        ("month", "2026-12-15T08:00:00", "2026-12", "2026-12-01", "2027-01-01"),
        ("month", "2027-02-28T23:59:59", "2027-02", "2027-02-01", "2027-03-01"),
    ],
)
def test_calendar_periods_in_utc(kind: str, moment: str, label: str, start: str, end: str) -> None:
    def epoch(text: str) -> float:
        return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()

    assert period_of(kind, epoch(moment)) == (label, epoch(start), epoch(end))


def test_a_new_period_is_a_new_counter() -> None:
    config = parse({"auth": keys(1)}, {})
    budget = Budget("key", "alpha", config.auth.keys[0].budget)  # type: ignore[arg-type]
    december = budget.counter(datetime(2026, 12, 31, 23, 59, tzinfo=UTC).timestamp())
    january = budget.counter(datetime(2027, 1, 1, 0, 1, tzinfo=UTC).timestamp())
    assert (december.id, january.id) == ("budget:key:alpha:2026-12", "budget:key:alpha:2027-01")
    assert isinstance(december, BudgetCounter) and december.limit == january.limit == 1_000_000
    assert december.expire_ms == int(datetime(2027, 1, 2, tzinfo=UTC).timestamp() * 1000)  # a day after


def test_the_reservation_uses_the_dearest_price_a_request_may_reach() -> None:
    config = parse(
        {
            "models": {
                "cheap": {"provider": "dummy", "price": {"input": 1, "output": 2}, "fallback": ["dear"]},
                "dear": {"provider": "dummy", "price": {"input": 3, "output": 50}},
                "unpriced": {"provider": "dummy", "model": "no-such-model"},
            }
        },
        {},
    )
    pricing = Pricing(config)
    # USD per 1M tokens is micro-dollars per token: the fallback's prices, 3 in and 50 out.
    assert pricing.reserve("cheap", 1000, 100) == 1000 * 3 + 100 * 50
    assert pricing.reserve("dear", 1, 1) == 53
    assert (
        Pricing(parse({"models": {"m": {"provider": "dummy", "price": {"input": 0.1, "output": 0}}}}, {})).reserve(
            "m", 3, 0
        )
        == 1
    )  # 0.3 micro-dollars, rounded up
    assert pricing.reserve("unpriced", 1000, 1000) == 0


@pytest.mark.parametrize(
    ("auth", "budgets", "message"),
    [
        ({"keys": [{"name": "a", "key": KEY, "budget": {"usd": -1}}]}, {}, "auth.keys.a.budget.usd: -1 is not"),
        ({"keys": [{"name": "a", "key": KEY, "budget": {"usd": 0.0000001}}]}, {}, "at most 6 decimals"),
        ({"keys": [{"name": "a", "key": KEY, "budget": {"usd": 1, "period": "year"}}]}, {}, "'year' is not one of"),
        ({"keys": [{"name": "a", "key": KEY, "budget": {"usd": 1, "every": 2}}]}, {}, "budget.every: unknown key"),
        ({"teams": {"t": {"budget": {"usd": "x"}}}}, {}, "auth.teams.t.budget.usd: 'x' is not"),
        ({"teams": {"t": {"limits": {}}}}, {}, "auth.teams.t.limits: unknown key"),
        ({"master_key": "short"}, {}, "auth.master_key: must be at least 16 characters"),
        ({"master_key": KEY + "-0000", "keys": [{"name": "a", "key": KEY + "-0000"}]}, {}, "must not be one of"),
        ({}, {"when_state_down": "maybe"}, "budgets.when_state_down: 'maybe' is not one of allow, deny"),
        ({}, {"cap": 1}, "budgets.cap: unknown key"),
    ],
)
def test_config_errors_name_the_key(auth: dict[str, Any], budgets: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse({"auth": auth, "budgets": budgets}, {})
    assert message in str(caught.value)
    assert KEY not in str(caught.value)


def test_budgets_parse_exactly() -> None:
    config = parse(
        {
            "auth": {
                "keys": [{"name": "a", "key": KEY, "budget": {"usd": 0.1}, "metadata": {"team": "t"}}],
                "teams": {"t": {"budget": {"usd": "1000.000001", "period": "week"}}},
                "master_key": "mk-0123456789abcdef",
            },
            "budgets": {"when_state_down": "deny"},
        },
        {},
    )
    budget = config.auth.keys[0].budget
    assert budget is not None and (budget.micro_usd, budget.period) == (100_000, "month")
    team = config.auth.teams["t"].budget
    assert team is not None and (team.micro_usd, team.period) == (1_000_000_001, "week")
    assert len(config.auth.master_sha256) == 32 and b"mk-0123" not in config.auth.master_sha256
    assert config.budgets.when_state_down == "deny"


def test_a_reseed_keeps_the_reservations_of_calls_in_flight(run: Run) -> None:
    async def body(client: Client) -> None:
        record, error = await client.admit(chat(max_tokens=1))
        assert error is None
        (budget,) = [b for b in client.tenancy.book.all() if b.owner == "alpha"]
        counter = budget.counter(datetime.now(UTC).timestamp())
        await state_of(client.tenancy).seed([(counter, 5_000)], overwrite=True)  # the ledger's word
        assert await spent(client) == 5_000 + RESERVE  # the spend replaced, the call's reservation kept
        record.cost = 3_000
        record.finish()
        assert await spent(client) == 8_000

    run(body, {"auth": keys(1), "models": PRICED, "usage": NO_LEDGER})


def test_the_reservations_of_a_dead_replica_lapse(tmp_path: Path) -> None:
    server = RedisServer(tmp_path).start()

    async def main() -> None:
        budget = Budget("key", "alpha", parse({"auth": keys(0.02)}, {}).auth.keys[0].budget)  # type: ignore[arg-type]
        counter = budget.counter(datetime.now(UTC).timestamp())
        dead = RedisState(server.url, 1.0, 10.0, hold_seconds=0.3)
        alive = RedisState(server.url, 1.0, 10.0, hold_seconds=600)
        try:
            await alive.seed([(counter, 0)], overwrite=True)
            assert (await dead.admit((), (), "lease-dead", [(counter, RESERVE)])).ok  # never settled
            assert (await alive.admit((), (), "lease-1", [(counter, RESERVE)])).ok
            refused = await alive.admit((), (), "lease-2", [(counter, RESERVE)])
            assert not refused.ok and refused.used == 2 * RESERVE
            await asyncio.sleep(0.4)  # the dead one's hold has ended; the live one's has not
            assert (await alive.admit((), (), "lease-3", [(counter, RESERVE)])).ok
            assert await alive.spent([counter]) == [2 * RESERVE]
        finally:
            await dead.close()
            await alive.close()

    try:
        asyncio.run(main())
    finally:
        server.stop()
