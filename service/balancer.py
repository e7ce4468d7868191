"""Deployments of one model: their health (cooldown), and which one serves the next attempt.

A deployment that fails retryably `cooldown_failures` times within `cooldown_window` seconds is
skipped for `cooldown_seconds` while another candidate is available; after that it gets one trial
request, which either heals it or sends it back to cooldown. Cooldown never refuses a request: when
every candidate cools down, the request is the trial of the one whose cooldown ends first (see
retry.AttemptPlan). State is per worker process; with `state.redis_url` every worker and replica also
learns of the others' cooldowns within a second (service/tenancy/cooldown.py).

Load balancing:
- `weighted`: a random pick in proportion to `weight` (weight 0 takes traffic only when nothing else is
  available);
- `least_inflight`: the deployment with the fewest requests in flight in this worker, ties broken by
  weight and then by order.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Iterable
from typing import Any, Protocol

from prometheus_client import Counter, Gauge

from gateway import metrics
from gateway.config import Deployment, ModelRoute, RoutingConfig

from .providers import Provider

HEALTHY, COOLDOWN, TRIAL = 0, 1, 2


class DeploymentState:
    __slots__ = (
        "_failures",
        "_gauge",
        "_settings",
        "cooldown_until",
        "deployment",
        "in_flight",
        "model",
        "provider",
        "retries",
        "shared",
        "state",
    )

    def __init__(self, model: str, deployment: Deployment, provider: Provider, settings: RoutingConfig) -> None:
        self.model = model
        # With a shared state backend: tells the other workers and replicas when this one cools or heals.
        self.shared: CooldownListener | None = None
        self.deployment = deployment
        self.provider = provider
        self._settings = settings
        self.in_flight = 0
        self.state = HEALTHY
        self.cooldown_until = 0.0
        self._failures: deque[float] = deque()
        self._gauge: Gauge = metrics.DEPLOYMENT_STATE.labels(model, deployment.name)
        self._gauge.set(HEALTHY)
        self.retries: Counter = metrics.RETRIES.labels(model, deployment.name)

    def available(self, now: float) -> bool:
        # Healthy, or cooled down long enough to be due a trial request.
        return self.state == HEALTHY or (self.state == COOLDOWN and now >= self.cooldown_until)

    def started(self) -> None:
        self.in_flight += 1
        if self.state == COOLDOWN:  # its cooldown is over, or nothing else could serve: a trial
            self._set(TRIAL)

    def succeeded(self) -> None:
        self.in_flight -= 1
        if self.state != HEALTHY:
            self._failures.clear()
            self._set(HEALTHY)
            if self.shared is not None:
                self.shared.healed(self)

    def failed(self, now: float, counts: bool) -> None:
        """`counts`: the failure says something about the deployment (retryable), not the request."""
        self.in_flight -= 1
        if not counts:
            if self.state == TRIAL:
                self._set(HEALTHY)  # it answered; the request was at fault
            return
        if self.state != HEALTHY:  # a trial failed (or a request that was in flight when it cooled)
            self._enter_cooldown(now)
            return
        settings = self._settings
        failures = self._failures
        failures.append(now)
        while failures and failures[0] < now - settings.cooldown_window:
            failures.popleft()
        if len(failures) >= settings.cooldown_failures:
            self._enter_cooldown(now)

    def abandoned(self) -> None:
        """The attempt ended without a verdict (the client went away)."""
        self.in_flight -= 1
        if self.state == TRIAL:
            self._set(COOLDOWN)  # still due a trial: cooldown_until has passed

    def _enter_cooldown(self, now: float) -> None:
        self._failures.clear()
        self.cooldown_until = now + self._settings.cooldown_seconds
        self._set(COOLDOWN)
        if self.shared is not None:
            self.shared.cooled(self, self._settings.cooldown_seconds)

    def cool_remotely(self, seconds: float) -> None:
        """Another worker or replica benched this deployment: skip it here too, for what is left of that
        cooldown (then it gets its trial here as well). A trial in flight here is left to finish."""
        until = time.monotonic() + seconds
        if self.state == HEALTHY or (self.state == COOLDOWN and until > self.cooldown_until):
            self._failures.clear()
            self.cooldown_until = until
            self._set(COOLDOWN)

    def heal_remotely(self) -> None:
        """Another worker or replica saw it answer: healthy here too, unless a trial is in flight."""
        if self.state == COOLDOWN:
            self._failures.clear()
            self._set(HEALTHY)

    def inherit(self, old: DeploymentState) -> None:
        """After a reload: the health of the same deployment on the core it replaces. A trial in flight
        there ends there; here the deployment is due a trial of its own (its cooldown has passed)."""
        self._failures = deque(old._failures)
        self.cooldown_until = old.cooldown_until
        self._set(COOLDOWN if old.state == TRIAL else old.state)
        # The gauge child is shared: a call still ending on the old core must not overwrite this one's state.
        old._gauge = _DETACHED

    def _set(self, state: int) -> None:
        self.state = state
        self._gauge.set(state)


class _Detached:
    """The gauge of a deployment state a reload has replaced: its transitions are no longer shown."""

    def set(self, value: float) -> None:
        return None


_DETACHED: Any = _Detached()


class CooldownListener(Protocol):
    def cooled(self, state: DeploymentState, seconds: float) -> None: ...

    def healed(self, state: DeploymentState) -> None: ...


class Balancer:
    def __init__(self, route: ModelRoute, states: Iterable[DeploymentState]) -> None:
        self.route = route
        self.states = tuple(states)
        self._least_inflight = route.load_balancing == "least_inflight"

    def pick(self, tried: set[DeploymentState]) -> DeploymentState | None:
        """A deployment for the next attempt, preferring ones this request has not tried yet; None when
        every deployment is cooling down (or on trial)."""
        now = time.monotonic()
        if len(self.states) == 1:  # the common case: no lists, no random draw
            only = self.states[0]
            return only if only.available(now) else None
        available = [s for s in self.states if s.available(now)]
        if not available:
            return None
        fresh = [s for s in available if s not in tried] or available
        if len(fresh) == 1:
            return fresh[0]
        if self._least_inflight:
            return min(fresh, key=lambda s: (s.in_flight, -s.deployment.weight))
        weights = [s.deployment.weight for s in fresh]
        if not any(weights):
            return fresh[0]
        return random.choices(fresh, weights=weights)[0]

    def soonest(self) -> DeploymentState:
        """The deployment whose cooldown ends first (one already on trial ended in the past)."""
        if len(self.states) == 1:
            return self.states[0]
        return min(self.states, key=_cooldown_end)


def _cooldown_end(state: DeploymentState) -> float:
    return state.cooldown_until
