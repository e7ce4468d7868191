"""Prices: the built-in table shipped in `prices.json`, and a model's `price:` from the config.

Money is integer micro-dollars (1 USD = 1_000_000). A price is held as micro-dollars per 1M tokens,
so a cost is `tokens * price` micro-dollars per 1M tokens, an exact integer, rounded once per
request (half to even) to micro-dollars. Prices are parsed from their decimal text with `Decimal`,
never through a float, and must be a whole number of micro-dollars per 1M tokens (USD 0.000001).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from importlib import resources
from typing import Any

MICRO = 1_000_000  # micro-dollars in a dollar
PER = 1_000_000  # a price is per this many tokens

# Names a provider adds to a model the table knows: a dated snapshot, a version number, a path prefix.
_SNAPSHOT = re.compile(r"-(?:\d{8}|\d{4}-\d{2}-\d{2}|\d{3})$")


class PriceError(ValueError):
    """A price that cannot be held exactly, with the place it was found."""


KEYS = ("input", "cached_input", "cache_write", "output")


@dataclass(frozen=True, slots=True)
class Price:
    """Micro-dollars per 1M tokens. `cache_write` is Anthropic's price of a prompt token written to its
    cache (cache_creation_input_tokens); None: such tokens cost as input."""

    input: int
    cached_input: int
    output: int
    cache_write: int | None = None

    def cost(self, prompt: int, cached: int, completion: int, written: int = 0) -> int:
        """Micro-dollars for one request's usage; `cached` (read from the provider's cache) and `written`
        (written to it) are parts of `prompt`."""
        if not cached and not written:  # most requests
            return _round_half_even(prompt * self.input + completion * self.output, PER)
        cached = min(max(cached, 0), prompt)
        written = min(max(written, 0), prompt - cached)
        write_price = self.input if self.cache_write is None else self.cache_write
        scaled = (
            (prompt - cached - written) * self.input
            + cached * self.cached_input
            + written * write_price
            + completion * self.output
        )
        return _round_half_even(scaled, PER)

    @classmethod
    def parse(cls, spec: Any, where: str) -> Price:
        """From {input, cached_input, cache_write, output} in USD per 1M tokens; the cache prices default to
        input."""
        if not isinstance(spec, Mapping):
            raise PriceError(f"{where}: must be a mapping of input, cached_input, output (USD per 1M tokens)")
        for key in spec:
            if key not in KEYS:
                raise PriceError(f"{where}.{key}: unknown key (known: {', '.join(sorted(KEYS))})")
        if "input" not in spec or "output" not in spec:
            raise PriceError(f"{where}: input and output are required (USD per 1M tokens)")
        price_in = micro(spec["input"], f"{where}.input")
        cached, write = spec.get("cached_input"), spec.get("cache_write")
        return cls(
            input=price_in,
            cached_input=price_in if cached is None else micro(cached, f"{where}.cached_input"),
            output=micro(spec["output"], f"{where}.output"),
            cache_write=None if write is None else micro(write, f"{where}.cache_write"),
        )


def micro(value: Any, where: str) -> int:
    """USD (a number or decimal text) -> whole micro-dollars, exactly, or PriceError."""
    if isinstance(value, bool):
        raise PriceError(f"{where}: {value!r} is not a price")
    try:
        # str() first: a YAML float like 2.5 becomes Decimal("2.5"), not its binary expansion.
        amount = Decimal(str(value)) * MICRO
    except (InvalidOperation, ValueError):
        raise PriceError(f"{where}: {value!r} is not a price") from None
    if not amount.is_finite() or amount < 0:
        raise PriceError(f"{where}: {value!r} is not a price")
    if amount != amount.to_integral_value():
        raise PriceError(f"{where}: {value!r} is finer than USD 0.000001 per 1M tokens")
    return int(amount)


def usd(micro_dollars: int) -> str:
    """Micro-dollars as decimal text with six places: 1234 -> "0.001234"."""
    sign = "-" if micro_dollars < 0 else ""
    whole, part = divmod(abs(micro_dollars), MICRO)
    return f"{sign}{whole}.{part:06d}"


def _round_half_even(numerator: int, denominator: int) -> int:
    quotient, remainder = divmod(numerator, denominator)
    twice = 2 * remainder
    if twice > denominator or (twice == denominator and quotient % 2):
        quotient += 1
    return quotient


@dataclass(frozen=True)
class PriceTable:
    """The built-in prices by model name, with their version and sources."""

    version: str
    sources: Mapping[str, Mapping[str, str]]
    prices: Mapping[str, Price]

    def lookup(self, model: str) -> Price | None:
        """The price of an upstream model name: as written, without a `models/` prefix, or without a
        snapshot suffix (gpt-4o-2024-08-06, claude-sonnet-4-5-20250929, gemini-2.0-flash-001)."""
        name = model.removeprefix("models/")
        for candidate in (model, name, _SNAPSHOT.sub("", name)):
            price = self.prices.get(candidate)
            if price is not None:
                return price
        return None


def load_table(text: str | None = None) -> PriceTable:
    """The table in `text`, else the one shipped with the package (read from disk, never the network)."""
    if text is None:
        text = resources.files(__package__).joinpath("prices.json").read_text(encoding="utf-8")
    data = json.loads(text)
    prices = {name: Price.parse(spec_of(spec), f"prices.json: {name}") for name, spec in data["models"].items()}
    return PriceTable(version=str(data["version"]), sources=data["sources"], prices=prices)


def spec_of(entry: Mapping[str, Any]) -> dict[str, Any]:
    return {key: entry[key] for key in KEYS if key in entry}


_BUILTIN: PriceTable | None = None


def builtin() -> PriceTable:
    global _BUILTIN
    if _BUILTIN is None:
        _BUILTIN = load_table()
    return _BUILTIN
