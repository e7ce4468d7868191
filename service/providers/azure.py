"""Azure OpenAI: OpenAI's API under Azure's URLs, with the key in an `api-key` header.

Two URL styles (`azure_style`):
- `deployment` (the default): `<api_url>/openai/deployments/<deployment>/chat/completions?api-version=<v>`,
  where the deployment is the gateway deployment's upstream model and `api_version` defaults to
  DEFAULT_API_VERSION. The heads of a deployment are rendered the first time it is called, then kept.
- `v1`: `<api_url>/openai/v1/chat/completions`, the version-less API, where the model travels in the
  body as for OpenAI; `?api-version=` is added only when `api_version` is set (e.g. `preview`).
"""

from __future__ import annotations

from urllib.parse import quote

from gateway.config import ProviderConfig

from .openai_compat import Heads, OpenAICompatibleProvider

DEFAULT_API_VERSION = "2024-10-21"  # the latest GA data-plane version


class AzureProvider(OpenAICompatibleProvider):
    def __init__(self, config: ProviderConfig) -> None:
        self._by_deployment: dict[str, Heads] = {}
        super().__init__(config)
        self._per_deployment = config.azure_style == "deployment"
        self._query = f"?api-version={quote(config.api_version or DEFAULT_API_VERSION, safe='')}"

    def _base(self, config: ProviderConfig) -> tuple[str, str]:
        if config.azure_style == "v1":
            query = f"?api-version={quote(config.api_version, safe='')}" if config.api_version else ""
            return f"{config.api_url}/openai/v1", query
        # The provider's URL (for traces) names no deployment; requests get theirs in _heads_for.
        return f"{config.api_url}/openai/deployments", ""

    def _auth(self, api_key: str) -> dict[str, str]:
        return {"api-key": api_key}

    def _heads_for(self, upstream_model: str) -> Heads:
        if not self._per_deployment:
            return self._heads
        heads = self._by_deployment.get(upstream_model)  # a dict lookup per request; rendered once per deployment
        if heads is None:
            base = f"{self._config.api_url}/openai/deployments/{quote(upstream_model, safe='')}"
            heads = self._by_deployment[upstream_model] = self._render(base, self._query)
        return heads
