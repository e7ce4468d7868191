"""Metric children in the form the request path updates them.

prometheus-client's `Counter.inc` and `Histogram.observe` check the child and the amount on every
call, and `observe` finds its bucket with a Python loop over the bounds: about 2,600 and 5,000
instructions per update, some fifteen updates per request. The forms here go straight to the child's
values (gateway/metrics.py's value classes, single- or multi-process) and find the bucket with
`bisect`: about 900 and 1,500. What a scrape reads is the same (tests/gateway/test_hotmetrics.py).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable

from prometheus_client import Counter, Gauge, Histogram


def incrementer(child: Counter | Gauge) -> Callable[[float], None]:
    """`child.inc`; for a counter, amounts the caller knows are not negative (token counts, ones, costs)."""
    inc: Callable[[float], None] = child._value.inc  # type: ignore[union-attr]
    return inc


class Observer:
    """`child.observe` of one histogram child."""

    __slots__ = ("_bounds", "_buckets", "_sum", "observe")

    def __init__(self, child: Histogram) -> None:
        self._bounds = tuple(child._upper_bounds)  # ends with +Inf: every amount finds a bucket
        self._buckets = child._buckets
        self._sum = child._sum
        # The gateway's value classes (gateway/metrics.py) are a plain float `_value` that `inc` adds to:
        # added to here directly, two method calls fewer per observation. Any other value class: its inc.
        plain = all(getattr(type(v), "inc", None) in _plain_incs() for v in (self._sum, *self._buckets))
        self.observe: Callable[[float], None] = self._add if plain else self._inc

    def _add(self, amount: float) -> None:
        self._sum._value += amount
        # The first bound >= amount, as prometheus-client's `amount <= bound` scan finds it.
        self._buckets[bisect_left(self._bounds, amount)]._value += 1.0

    def _inc(self, amount: float) -> None:
        self._sum.inc(amount)
        self._buckets[bisect_left(self._bounds, amount)].inc(1.0)


def _plain_incs() -> frozenset[object]:
    from gateway import metrics  # the value classes; imported here, as metrics.py is the one that picks them

    return frozenset({metrics._LoopValue.inc, metrics._BufferedValue.inc})
