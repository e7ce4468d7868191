"""POST /v1/embeddings: the openai SDK (its default base64, and float), exact round trips, every input form,
the OpenAI-compatible upstream paths, errors; in both process modes.

The route has no handler of its own: it comes from the CreateEmbedding RPC's google.api.http rule through the
facade's one generic transcoder (test_the_route_comes_from_the_proto).
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Iterator
from typing import Any

import openai
import orjson
import pytest

from rest_facade.routes import build_routes
from rest_facade.server import SERVICE
from tests.fakes.upstream import FakeUpstream, completion
from tests.harness import ROOT

from .conftest import CLIENT_KEY, MODES, OPENAI_KEY, Stack, gateway_config, start_stack
from .rest import call

# float32 values, as embedding models compute them: base64 and float forms then say the same.
VECTORS = [
    [struct.unpack("<f", struct.pack("<f", x))[0] for x in (0.0123, -0.5, 1e-05, 0.25, -3.5e-08, 0.999)],
    [struct.unpack("<f", struct.pack("<f", x))[0] for x in (-0.75, 0.0, 2e-07, 0.333, 0.1, -0.2)],
]


@pytest.fixture(scope="module", params=MODES)
def stack(
    request: pytest.FixtureRequest, fake: FakeUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    config = gateway_config(fake)
    config["providers"].update(
        {
            "gemini": {"type": "gemini", "api_key": "gm-key", "api_url": fake.url},
            "ollama": {"type": "ollama", "api_url": fake.url},
            "claude": {"type": "anthropic", "api_key": "sk-ant-key", "api_url": fake.url},
            "azure": {"type": "azure", "api_key": "az-key", "api_url": fake.url},
        }
    )
    config["models"].update(
        {
            "text-embedding-3-small": {"provider": "openai", "model": "text-embedding-3-small"},
            "gemini-embedding": {"provider": "gemini", "model": "gemini-embedding-001"},
            "nomic": {"provider": "ollama", "model": "nomic-embed-text"},
            "claude": "claude",
            "ada-azure": {"provider": "azure", "model": "my-ada"},
            "dummy": "dummy",
        }
    )
    started = start_stack(request.param, config, tmp_path_factory.mktemp(request.param))
    yield started
    started.stop()


def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=CLIENT_KEY, max_retries=0, timeout=20)


def post(stack: Stack, body: Any) -> Any:
    return call(stack.base_url, "POST", "/v1/embeddings", body, {"content-type": "application/json"})


def test_the_route_comes_from_the_proto() -> None:
    routes = {(route.http_method, route.path): route for route in build_routes(SERVICE)}
    route = routes[("POST", "/v1/embeddings")]
    assert route.unary is not None and route.unary.method == "/llm_gateway.v1.ChatService/CreateEmbedding"
    assert route.streaming is None
    # No code of its own in the facade: nothing there knows embeddings exist.
    for source in (ROOT / "rest_facade").glob("*.py"):
        assert "embedding" not in source.read_text().lower(), source


def test_sdk_default_base64(stack: Stack, fake: FakeUpstream) -> None:
    fake.embed(VECTORS)
    with client(stack) as sdk:
        reply = sdk.embeddings.create(model="text-embedding-3-small", input=["first", "second"])
    sent = fake.last()
    assert sent.path == "/v1/embeddings"
    assert sent.headers["Authorization"] == f"Bearer {OPENAI_KEY}"
    assert sent.json["encoding_format"] == "base64"  # the SDK's default, passed on
    assert sent.json["input"] == ["first", "second"] and sent.json["model"] == "text-embedding-3-small"
    assert [item.embedding for item in reply.data] == VECTORS  # decoded by the SDK from our base64
    assert [item.index for item in reply.data] == [0, 1]
    assert reply.usage.prompt_tokens == 5 and reply.usage.total_tokens == 5
    assert reply.model == "upstream-embedding"


def test_sdk_float(stack: Stack, fake: FakeUpstream) -> None:
    fake.embed(VECTORS)
    with client(stack) as sdk:
        reply = sdk.embeddings.create(model="text-embedding-3-small", input="one text", encoding_format="float")
    assert fake.last().json["encoding_format"] == "float"
    assert [item.embedding for item in reply.data] == VECTORS


def test_round_trip_is_identical_element_for_element(stack: Stack, fake: FakeUpstream) -> None:
    """What the upstream wrote (here Python's json, like OpenAI's servers: shortest repr, 1e-05 and all) comes
    back as the same numbers, each one, and base64 as the same string, byte for byte."""
    doubles = [0.1, -0.006929283495992422, 1e-05, 123456.789, -2.5e-310, 0.30000000000000004, 1.0, 0]
    floats_body = json.dumps({"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": doubles}]})
    fake.reply(200, floats_body.encode())
    reply = post(stack, {"model": "text-embedding-3-small", "input": "x", "encoding_format": "float"})
    got = orjson.loads(reply.body)["data"][0]["embedding"]
    assert len(got) == len(doubles) and all(a == b for a, b in zip(got, doubles, strict=True))
    assert [float(x) for x in json.loads(floats_body)["data"][0]["embedding"]] == got

    packed = base64.b64encode(struct.pack("<4f", 0.5, -1.25, 3.4e38, 1e-45)).decode()
    fake.reply(200, {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": packed}]})
    reply = post(stack, {"model": "text-embedding-3-small", "input": "x", "encoding_format": "base64"})
    assert orjson.loads(reply.body)["data"][0]["embedding"] == packed


@pytest.mark.parametrize(
    "value",
    [
        "one text",
        ["a", "b", "c"],
        [1, 2, 3, 50256],
        [[1, 2], [3], [4, 5, 6]],
    ],
    ids=["string", "strings", "token_ids", "token_id_lists"],
)
def test_input_forms_reach_the_upstream_as_sent(stack: Stack, fake: FakeUpstream, value: Any) -> None:
    fake.embed(VECTORS[:1])
    body = {"model": "text-embedding-3-small", "input": value, "dimensions": 6, "user": "u-1", "new_knob": {"x": [1]}}
    reply = post(stack, body)
    assert reply.status == 200, reply.body
    assert fake.last().json == {**body, "model": "text-embedding-3-small"}
    assert orjson.loads(reply.body)["data"][0]["embedding"] == VECTORS[0]


@pytest.mark.parametrize(
    ("model", "path", "upstream_model"),
    [
        ("gemini-embedding", "/v1beta/openai/embeddings", "gemini-embedding-001"),
        ("nomic", "/v1/embeddings", "nomic-embed-text"),
        ("ada-azure", "/openai/deployments/my-ada/embeddings", "my-ada"),
    ],
)
def test_openai_compatible_paths(stack: Stack, fake: FakeUpstream, model: str, path: str, upstream_model: str) -> None:
    fake.embed(VECTORS)
    with client(stack) as sdk:
        reply = sdk.embeddings.create(model=model, input=["a", "b"], encoding_format="float")
    sent = fake.last()
    assert (sent.path, sent.json["model"]) == (path, upstream_model)
    assert [item.embedding for item in reply.data] == VECTORS
    if model == "ada-azure":
        assert sent.headers["api-key"] == "az-key" and "Authorization" not in sent.headers


def test_dummy_is_deterministic(stack: Stack) -> None:
    with client(stack) as sdk:
        first = sdk.embeddings.create(model="dummy", input=["hello world", "other"], dimensions=8)
        again = sdk.embeddings.create(model="dummy", input="hello world", dimensions=8, encoding_format="float")
    assert len(first.data) == 2 and all(len(item.embedding) == 8 for item in first.data)
    assert first.data[0].embedding == again.data[0].embedding != first.data[1].embedding
    assert abs(sum(v * v for v in first.data[0].embedding) - 1) < 1e-6
    assert first.usage.prompt_tokens == 3


@pytest.mark.parametrize(
    ("body", "status", "param", "code"),
    [
        ({"input": "x"}, 400, "model", None),
        ({"model": "text-embedding-3-small"}, 400, "input", None),
        ({"model": "text-embedding-3-small", "input": ""}, 400, "input", None),
        ({"model": "text-embedding-3-small", "input": []}, 400, "input", None),
        ({"model": "text-embedding-3-small", "input": ["a", ""]}, 400, "input[1]", None),
        ({"model": "text-embedding-3-small", "input": [[1], []]}, 400, "input[1]", None),
        ({"model": "text-embedding-3-small", "input": ["a", 1]}, 400, "input[1]", None),
        ({"model": "text-embedding-3-small", "input": [1.5]}, 400, "input[0]", None),
        ({"model": "text-embedding-3-small", "input": {"text": "x"}}, 400, "input", None),
        ({"model": "text-embedding-3-small", "input": [2**40]}, 400, "input", None),
        ({"model": "text-embedding-3-small", "input": ["a"] * 2049}, 400, "input", None),
        ({"model": "text-embedding-3-small", "input": "x", "encoding_format": "int8"}, 400, "encoding_format", None),
        ({"model": "text-embedding-3-small", "input": "x", "dimensions": 0}, 400, "dimensions", None),
        ({"model": "nope", "input": "x"}, 404, "model", "model_not_found"),
        ({"model": "claude", "input": "x"}, 400, "model", "embeddings_not_supported"),
    ],
)
def test_bad_requests(
    stack: Stack, fake: FakeUpstream, body: dict[str, Any], status: int, param: str, code: str | None
) -> None:
    reply = post(stack, body)
    assert reply.status == status, reply.body
    error = orjson.loads(reply.body)["error"]
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error")
    assert not fake.received  # refused before any upstream call


def test_upstream_errors_pass_through(stack: Stack, fake: FakeUpstream) -> None:
    upstream_error = {
        "error": {
            "message": "This model does not support embeddings",
            "type": "invalid_request_error",
            "param": "model",
            "code": None,
        }
    }
    fake.reply(404, upstream_error)
    reply = post(stack, {"model": "text-embedding-3-small", "input": "x"})
    assert (reply.status, orjson.loads(reply.body)) == (404, upstream_error)
    fake.reply(200, {"object": "list", "data": [{"embedding": "not base64!"}]})
    reply = post(stack, {"model": "text-embedding-3-small", "input": "x", "encoding_format": "base64"})
    assert reply.status == 502 and "invalid response" in orjson.loads(reply.body)["error"]["message"]
    fake.reply(200, completion())  # the conftest's default, for the tests after


def test_answered_by_headers(stack: Stack, fake: FakeUpstream) -> None:
    fake.embed(VECTORS)
    reply = post(stack, {"model": "text-embedding-3-small", "input": "x"})
    assert reply.headers["x-llm-gateway-model"] == "text-embedding-3-small"
    assert reply.headers["x-llm-gateway-deployment"] == "openai/text-embedding-3-small"
    assert reply.headers["x-llm-gateway-attempts"] == "1"
