"""The price table and the cost arithmetic: exact integers, one rounding per request, the config's override."""

from __future__ import annotations

import json
import re
from datetime import date
from decimal import Decimal
from pathlib import Path

import pytest

from gateway.config import ConfigError, parse
from llm_gateway.v1 import chat_pb2
from service.spend import Price, PriceError, builtin, cached_tokens, load_table, usd
from service.spend.meter import resolve_prices

PRICES_JSON = Path(__file__).resolve().parents[2] / "service" / "spend" / "prices.json"


def test_the_built_in_table_names_its_sources_and_dates_and_covers_the_three_providers() -> None:
    data = json.loads(PRICES_JSON.read_text())
    table = builtin()
    assert table.version == data["version"]
    date.fromisoformat(table.version)
    assert set(table.sources) == {"openai", "gemini", "anthropic"}
    for provider, source in table.sources.items():
        assert source["url"].startswith("https://"), provider
        date.fromisoformat(source["as_of"])
    kinds: dict[tuple[str, str], int] = {}
    for name, entry in data["models"].items():
        kinds[(entry["provider"], entry["kind"])] = kinds.get((entry["provider"], entry["kind"]), 0) + 1
        assert name in table.prices
        assert isinstance(entry["input"], str) and isinstance(entry["output"], str), "decimal text, never a float"
    for provider in ("openai", "gemini", "anthropic"):
        assert kinds.get((provider, "chat"), 0) >= 5, provider
    assert kinds[("openai", "embedding")] >= 2 and kinds[("gemini", "embedding")] >= 1


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("gpt-4o", Price(2_500_000, 1_250_000, 10_000_000)),
        ("gpt-4o-2024-08-06", Price(2_500_000, 1_250_000, 10_000_000)),  # a snapshot of a listed model
        ("gpt-4o-2024-05-13", Price(5_000_000, 5_000_000, 15_000_000)),  # a snapshot listed on its own
        ("gpt-4o-mini", Price(150_000, 75_000, 600_000)),
        ("claude-sonnet-4-5-20250929", Price(3_000_000, 300_000, 15_000_000, cache_write=3_750_000)),
        ("models/gemini-2.5-flash", Price(300_000, 30_000, 2_500_000)),
        ("gemini-2.0-flash-001", Price(100_000, 25_000, 400_000)),
        ("text-embedding-3-small", Price(20_000, 20_000, 0)),  # no cached price: cached tokens cost as input
        ("llama3.2", None),
        ("gpt-4o-mini-tts-unknown", None),
    ],
)
def test_lookup_by_upstream_model_name(model: str, expected: Price | None) -> None:
    assert builtin().lookup(model) == expected


@pytest.mark.parametrize(
    ("price", "usage", "micro_dollars"),
    [
        # gpt-4o: 1000 prompt tokens, 200 of them cached, 500 completion tokens (reasoning included).
        (Price(2_500_000, 1_250_000, 10_000_000), (1000, 200, 500), 2000 + 250 + 5000),
        (Price(2_500_000, 1_250_000, 10_000_000), (11, 0, 7), 98),  # 97.5 rounds half to even: 98
        (Price(150_000, 75_000, 600_000), (10, 0, 5), 4),  # 4.5 -> 4 (half to even)
        (Price(150_000, 75_000, 600_000), (30, 0, 5), 8),  # 7.5 -> 8
        (Price(150_000, 75_000, 600_000), (1, 0, 0), 0),  # 0.15 -> 0
        (Price(2_500_000, 1_250_000, 10_000_000), (100, 500, 0), 125),  # cached beyond prompt: capped at prompt
        (Price(15_000_000, 1_500_000, 75_000_000), (2_000_000, 1_000_000, 1_000_000), 91_500_000),
        (Price(1, 1, 1), (10**12, 0, 10**12), 2_000_000),  # no float anywhere: exact at any size
        # claude-sonnet-4-5: 10 fresh prompt tokens, 1000 read from the cache, 200 written to it, 20 out.
        (Price(3_000_000, 300_000, 15_000_000, cache_write=3_750_000), (1210, 1000, 20, 200), 30 + 300 + 750 + 300),
        (Price(3_000_000, 300_000, 15_000_000), (1210, 1000, 20, 200), 30 + 300 + 600 + 300),  # writes as input
        (
            Price(3_000_000, 300_000, 15_000_000, cache_write=3_750_000),
            (100, 90, 0, 50),
            64,
        ),  # written capped at 10: 27 + 37.5
    ],
)
def test_cost_is_integer_micro_dollars_rounded_once(price: Price, usage: tuple[int, ...], micro_dollars: int) -> None:
    assert price.cost(*usage) == micro_dollars


def test_cost_matches_decimal_arithmetic_over_many_usages() -> None:
    price = Price.parse({"input": "1.10", "cached_input": "0.275", "output": "4.40"}, "o4-mini")
    for prompt in range(0, 3000, 37):
        for completion in range(0, 2000, 53):
            cached = prompt // 3
            exact = (
                Decimal(prompt - cached) * Decimal("1.10") + Decimal(cached) * Decimal("0.275")
                + Decimal(completion) * Decimal("4.40")
            )  # fmt: skip
            assert price.cost(prompt, cached, completion) == int(exact.quantize(Decimal(1)))


@pytest.mark.parametrize(
    ("micro_dollars", "text"), [(0, "0.000000"), (98, "0.000098"), (1_234_567, "1.234567"), (-5, "-0.000005")]
)
def test_usd_text(micro_dollars: int, text: str) -> None:
    assert usd(micro_dollars) == text


@pytest.mark.parametrize(
    ("details", "cached"),
    [
        (None, 0),
        ('{"cached_tokens": 128, "audio_tokens": 0}', 128),
        ('{"audio_tokens": 3}', 0),
        ('{"cached_tokens": null}', 0),
        ('{"cached_tokens": -4}', 0),
        ("not json", 0),
    ],
)
def test_cached_tokens_from_prompt_tokens_details(details: str | None, cached: int) -> None:
    usage = chat_pb2.Usage(prompt_tokens=200, completion_tokens=1, total_tokens=201)
    if details is not None:
        usage.prompt_tokens_details = details
    assert cached_tokens(usage) == cached


def test_a_configured_price_overrides_the_table_for_every_deployment_of_its_model() -> None:
    config = parse(
        {
            "providers": {"a": {"type": "openai", "api_key": "k"}, "b": {"type": "openai", "api_key": "k"}},
            "models": {
                "gpt-4o": {
                    "deployments": [{"provider": "a"}, {"provider": "b", "model": "gpt-4o-2024-11-20"}],
                    "price": {"input": 2, "cached_input": 0.5, "output": 8.25},
                },
                "mini": {"provider": "a", "model": "gpt-4o-mini"},
                "local": {"provider": "a", "model": "my-finetune"},
                "cheap": {"provider": "a", "model": "my-finetune", "price": {"input": "0.1", "output": "0.2"}},
                "claude": {"provider": "a", "model": "x", "price": {"input": 3, "output": 15, "cache_write": 3.75}},
            },
        },
        {},
    )
    prices = resolve_prices(config, builtin())
    assert (
        prices[("gpt-4o", "a/gpt-4o")]
        == prices[("gpt-4o", "b/gpt-4o-2024-11-20")]
        == Price(2_000_000, 500_000, 8_250_000)
    )
    assert prices[("mini", "a/gpt-4o-mini")] == Price(150_000, 75_000, 600_000)
    assert prices[("local", "a/my-finetune")] is None
    assert prices[("cheap", "a/my-finetune")] == Price(100_000, 100_000, 200_000)  # cached defaults to input
    assert prices[("claude", "a/x")] == Price(3_000_000, 3_000_000, 15_000_000, cache_write=3_750_000)
    assert prices[("dummy", "dummy")] is None


@pytest.mark.parametrize(
    ("price", "error"),
    [
        ({"input": 1}, "models.m.price.output: required"),
        ({"input": 1, "output": 2, "cache": 1}, "models.m.price.cache: unknown key"),
        ({"input": 1, "output": 2, "cache_write": "x"}, "models.m.price.cache_write: 'x' is not a price"),
        ({"input": "cheap", "output": 2}, "models.m.price.input: 'cheap' is not a price"),
        ({"input": -1, "output": 2}, "models.m.price.input: -1 is not a price"),
        ({"input": 0.0000001, "output": 2}, "models.m.price.input: 1e-07 is not a price"),
        ({"input": True, "output": 2}, "models.m.price.input: True is not a price"),
        ({"input": 1, "output": float("inf")}, "models.m.price.output: inf is not a price"),
        ("2.5", "models.m.price: must be a mapping"),
    ],
)
def test_a_bad_configured_price_is_a_config_error_naming_the_key(price: object, error: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(error)):
        parse({"models": {"m": {"provider": "dummy", "price": price}}}, {})


@pytest.mark.parametrize(
    ("spec", "error"),
    [
        ({"input": "0.0000001", "output": "1"}, "finer than USD 0.000001"),
        ({"input": "x", "output": "1"}, "is not a price"),
        ({"input": "1"}, "input and output are required"),
    ],
)
def test_a_bad_table_entry_is_refused(spec: dict[str, str], error: str) -> None:
    text = json.dumps({"version": "2025-01-01", "sources": {}, "models": {"m": {"provider": "openai", **spec}}})
    with pytest.raises(PriceError, match=error):
        load_table(text)
