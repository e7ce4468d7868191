"""Providers: the built-in dummy, Anthropic's Messages API, Azure OpenAI, and every OpenAI-compatible
upstream (openai, gemini, ollama, ...)."""

from __future__ import annotations

from gateway.config import ProviderConfig

from .anthropic import AnthropicProvider
from .azure import AzureProvider
from .base import Provider
from .dummy import DummyProvider
from .openai_compat import OpenAICompatibleProvider


def build_provider(config: ProviderConfig) -> Provider:
    if config.type == "dummy":
        return DummyProvider(config)
    if config.type == "anthropic":
        return AnthropicProvider(config)
    if config.type == "azure":
        return AzureProvider(config)
    # openai, gemini and ollama differ only in how the chat URL derives from api_url.
    return OpenAICompatibleProvider(config)


__all__ = [
    "AnthropicProvider",
    "AzureProvider",
    "DummyProvider",
    "OpenAICompatibleProvider",
    "Provider",
    "build_provider",
]
