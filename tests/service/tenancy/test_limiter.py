"""The limiter's semantics, the same suite on both state backends: this process, and a real Redis."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest

from service.tenancy import Tenancy
from service.tenancy.limits import estimate_prompt_tokens
from tests.service.tenancy.conftest import RedisServer
from tests.service.tenancy.limiter import KEY, OTHER, Client, chat, config, finish

Run = Callable[[Callable[[Client], Awaitable[None]], dict[str, Any]], None]


@pytest.fixture(params=["memory", "redis"])
def run(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Run]:
    server = RedisServer(tmp_path).start() if request.param == "redis" else None

    def go(body: Callable[[Client], Awaitable[None]], sections: dict[str, Any]) -> None:
        async def main() -> None:
            tenancy = Tenancy(config(server.url if server else "", **sections))
            try:
                await body(Client(tenancy))
            finally:
                await tenancy.close()

        asyncio.run(main())

    yield go
    if server is not None:
        server.stop()


def keys(**limits: Any) -> dict[str, Any]:
    return {"keys": [{"name": "alpha", "key": KEY, "limits": limits}, {"name": "beta", "key": OTHER}]}


def test_a_burst_of_limit_plus_n_admits_exactly_limit(run: Run) -> None:
    async def body(client: Client) -> None:
        statuses = await client.statuses(45)
        assert statuses == [200] * 30 + [429] * 15
        assert await client.statuses(3, key=OTHER) == [200] * 3  # another key has its own bucket

    run(body, {"auth": keys(rpm=30)})


def test_a_rejection_consumes_nothing_in_any_scope(run: Run) -> None:
    async def body(client: Client) -> None:
        assert await client.statuses(5) == [200, 200, 200, 429, 429]  # the model's rpm 3 refuses
        assert await client.charged("key:alpha:rpm") == 3
        assert await client.charged("model:gpt-4o:rpm") == 3
        # A request refused by the key's tpm takes nothing from the model's rpm.
        _, error = await client.admit(chat("mini", max_tokens=990))
        assert (
            error is not None and error.type == "tokens" and "Rate limit reached for alpha on tokens" in error.message
        )
        assert await client.charged("model:mini:rpm") == 0
        assert await client.charged("key:alpha:rpm") == 3

    limits = {"gpt-4o": {"rpm": 3}, "mini": {"rpm": 10}, "default_max_tokens": 10}
    run(body, {"auth": keys(rpm=100, tpm=1000), "limits": limits})


def test_tokens_are_reserved_then_settled_with_the_actual_usage(run: Run) -> None:
    async def body(client: Client) -> None:
        record, error = await client.admit(chat(max_tokens=500))
        assert error is None
        reserved = await client.charged("key:alpha:tpm")
        assert reserved == estimate_prompt_tokens(chat(max_tokens=500)) + 500  # the prompt's estimate plus max_tokens
        finish(record, prompt=12, completion=30)
        assert await client.charged("key:alpha:tpm") == 42
        # max_completion_tokens wins over max_tokens; n multiplies the completion cap.
        capped = chat(max_tokens=500, max_completion_tokens=100, n=3)
        record, _ = await client.admit(capped)
        assert await client.charged("key:alpha:tpm") - 42 == estimate_prompt_tokens(capped) + 300
        finish(record, prompt=10, completion=5)
        # Neither set: the configured default cap.
        record, _ = await client.admit(chat())
        assert await client.charged("key:alpha:tpm") - 57 == estimate_prompt_tokens(chat()) + 77
        finish(record, prompt=1, completion=1)
        assert await client.charged("key:alpha:tpm") == 59
        # A call that ended without usage keeps the prompt's estimate only.
        record, _ = await client.admit(chat(max_tokens=500))
        finish(record)
        assert await client.charged("key:alpha:tpm") == 59 + reserved - 500

    run(body, {"auth": keys(tpm=100_000), "limits": {"default_max_tokens": 77}})


def test_a_settlement_happens_once(run: Run) -> None:
    async def body(client: Client) -> None:
        record, _ = await client.admit(chat(max_tokens=100))
        finish(record, prompt=5, completion=5)
        assert record.tenant is not None
        record.tenant.finish(200, record.usage)  # a second finish is a no-op
        assert await client.charged("key:alpha:tpm") == 10

    run(body, {"auth": keys(tpm=100_000)})


def test_a_request_larger_than_the_bucket_is_refused_for_good(run: Run) -> None:
    async def body(client: Client) -> None:
        _, error = await client.admit(chat(max_tokens=2000))
        assert error is not None and error.http_status == 429
        assert error.headers == {"x-should-retry": "false"}
        assert error.type == "tokens" and error.code == "rate_limit_exceeded"
        assert error.message.startswith("Request too large for alpha on tokens per min (TPM): Limit 1000, Requested ")
        assert await client.charged("key:alpha:tpm") == 0
        assert await client.statuses(2) == [200, 200]

    run(body, {"auth": keys(tpm=1000), "limits": {"default_max_tokens": 10}})


def test_max_parallel_slots_are_taken_and_released(run: Run) -> None:
    async def body(client: Client) -> None:
        first, e1 = await client.admit()
        second, e2 = await client.admit()
        third, e3 = await client.admit()
        assert (e1, e2) == (None, None)
        assert e3 is not None and e3.http_status == 429 and e3.type == "requests"
        assert "on parallel requests: Limit 2, Used 2, Requested 1." in e3.message
        assert await client.in_use("key:alpha:parallel") == 2
        finish(first)  # ended: the slot is free
        fourth, e4 = await client.admit()
        assert e4 is None
        finish(second)
        finish(fourth)
        finish(third)  # a refused request holds nothing, and finishing it frees nothing
        assert await client.in_use("key:alpha:parallel") == 0

    run(body, {"auth": keys(max_parallel=2)})


def test_429s_are_openai_shaped_with_retry_after(run: Run) -> None:
    async def body(client: Client) -> None:
        await client.statuses(2)
        _, error = await client.admit()
        assert error is not None
        body = error.to_dict()["error"]
        assert body["type"] == "requests" and body["code"] == "rate_limit_exceeded" and body["param"] is None
        # rpm 2: one request comes back every 30 s.
        assert body["message"].startswith("Rate limit reached for alpha on requests per min (RPM): Limit 2, Used 2, ")
        assert "Requested 1. Please try again in 29." in body["message"] or "in 30s." in body["message"]
        assert error.headers["retry-after"] == "30"
        assert 29_000 < int(error.headers["retry-after-ms"]) <= 30_000
        assert error.retry_after is not None and 29 < error.retry_after <= 30
        assert error.quota_subject == "key:alpha"

    run(body, {"auth": keys(rpm=2)})


def test_headers_show_the_tightest_scope(run: Run) -> None:
    async def body(client: Client) -> None:
        record, _ = await client.admit(chat(max_tokens=100))
        headers = record.call.response_metadata
        # Key: rpm 10, tpm 50000; model: rpm 4, tpm 90000. Tightest: the model's rpm, the key's tpm.
        assert headers["x-ratelimit-limit-requests"] == "4"
        assert headers["x-ratelimit-remaining-requests"] == "3"
        assert headers["x-ratelimit-reset-requests"] == "15s"
        assert headers["x-ratelimit-limit-tokens"] == "50000"
        reserved = 50000 - int(headers["x-ratelimit-remaining-tokens"])
        assert 100 < reserved < 120
        finish(record, prompt=3, completion=3)
        record, _ = await client.admit(chat(max_tokens=100))
        assert record.call.response_metadata["x-ratelimit-remaining-requests"] == "2"
        reset = record.call.response_metadata["x-ratelimit-reset-requests"]  # two requests' worth, less what refilled
        assert reset == "30s" or (reset.startswith("29.") and reset.endswith("s")), reset

    run(body, {"auth": keys(rpm=10, tpm=50000), "limits": {"gpt-4o": {"rpm": 4, "tpm": 90000}}})


def test_model_limits_apply_without_auth(run: Run) -> None:
    async def body(client: Client) -> None:
        assert await client.statuses(4, key=None) == [200, 200, 429, 429]
        assert await client.statuses(3, key=None, request=chat("mini")) == [200] * 3  # no limit of its own

    run(body, {"limits": {"gpt-4o": {"rpm": 2}}})
