"""Router.inherit: which deployments keep their health across a reload, as a table, on real Configs
and Routers (their providers are built but never called)."""

from __future__ import annotations

import asyncio
import copy
import time
from typing import Any

import pytest
from prometheus_client import REGISTRY

from gateway.config import parse
from service.balancer import COOLDOWN, HEALTHY, TRIAL, DeploymentState
from service.router import Router

BASE: dict[str, Any] = {
    "routing": {"cooldown_failures": 3},
    "providers": {
        "a": {"type": "openai", "api_url": "http://127.0.0.1:9/v1", "api_key": "sk-a-0123456789"},
        "b": {"type": "openai", "api_url": "http://127.0.0.1:9/v1", "api_key": "sk-b-0123456789"},
    },
    "models": {
        "gpt-4o": {"deployments": [{"provider": "a", "name": "a"}, {"provider": "b", "name": "b"}]},
        "solo": "a",
    },
}


def _state(router: Router, model: str, name: str) -> DeploymentState:
    return next(s for s in router._balancers[model].states if s.deployment.name == name)


def _gauge(model: str, deployment: str) -> float | None:
    return REGISTRY.get_sample_value("llm_gateway_deployment_state", {"model": model, "deployment": deployment})


def _changed(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    config = copy.deepcopy(BASE)
    node = config
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return config


CASES = [
    # (what the reload changes, the providers it keeps, does deployment a keep its health)
    ("another model added", _changed(("models", "other"), "b"), {"a", "b"}, True),
    ("a's provider changed", _changed(("providers", "a", "read_timeout"), 99), {"b"}, False),
    (
        "a's upstream model changed",
        _changed(
            ("models", "gpt-4o", "deployments"),
            [{"provider": "a", "name": "a", "model": "gpt-4o-2024"}, {"provider": "b", "name": "b"}],
        ),
        {"a", "b"},
        False,
    ),
    (
        "a renamed",
        _changed(
            ("models", "gpt-4o", "deployments"), [{"provider": "a", "name": "a2"}, {"provider": "b", "name": "b"}]
        ),
        {"a", "b"},
        False,
    ),
]


@pytest.mark.parametrize(("change", "config", "kept", "carried"), CASES, ids=[c[0] for c in CASES])
def test_which_deployments_keep_their_health(
    change: str, config: dict[str, Any], kept: set[str], carried: bool
) -> None:
    async def run() -> None:
        old = Router(parse(BASE, {}))
        cooling = _state(old, "gpt-4o", "a")
        cooling.started()
        cooling.failed(time.monotonic(), counts=True)
        cooling._enter_cooldown(time.monotonic())
        assert cooling.state == COOLDOWN
        new = Router(parse(config, {}))
        new.inherit(old, kept)
        names = [s.deployment.name for s in new._balancers["gpt-4o"].states]
        first = _state(new, "gpt-4o", names[0])
        assert first.state == (COOLDOWN if carried else HEALTHY), change
        if carried:
            assert first.cooldown_until == cooling.cooldown_until
        assert _state(new, "gpt-4o", "b").state == HEALTHY
        assert _state(new, "solo", "a/solo").state == HEALTHY  # the same provider under another model: its own
        await old.close()
        await new.close()

    asyncio.run(run())


def test_recent_failures_carry_over_and_a_trial_becomes_due_again() -> None:
    async def run() -> None:
        old = Router(parse(BASE, {}))
        failing, trying = _state(old, "gpt-4o", "a"), _state(old, "gpt-4o", "b")
        now = time.monotonic()
        for _ in range(2):  # two of the three failures that bench it
            failing.started()
            failing.failed(now, counts=True)
        trying._enter_cooldown(now - 60)  # long over: the next request is its trial
        trying.started()
        assert (failing.state, trying.state) == (HEALTHY, TRIAL)
        new = Router(parse(BASE, {}))
        new.inherit(old, {"a", "b"})
        carried, due = _state(new, "gpt-4o", "a"), _state(new, "gpt-4o", "b")
        assert due.state == COOLDOWN and due.available(time.monotonic())  # its own trial, here
        assert due.in_flight == 0  # the trial in flight ends on the old core
        carried.started()
        carried.failed(time.monotonic(), counts=True)  # the third failure benches it
        assert carried.state == COOLDOWN
        # The old core's trial ends there, healed: the shared gauge keeps showing the new core's state.
        trying.succeeded()
        assert trying.state == HEALTHY
        assert _gauge("gpt-4o", "b") == COOLDOWN and _gauge("gpt-4o", "a") == COOLDOWN
        await old.close()
        await new.close()

    asyncio.run(run())
