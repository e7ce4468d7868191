"""Routing by model name to deployments, as the config says."""

from __future__ import annotations

import time

from gateway.config import Config
from gateway.errors import ModelNotFoundError
from llm_gateway.v1 import chat_pb2

from .accounting import RouteMetrics
from .balancer import Balancer, DeploymentState
from .providers import Provider, build_provider
from .retry import AttemptPlan


class Router:
    def __init__(self, config: Config, providers: dict[str, Provider] | None = None) -> None:
        self._settings = config.routing
        self._providers = (
            providers
            if providers is not None
            else {name: build_provider(spec) for name, spec in config.providers.items()}
        )
        self._balancers = {
            name: Balancer(
                route,
                (DeploymentState(name, d, self._providers[d.provider], config.routing) for d in route.deployments),
            )
            for name, route in config.models.items()
        }
        # A request's balancers: the model's own, then its fallbacks', in order. Built once.
        self._chains = {
            name: [balancer, *(self._balancers[other] for other in balancer.route.fallback)]
            for name, balancer in self._balancers.items()
        }
        # Metric children per (model asked for, provider that answered), bound once.
        self._metrics = {
            (name, state.deployment.provider): RouteMetrics(name, state.deployment.provider)
            for name, chain in self._chains.items()
            for balancer in chain
            for state in balancer.states
        }
        created = int(time.time())
        # Built once: the list never changes while the process runs.
        self._models = chat_pb2.ListModelsResponse(
            object="list",
            data=[
                chat_pb2.Model(id=name, object="model", created=created, owned_by=route.provider)
                for name, route in config.models.items()
            ],
        )

    def plan(self, model: str, deadline: float) -> AttemptPlan:
        chain = self._chains.get(model)
        if chain is None:
            raise ModelNotFoundError(
                f"The model '{model}' does not exist or you do not have access to it.", param="model"
            )
        return AttemptPlan(chain, self._settings, deadline)

    def metrics(self, model: str, provider: str) -> RouteMetrics:
        return self._metrics[(model, provider)]

    def list_models(self) -> chat_pb2.ListModelsResponse:
        return self._models

    def deployments(self) -> list[DeploymentState]:
        """Every deployment's state, once each."""
        return [state for balancer in self._balancers.values() for state in balancer.states]

    @property
    def providers(self) -> dict[str, Provider]:
        return self._providers

    def inherit(self, old: Router, kept: set[str]) -> None:
        """After a reload: deployments still served the same way (same model, deployment name, upstream
        model, and a provider whose settings did not change) keep their health, so a reload does not
        send traffic back to one in cooldown. A changed provider (a new key, say) starts healthy."""
        before = {
            (model, state.deployment.name): state
            for model, balancer in old._balancers.items()
            for state in balancer.states
        }
        for model, balancer in self._balancers.items():
            for state in balancer.states:
                previous = before.get((model, state.deployment.name))
                deployment = state.deployment
                if (
                    previous is not None
                    and deployment.provider in kept
                    and previous.deployment.provider == deployment.provider
                    and previous.deployment.upstream_model == deployment.upstream_model
                ):
                    state.inherit(previous)

    def hand_over(self, names: set[str]) -> None:
        """These providers now belong to a successor (a reload kept them): close() leaves them open."""
        self._providers = {name: p for name, p in self._providers.items() if name not in names}

    async def close(self) -> None:
        for provider in self._providers.values():
            await provider.close()
