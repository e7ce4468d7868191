"""The key store on both ledger databases: the same tests for SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import hashlib
import time

import pytest

from service.admin.store import KeyExists, StoredKey, open_store
from service.ledger import UsageRecord


def stored(name: str, secret: str, **spec: object) -> StoredKey:
    full = {"models": None, "limits": {}, "metadata": {}, **spec}
    return StoredKey(name, hashlib.sha256(secret.encode()).hexdigest(), full, time.time())


def record(key: str, team: str, model: str, ts: float, cost: int, n: int) -> UsageRecord:
    return UsageRecord(
        ts, f"req-{key}-{n}", 1, "chat", key, team, model, model, "openai", "openai/" + model,
        10, 2, 5, False, cost, 12.5, 200, False,
    )  # fmt: skip


def test_keys_are_created_listed_and_revoked_with_a_version_that_moves(ledger_url: str) -> None:
    async def run() -> None:
        store = open_store(ledger_url)
        try:
            assert await store.keys() == []
            empty = await store.version()
            one = stored("one", "sk-gw-one-secret", limits={"rpm": 5}, budget={"usd": "1.5", "period": "day"})
            await store.create(one)
            after_create = await store.version()
            assert after_create != empty
            await store.create(stored("two", "sk-gw-two-secret", metadata={"team": "search"}, models=["gpt-4o"]))
            assert [(k.name, k.sha256, k.spec, k.revoked_at) for k in await store.keys()] == [
                ("one", one.sha256, one.spec, None),
                ("two", hashlib.sha256(b"sk-gw-two-secret").hexdigest(), {**stored("two", "x").spec,
                 "metadata": {"team": "search"}, "models": ["gpt-4o"]}, None),
            ]  # fmt: skip
            # Neither the name nor the secret can be taken twice.
            with pytest.raises(KeyExists):
                await store.create(stored("one", "sk-gw-other-secret"))
            with pytest.raises(KeyExists):
                await store.create(stored("three", "sk-gw-one-secret"))
            before = await store.version()
            revoked = await store.revoke("one", 1_800_000_000.0)
            assert revoked is not None and revoked.revoked_at == 1_800_000_000.0
            assert await store.version() != before
            assert [k.name for k in await store.keys()] == ["two"]
            assert [k.name for k in await store.keys(include_revoked=True)] == ["one", "two"]
            # A second revoke changes nothing; an unknown name is None.
            again = await store.version()
            assert (await store.revoke("one", 1_900_000_000.0)).revoked_at == 1_800_000_000.0  # type: ignore[union-attr]
            assert await store.version() == again
            assert await store.revoke("nobody", time.time()) is None
        finally:
            await store.close()

    asyncio.run(run())


def test_usage_totals_from_the_same_database(ledger_url: str) -> None:
    day = 1_796_083_200.0  # 2026-12-01T00:00:00Z

    async def run() -> None:
        store = open_store(ledger_url)
        try:
            await store.ledger.open()
            await store.ledger.write(
                [
                    record("alpha", "search", "gpt-4o", day + 10, 1_000, 1),
                    record("alpha", "search", "gpt-4o", day + 20, 2_000, 2),
                    record("alpha", "search", "gpt-4o-mini", day + 86_400 + 5, 300, 3),
                    record("beta", "", "gpt-4o", day + 30, 7, 4),
                    record("beta", "", "gpt-4o", day - 1, 99, 5),  # before the range
                ]
            )
            rows = await store.ledger.totals(["key_name", "model", "day"], since=day, until=day + 2 * 86_400)
            assert [(r["key_name"], r["model"], r["day"], r["requests"], r["cost_micro"]) for r in rows] == [
                ("alpha", "gpt-4o", "2026-12-01", 2, 3_000),
                ("alpha", "gpt-4o-mini", "2026-12-02", 1, 300),
                ("beta", "gpt-4o", "2026-12-01", 1, 7),
            ]
            # The key table lives beside the usage table, on the same connection.
            await store.create(stored("alpha", "sk-gw-alpha-secret"))
            teams = await store.ledger.totals(["team"], since=day, until=day + 2 * 86_400)
            assert [(r["team"], r["prompt_tokens"], r["cached_tokens"], r["completion_tokens"]) for r in teams] == [
                ("", 10, 2, 5),
                ("search", 30, 6, 15),
            ]
        finally:
            await store.close()

    asyncio.run(run())
