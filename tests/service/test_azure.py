"""Azure OpenAI deployments behind a real gateway process, against a fake on loopback that records
each request's path, query and headers: both URL styles, unary, streamed and embeddings."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest

from gateway.config import ConfigError, parse
from service.providers.azure import DEFAULT_API_VERSION
from tests.fakes.upstream import FakeUpstream, serve
from tests.harness import GatewayProcess

KEY = "azure-key-0123456789abcdef"
HELLO: Any = [{"role": "user", "content": "Hello"}]


upstream = pytest.fixture(scope="module", name="upstream")(serve)


@pytest.fixture(autouse=True)
def reset(upstream: FakeUpstream) -> None:
    upstream.received.clear()
    upstream.by_stream_flag()


@pytest.fixture(scope="module")
def gateway(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    config = {
        "routing": {"retries": 0},
        "providers": {
            # The deployment style with its default api-version, and with one of its own.
            "azure": {"type": "azure", "api_key": KEY, "api_url": upstream.url},
            "azure-preview": {
                "type": "azure",
                "api_key": KEY,
                "api_url": f"{upstream.url}/",
                "api_version": "2025-04-01-preview",
            },
            "azure-v1": {"type": "azure", "api_key": KEY, "api_url": upstream.url, "azure_style": "v1"},
            "azure-v1-preview": {
                "type": "azure",
                "api_key": KEY,
                "api_url": upstream.url,
                "azure_style": "v1",
                "api_version": "preview",
            },
        },
        "models": {
            "gpt-4o": {"provider": "azure", "model": "gpt-4o-eu"},
            "gpt-4o-mini": {"provider": "azure", "model": "mini deployment"},
            "preview": {"provider": "azure-preview", "model": "gpt-5"},
            "v1": {"provider": "azure-v1", "model": "gpt-4.1"},
            "v1-preview": {"provider": "azure-v1-preview", "model": "gpt-4.1"},
            "embed": {"provider": "azure", "model": "text-embedding-3-small"},
        },
    }
    process = GatewayProcess(config, tmp_path_factory.mktemp("azure")).start()
    yield process
    assert process.stop() == 0
    assert KEY not in process.log_text()


def client(gateway: GatewayProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key="unused", max_retries=0, timeout=20)


@pytest.mark.parametrize(
    ("model", "path", "query", "body_model"),
    [
        ("gpt-4o", "/openai/deployments/gpt-4o-eu/chat/completions", f"api-version={DEFAULT_API_VERSION}", "gpt-4o-eu"),
        (
            "gpt-4o-mini",
            "/openai/deployments/mini deployment/chat/completions",  # sent as %20: a raw space would be a 400
            f"api-version={DEFAULT_API_VERSION}",
            "mini deployment",
        ),
        ("preview", "/openai/deployments/gpt-5/chat/completions", "api-version=2025-04-01-preview", "gpt-5"),
        ("v1", "/openai/v1/chat/completions", "", "gpt-4.1"),
        ("v1-preview", "/openai/v1/chat/completions", "api-version=preview", "gpt-4.1"),
    ],
)
def test_urls_and_key_unary_and_streamed(
    gateway: GatewayProcess, upstream: FakeUpstream, model: str, path: str, query: str, body_model: str
) -> None:
    with client(gateway) as sdk:
        reply = sdk.chat.completions.create(model=model, messages=HELLO)
        streamed = list(sdk.chat.completions.create(model=model, messages=HELLO, stream=True))
        again = sdk.chat.completions.create(model=model, messages=HELLO)  # the cached head, the same URL
    assert reply.choices[0].message.content == "Hello!" == again.choices[0].message.content
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == "Hello!"
    assert len(upstream.received) == 3
    for sent in upstream.received:
        assert (sent.path, sent.query) == (path, query)
        assert sent.headers["api-key"] == KEY and "Authorization" not in sent.headers
        assert sent.json["model"] == body_model
    assert upstream.received[1].json["stream"] is True
    assert upstream.received[1].headers["Accept"] == "text/event-stream"


def test_embeddings_go_to_the_deployment(gateway: GatewayProcess, upstream: FakeUpstream) -> None:
    upstream.embed([[0.5, -0.25]])
    with client(gateway) as sdk:
        reply = sdk.embeddings.create(model="embed", input="hi", encoding_format="float")
    assert reply.data[0].embedding == [0.5, -0.25]
    sent = upstream.last()
    assert (sent.path, sent.query) == (
        "/openai/deployments/text-embedding-3-small/embeddings",
        f"api-version={DEFAULT_API_VERSION}",
    )
    assert sent.headers["api-key"] == KEY


def test_an_azure_error_passes_through(gateway: GatewayProcess, upstream: FakeUpstream) -> None:
    body = {"error": {"code": "DeploymentNotFound", "message": "The API deployment for this resource does not exist."}}
    upstream.reply(404, body)
    with client(gateway) as sdk, pytest.raises(openai.NotFoundError) as caught:
        sdk.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert caught.value.code == "DeploymentNotFound"


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"providers.az.azure_style: 'v2' is not one of deployment, v1"):
        parse({"providers": {"az": {"type": "azure", "api_url": "https://x.azure.com", "azure_style": "v2"}}}, {})
    with pytest.raises(ConfigError, match=r"providers.az.api_version"):
        parse({"providers": {"az": {"type": "azure", "api_url": "https://x", "api_version": "2024&x=1"}}}, {})
    with pytest.raises(ConfigError, match=r"providers.az.api_url"):
        parse({"providers": {"az": {"type": "azure"}}}, {})
