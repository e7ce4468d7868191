"""Spend: prices, the cost of each request, and its hand-off to the usage ledger."""

from .meter import COST_HEADER, SpendMeter, cached_tokens
from .prices import Price, PriceError, PriceTable, builtin, load_table, usd

__all__ = [
    "COST_HEADER",
    "Price",
    "PriceError",
    "PriceTable",
    "SpendMeter",
    "builtin",
    "cached_tokens",
    "load_table",
    "usd",
]
