"""A request's cost, counted once when it ends: the metric, the response's cost header, the ledger record.

Prices are resolved once at start-up for every (configured model, deployment) pair: the model's
`price:` if it has one, else the built-in table's price of the deployment's upstream model. A request
then costs one dict lookup, integer arithmetic, and a tuple appended to the ledger's buffer.

Where the cost travels, as `x-llm-gateway-cost-usd` with decimal USD to six places, set into the call's
response metadata when it ends (an unpriced model gets none: its cost is unknown, not zero):
  - gRPC: trailing metadata, unary and streamed;
  - REST unary: a response header.
A REST stream's headers leave before its usage exists, and its chunks reach the client unchanged (the
facade's contract: OpenAI's framing and nothing else), so its cost is in the ledger and the metrics.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import orjson

from gateway import metrics
from gateway.config import Config
from gateway.hotmetrics import incrementer
from llm_gateway.v1 import chat_pb2
from service.ledger import release
from service.ledger.base import UsageRecord

from .prices import MICRO, Price, PriceTable, builtin, usd

if TYPE_CHECKING:
    from service.accounting import RequestRecord
    from service.ledger.writer import LedgerWriter

COST_HEADER = "x-llm-gateway-cost-usd"
NO_KEY = "none"  # the key label and ledger key name of a call made without a gateway key (auth off)


def cached_tokens(usage: chat_pb2.Usage) -> int:
    """`prompt_tokens_details.cached_tokens`: prompt tokens read from the provider's cache."""
    if not usage.HasField("prompt_tokens_details"):
        return 0
    try:
        details = orjson.loads(usage.prompt_tokens_details)
    except orjson.JSONDecodeError:
        return 0
    value = details.get("cached_tokens") if isinstance(details, dict) else None
    return value if type(value) is int and value > 0 else 0


def cache_write_tokens(usage: chat_pb2.Usage) -> int:
    """Anthropic's cache_creation_input_tokens (its provider keeps them in the usage's extra map)."""
    text = usage.extra.get("cache_creation_input_tokens")
    return int(text) if text and text.isdigit() else 0


def resolve_prices(config: Config, table: PriceTable) -> dict[tuple[str, str], Price | None]:
    """(model, deployment name) -> its price, or None when neither the config nor the table has one."""
    resolved: dict[tuple[str, str], Price | None] = {}
    for name, route in config.models.items():
        override = Price.parse(route.price, f"models.{name}.price") if route.price is not None else None
        for deployment in route.deployments:
            resolved[(name, deployment.name)] = override or table.lookup(deployment.upstream_model)
    return resolved


class SpendMeter:
    """Prices, cost metrics and the ledger of one ChatCore."""

    def __init__(self, config: Config, ledger: LedgerWriter | None = None, table: PriceTable | None = None) -> None:
        self.prices = resolve_prices(config, table or builtin())
        self.ledger = ledger
        self._cost: dict[tuple[str, str, str], Callable[[float], None]] = {}
        self._unpriced: dict[tuple[str, str], Callable[[float], None]] = {}

    def price(self, record: RequestRecord) -> Price | None:
        return self.prices.get((record.served_by, record.deployment))

    def settle(self, record: RequestRecord, status: int, elapsed: float) -> None:
        """Count the request's cost and hand its record to the ledger; runs once, in `finish`."""
        usage = record.usage
        route = record.metrics
        key, team = _caller(record)
        prompt = cached = completion = cost = 0
        if usage is not None:
            prompt, completion = usage.prompt_tokens, usage.completion_tokens
            cached = cached_tokens(usage)
            price = self.prices.get((record.served_by, record.deployment))
            if price is None:
                self._unpriced_counter(route.model, route.provider)(1.0)
            else:
                # Without a price of its own a cache write costs as input: its count is not needed.
                written = cache_write_tokens(usage) if price.cache_write is not None and usage.extra else 0
                cost = record.cost = price.cost(prompt, cached, completion, written)
                self._cost_counter(route.model, route.provider, key, team)(cost / MICRO)
                if status == 200:
                    record.call.response_metadata[COST_HEADER] = usd(cost)
        ledger = self.ledger
        if ledger is not None:
            ledger.add(
                _record(  # the fields in UsageRecord's order
                    UsageRecord,
                    (
                        time.time() - elapsed,
                        record.request_id,
                        record.attempts,
                        "embedding" if record.kind == "embedding" else "chat",
                        key,
                        team,
                        record.model,
                        record.served_by,
                        route.provider,
                        record.deployment,
                        prompt,
                        cached,
                        completion,
                        record.usage_estimated,
                        cost,
                        elapsed * 1000.0,
                        status,
                        record.stream,
                    ),
                )
            )

    def _cost_counter(self, model: str, provider: str, key: str, team: str) -> Callable[[float], None]:
        inc = self._cost.get((model, provider, key))
        if inc is None:  # a key has one team: (model, provider, key) is enough to find the child
            child = metrics.COST.labels(model, provider, key, team or NO_KEY)
            inc = self._cost[(model, provider, key)] = incrementer(child)
        return inc

    def _unpriced_counter(self, model: str, provider: str) -> Callable[[float], None]:
        inc = self._unpriced.get((model, provider))
        if inc is None:
            inc = self._unpriced[(model, provider)] = incrementer(metrics.UNPRICED.labels(model, provider))
        return inc

    async def close(self) -> None:
        if self.ledger is not None:
            await release(self.ledger)


def _caller(record: RequestRecord) -> tuple[str, str]:
    """The gateway key's name and its team (`metadata.team`), or ("none", "") when auth is off."""
    tenant = record.tenant
    return _NOBODY if tenant is None else tenant.caller


_NOBODY = (NO_KEY, "")
# A record built as the tuple it is: the named tuple's own __new__ is a Python call taking 18 arguments.
_record: Callable[[type[UsageRecord], tuple[object, ...]], UsageRecord] = tuple.__new__  # type: ignore[assignment]
