"""Which failures are worth another attempt, how long to wait first, and where to try next.

Retryable: connection errors, timeouts, invalid upstream responses, 408, 409, 429 and 5xx, except a
429 for a spend limit or an exhausted quota. Everything else (400, 401, 403, 404, 413, 422, ...) goes
straight back to the client with the upstream's body.

An attempt plan walks the model's deployments (up to `retries` attempts after the first), then each
fallback model in order with the same budget. A retry on the same deployment waits an exponential
backoff with full jitter, or the upstream's Retry-After when that is longer; a wait that does not fit
the request's deadline is not taken, and the plan moves on to the next model instead.

Cooldown steers attempts away from failing deployments, but never refuses a request: when every
deployment of the chain (the model's and its fallbacks') cools down, the first attempt goes to the
one whose cooldown ends first, as its trial (Envoy's panic mode). Its failure is the client's answer.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

from gateway.config import RoutingConfig
from gateway.errors import (
    BadGatewayError,
    GatewayError,
    UpstreamError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)

from .balancer import Balancer, DeploymentState

_RETRYABLE_STATUS = frozenset({408, 409, 429})
# 429s that no wait will fix: a spend limit (Anthropic) or an exhausted quota (OpenAI).
_FINAL_CODES = frozenset({"enforced_spend_limit_reached", "insufficient_quota"})


def retryable(error: GatewayError) -> bool:
    if isinstance(error, UpstreamError):
        if error.code in _FINAL_CODES:
            return False
        return error.http_status in _RETRYABLE_STATUS or error.http_status >= 500
    return isinstance(error, (UpstreamUnavailableError, UpstreamTimeoutError, BadGatewayError))


def retry_after(error: GatewayError) -> float | None:
    """Seconds the upstream asked us to wait (retry-after-ms, or retry-after in seconds or as a date)."""
    headers = error.headers
    if "retry-after-ms" in headers:
        try:
            return max(float(headers["retry-after-ms"]) / 1000, 0.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        return max(parsedate_to_datetime(value).timestamp() - time.time(), 0.0)
    except (TypeError, ValueError):
        return None


# Not frozen: a frozen dataclass's __init__ sets each field through object.__setattr__, one per request.
@dataclass(slots=True)
class Attempt:
    model: str  # the configured model serving this attempt (the one asked for, or a fallback)
    state: DeploymentState
    wait: float  # seconds to sleep before it
    number: int  # 1 for the first attempt of the request


class AttemptPlan:
    def __init__(self, balancers: list[Balancer], settings: RoutingConfig, deadline: float) -> None:
        self._balancers = balancers
        self._settings = settings
        self._deadline = deadline  # time.monotonic() based
        self._index = 0
        self._tries = 0
        self._tried: set[DeploymentState] = set()
        self._last: DeploymentState | None = None
        self.attempts = 0

    def next(self, error: GatewayError | None) -> Attempt | None:
        """The next attempt after `error` (None before the first), or None when there is none."""
        if error is not None and not retryable(error):
            return None
        while self._index < len(self._balancers):
            balancer = self._balancers[self._index]
            if self._tries <= self._settings.retries:
                state = balancer.pick(self._tried)
                if state is not None:
                    wait = self._wait(state, error)
                    if wait is not None:
                        self._tries += 1
                        self._tried.add(state)
                        self._last = state
                        self.attempts += 1
                        if self.attempts > 1 and self._tries > 1:
                            state.retries.inc()
                        return Attempt(balancer.route.name, state, wait, self.attempts)
            self._index += 1
            self._tries = 0
            self._tried = set()
            self._last = None
        if self.attempts:
            return None
        return self._trial()

    def _trial(self) -> Attempt:
        """Every candidate cools down: the first attempt goes to the one whose cooldown ends first."""
        balancer = self._balancers[0]
        state = balancer.soonest()
        for other in self._balancers[1:]:  # only when the chain has fallbacks
            candidate = other.soonest()
            if candidate.cooldown_until < state.cooldown_until:
                balancer, state = other, candidate
        self.attempts = 1
        self._last = state
        return Attempt(balancer.route.name, state, 0.0, 1)

    def _wait(self, state: DeploymentState, error: GatewayError | None) -> float | None:
        if error is None or state is not self._last:
            return 0.0  # a first attempt, or another deployment: no reason to wait
        settings = self._settings
        wait = random.uniform(0, min(settings.backoff_max, settings.backoff_initial * 2 ** (self._tries - 1)))
        asked = retry_after(error)
        if asked is not None:
            wait = max(wait, asked)
        if time.monotonic() + wait >= self._deadline:
            return None
        return wait
