"""Routing by model name to a provider, as the config says."""

from __future__ import annotations

import time

from gateway.config import Config, ModelRoute
from gateway.errors import ModelNotFoundError
from llm_gateway.v1 import chat_pb2

from .accounting import RouteMetrics
from .providers import Provider, build_provider


class Router:
    def __init__(self, config: Config, providers: dict[str, Provider] | None = None) -> None:
        self._providers = (
            providers
            if providers is not None
            else {name: build_provider(spec) for name, spec in config.providers.items()}
        )
        self._routes = {
            name: (route, self._providers[route.provider], RouteMetrics(name, route.provider))
            for name, route in config.models.items()
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

    def route(self, model: str) -> tuple[ModelRoute, Provider, RouteMetrics]:
        found = self._routes.get(model)
        if found is None:
            raise ModelNotFoundError(
                f"The model '{model}' does not exist or you do not have access to it.", param="model"
            )
        return found

    def list_models(self) -> chat_pb2.ListModelsResponse:
        return self._models

    async def close(self) -> None:
        for provider in self._providers.values():
            await provider.close()
