"""The request-path forms of metric children leave what prometheus-client's own updates leave."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from gateway import metrics  # noqa: F401 - picks this gateway's value class, as the service does
from gateway.hotmetrics import Observer, incrementer

BOUNDS = (0.0001, 0.00025, 0.001, 0.5, 1, 10)
# Bounds themselves (an amount equal to a bound belongs to that bucket), between them, and beyond the last.
AMOUNTS = (0.0, 0.00005, 0.0001, 0.00010001, 0.00025, 0.0007, 0.001, 0.3, 0.5, 0.9999, 1.0, 7.0, 10.0, 10.5, 1e9)
AMOUNTS += (math.inf,)


def samples(registry: CollectorRegistry) -> list[tuple[str, dict[str, str], float]]:
    """Every sample but the _created timestamps (the two registries are built at different instants)."""
    return [
        (s.name, s.labels, s.value)
        for family in registry.collect()
        for s in family.samples
        if not s.name.endswith("_created")
    ]


@pytest.mark.parametrize("amount", AMOUNTS)
def test_an_observation_lands_in_the_bucket_prometheus_client_picks(amount: float) -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    mine = Histogram("h", "h", ("a",), buckets=BOUNDS, registry=ours).labels("x")
    reference = Histogram("h", "h", ("a",), buckets=BOUNDS, registry=theirs).labels("x")
    Observer(mine).observe(amount)
    reference.observe(amount)
    assert samples(ours) == samples(theirs)


def test_many_observations_and_increments_match() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    observer = Observer(Histogram("h", "h", buckets=BOUNDS, registry=ours))
    reference = Histogram("h", "h", buckets=BOUNDS, registry=theirs)
    counter, reference_counter = Counter("c", "c", registry=ours), Counter("c", "c", registry=theirs)
    gauge, reference_gauge = Gauge("g", "g", registry=ours), Gauge("g", "g", registry=theirs)
    inc, gauge_inc = incrementer(counter), incrementer(gauge)
    for index, amount in enumerate(AMOUNTS * 3):
        observer.observe(amount)
        reference.observe(amount)
        inc(index)
        reference_counter.inc(index)
        gauge_inc(1.0 if index % 3 else -1.0)
        reference_gauge.inc(1.0 if index % 3 else -1.0)
    assert samples(ours) == samples(theirs)


def test_a_histogram_of_another_value_class_is_observed_through_its_inc(monkeypatch: pytest.MonkeyPatch) -> None:
    from prometheus_client import values

    ours, theirs = CollectorRegistry(), CollectorRegistry()
    monkeypatch.setattr(values, "ValueClass", values.MutexValue)  # prometheus-client's own, with its lock
    mine = Histogram("h", "h", buckets=BOUNDS, registry=ours)
    monkeypatch.undo()
    reference = Histogram("h", "h", buckets=BOUNDS, registry=theirs)
    observer = Observer(mine)
    assert observer.observe == observer._inc
    for amount in AMOUNTS:
        observer.observe(amount)
        reference.observe(amount)
    assert samples(ours) == samples(theirs)
