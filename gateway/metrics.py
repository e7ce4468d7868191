"""Prometheus metrics, defined once for both layers, and their exposition.

With several worker processes the CLI sets PROMETHEUS_MULTIPROC_DIR before any worker imports this
module, so prometheus-client keeps every value in shared files and `/metrics` shows the sum over
all workers. Each worker updates its values in memory and writes them to its file every
FLUSH_INTERVAL seconds, before it answers a scrape, and when it stops (see `_BufferedValue`).

Labels: `model` is the model name the client asked for when the gateway serves it, else "unknown"
(so a client cannot blow up the label set); `provider` is the configured provider name, else "none".
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as _multiprocess
from prometheus_client import values as _values
from prometheus_client.mmap_dict import MmapedDict, mmap_key

from .logs import get_logger

_log = get_logger("metrics")

MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
# How stale another worker's values may be in a scrape; the scraped worker's own are always current.
FLUSH_INTERVAL = 0.5


class _BufferedValue:
    """prometheus-client's multiprocess value, written to the worker's mmap file by `flush()` rather
    than on every update. The stock one takes a lock and writes the file on each `inc`: about 1 us
    per counter and 2 per histogram observation, 12 updates per request. Every update happens on the
    worker's event-loop thread, so a plain float is enough."""

    _multiprocess = True
    instances: list[_BufferedValue] = []

    def __init__(
        self,
        typ: str,
        metric_name: str,
        name: str,
        labelnames: Any,
        labelvalues: Any,
        help_text: str,
        multiprocess_mode: str = "",
        **_: Any,
    ) -> None:
        self.file_prefix = f"{typ}_{multiprocess_mode}" if typ == "gauge" else typ
        self.key = mmap_key(metric_name, name, labelnames, labelvalues, help_text)
        self._value = 0.0
        self.timestamp = 0.0
        self.written: float | None = None  # None: not in the file yet (a new child shows as 0 once flushed)
        _BufferedValue.instances.append(self)

    def inc(self, amount: float) -> None:
        self._value += amount

    def set(self, value: float, timestamp: float | None = None) -> None:
        self._value = value
        self.timestamp = timestamp or 0.0

    def set_exemplar(self, exemplar: Any) -> None:  # multiprocess mode has no exemplars
        return None

    def get(self) -> float:
        return self._value

    def get_exemplar(self) -> None:
        return None


_files: dict[str, MmapedDict] = {}
_files_pid = 0


def flush() -> None:
    """Write this worker's changed values to its multiprocess files (a no-op in single-process mode)."""
    global _files_pid
    if not MULTIPROCESS:
        return
    pid = os.getpid()
    if pid != _files_pid:  # first flush, or a forked child: its own files, everything written afresh
        _files.clear()
        _files_pid = pid
        for value in _BufferedValue.instances:
            value.written = None
    directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    for value in _BufferedValue.instances:
        current = value._value
        if current != value.written:
            file = _files.get(value.file_prefix)
            if file is None:
                path = os.path.join(directory, f"{value.file_prefix}_{pid}.db")
                file = _files[value.file_prefix] = MmapedDict(path)  # type: ignore[no-untyped-call]
            file.write_value(value.key, current, value.timestamp)  # type: ignore[no-untyped-call]
            value.written = current


async def flush_periodically(interval: float = FLUSH_INTERVAL) -> None:
    """The worker's flush timer: run as a task for the worker's life, then call `flush()` once more."""
    while True:
        await asyncio.sleep(interval)
        try:
            flush()
        except Exception:  # a full disk, say: keep serving, keep trying
            _log.error("cannot write metric values", exc_info=True)


class _LoopValue:
    """The single-process value: a plain float. prometheus-client's MutexValue takes a lock on every
    update (about 0.3 us, some 15 updates per request); here every update and read happens on the
    worker's event-loop thread, as for `_BufferedValue`."""

    _multiprocess = False

    def __init__(self, *_: Any, **__: Any) -> None:
        self._value = 0.0

    def inc(self, amount: float) -> None:
        self._value += amount

    def set(self, value: float, timestamp: float | None = None) -> None:
        self._value = value

    def set_exemplar(self, exemplar: Any) -> None:  # exemplars are not exposed by this gateway
        return None

    def get(self) -> float:
        return self._value

    def get_exemplar(self) -> None:
        return None


# Chosen before the first metric below is built: prometheus-client reads this per child it creates.
_values.ValueClass = _BufferedValue if MULTIPROCESS else _LoopValue

UNKNOWN_MODEL = "unknown"
NO_PROVIDER = "none"

# LLM latencies span milliseconds (cached, dummy) to minutes (long reasoning completions).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
# The gateway's own overhead should be well under a millisecond.
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)

_LABELS = ("model", "provider")

# `usage`: "reported" when the upstream said, "estimated" when the gateway counted (service/usage_estimate.py).
# Queries that sum by model and provider count both, as before the label existed.
_TOKEN_LABELS = (*_LABELS, "usage")
USAGE_REPORTED, USAGE_ESTIMATED = "reported", "estimated"
PROMPT_TOKENS = Counter("llm_gateway_prompt_tokens", "Prompt tokens served.", _TOKEN_LABELS)
COMPLETION_TOKENS = Counter("llm_gateway_completion_tokens", "Completion tokens served.", _TOKEN_LABELS)
TOTAL_TOKENS = Counter("llm_gateway_total_tokens", "Total tokens served.", _TOKEN_LABELS)

REQUESTS = Counter(
    "llm_gateway_requests",
    "Chat and model requests by outcome: the HTTP status the client got (200, 400, 429, 499, 502, ...).",
    (*_LABELS, "stream", "outcome"),
)
REQUEST_DURATION = Histogram(
    "llm_gateway_request_duration_seconds",
    "Time from request to the last byte of the answer.",
    (*_LABELS, "stream"),
    buckets=LATENCY_BUCKETS,
)
TIME_TO_FIRST_TOKEN = Histogram(
    "llm_gateway_time_to_first_token_seconds",
    "Streams: time from request to the first chunk.",
    _LABELS,
    buckets=LATENCY_BUCKETS,
)
UPSTREAM_DURATION = Histogram(
    "llm_gateway_upstream_duration_seconds",
    "Time spent waiting on the upstream provider.",
    _LABELS,
    buckets=LATENCY_BUCKETS,
)
OVERHEAD = Histogram(
    "llm_gateway_overhead_seconds",
    "The gateway's own time: request duration minus time waiting on the upstream and on the client.",
    _LABELS,
    buckets=OVERHEAD_BUCKETS,
)
IN_FLIGHT = Gauge(
    "llm_gateway_requests_in_flight",
    "Chat requests being served.",
    _LABELS,
    multiprocess_mode="livesum",
)
UPSTREAM_ERRORS = Counter(
    "llm_gateway_upstream_errors",
    "Failed upstream calls by error type (timeout, unavailable, bad_response, http_<status>).",
    ("provider", "type"),
)

UPSTREAM_CONNECTION_RETRIES = Counter(
    "llm_gateway_upstream_connection_retries",
    "Requests sent again at once on a new connection because the upstream closed the kept-alive one"
    " as it was reused, before answering (not a routing retry; no backoff, no cooldown).",
    ("provider",),
)

GRPC_HANDLED = Counter(
    "llm_gateway_grpc_server_handled",
    "gRPC calls completed on the server, by method and status code.",
    ("grpc_method", "grpc_code"),
)
GRPC_HANDLING = Histogram(
    "llm_gateway_grpc_server_handling_seconds",
    "Duration of gRPC calls on the server, by method.",
    ("grpc_method",),
    buckets=LATENCY_BUCKETS,
)


def exposition() -> tuple[bytes, str]:
    """The text for GET /metrics, summed over all workers in multiprocess mode."""
    if MULTIPROCESS:
        flush()  # this worker's own values are current; the others' are at most FLUSH_INTERVAL old
        registry = CollectorRegistry()
        _multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def mark_worker_dead(pid: int) -> None:
    """Drop a finished worker's live gauges (in-flight) from the multiprocess files."""
    if MULTIPROCESS:
        _multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


DEPLOYMENT_STATE = Gauge(
    "llm_gateway_deployment_state",
    "Deployment health in this worker: 0 healthy, 1 cooling down, 2 on trial.",
    ("model", "deployment"),
    multiprocess_mode="livemax",
)
RETRIES = Counter(
    "llm_gateway_retries",
    "Attempts after a retryable failure, by the configured model and the deployment retried on.",
    ("model", "deployment"),
)
FALLBACKS = Counter(
    "llm_gateway_fallbacks",
    "Requests handed to a fallback model after every deployment of the model asked for failed.",
    ("model", "fallback"),
)

# Spend and the usage ledger. `key` is the gateway key's name ("none" when auth is off), `team` its
# metadata.team ("none" without one); money is a float here only because Prometheus counters are:
# the ledger holds integer micro-dollars.
COST = Counter(
    "llm_gateway_cost_usd",
    "Cost of the upstream usage in USD, from the price table or the model's configured price.",
    ("model", "provider", "key", "team"),
)
UNPRICED = Counter(
    "llm_gateway_unpriced_requests",
    "Requests with upstream usage whose model has no price: their cost is unknown (and counted as 0).",
    _LABELS,
)
LEDGER_BUFFERED = Gauge(
    "llm_gateway_ledger_buffered",
    "Usage records waiting in memory for the ledger database.",
    multiprocess_mode="livesum",
)
LEDGER_WRITTEN = Counter("llm_gateway_ledger_written", "Usage records written to the ledger database.")
LEDGER_DROPPED = Counter(
    "llm_gateway_ledger_dropped",
    "Usage records lost: the oldest, dropped from a full buffer, or still unwritten when the worker stopped.",
)
LEDGER_ERRORS = Counter("llm_gateway_ledger_write_errors", "Failed writes of a batch to the ledger database.")


def _count_tasks() -> float:
    import asyncio

    try:
        return float(len(asyncio.all_tasks()))
    except RuntimeError:  # no running loop in this thread
        return 0.0


if not MULTIPROCESS:
    # Leak checks read this next to prometheus-client's process_open_fds and process_resident_memory_bytes.
    Gauge("llm_gateway_asyncio_tasks", "asyncio tasks alive in this worker's event loop.").set_function(_count_tasks)

# Tenancy: per gateway API key (the key's configured name, never its secret; "none" when auth is off).
KEY_REQUESTS = Counter(
    "llm_gateway_key_requests",
    "Chat requests by gateway API key, model and outcome (the HTTP status).",
    ("key", "model", "outcome"),
)
KEY_TOKENS = Counter(
    "llm_gateway_key_tokens",
    "Tokens by gateway API key and model, from upstream usage; type is prompt or completion.",
    ("key", "model", "type"),
)
RATE_LIMITED = Counter(
    "llm_gateway_rate_limited",
    "Requests refused by the gateway's own limits: scope key, model or team; kind requests, tokens, parallel,"
    " too_large or budget.",
    ("key", "scope", "kind"),
)
STATE_BACKEND_UP = Gauge(
    "llm_gateway_state_backend_up",
    "1 while the shared state backend (Redis) answers; 0 while limits fall back to each process.",
    ("backend",),
    multiprocess_mode="livemin",
)
STATE_BACKEND_ERRORS = Counter(
    "llm_gateway_state_backend_errors",
    "Failed or timed-out calls to the shared state backend.",
    ("backend",),
)

# Config reloads, counted by the process that validates them (the main one): once per reload, not per worker.
CONFIG_RELOADS = Counter(
    "llm_gateway_config_reloads",
    "Config reloads by result: applied, rejected (invalid; the old config kept serving) or unchanged.",
    ("result",),
)
CONFIG_INFO = Gauge(
    "llm_gateway_config_info",
    "1 for the SHA-256 of the config file in force (0 for those it replaced).",
    ("sha256",),
    multiprocess_mode="livemax",
)

# Budgets: spend in the current period by the ledger, per key and per team (scope), refreshed off the
# request path every budgets.metrics_interval seconds. Every worker reads the same ledger: the max.
BUDGET_SPENT = Gauge(
    "llm_gateway_budget_spent_usd",
    "Spend in the budget's current period (USD), from the usage ledger; scope is key or team.",
    ("scope", "name"),
    multiprocess_mode="livemax",
)
BUDGET_LIMIT = Gauge(
    "llm_gateway_budget_limit_usd",
    "The budget per period (USD); scope is key or team.",
    ("scope", "name"),
    multiprocess_mode="livemax",
)
