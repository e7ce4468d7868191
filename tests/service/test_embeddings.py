"""CreateEmbedding over gRPC stubs: input forms kept, vectors exact, routing (retries and fallbacks), token
metrics, and errors, against a gateway process and fake upstreams on loopback."""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
import toktok

from gateway.errors import GatewayError
from gateway.jsonpb import MessageCodec
from llm_gateway.v1 import chat_pb2, chat_pb2_grpc
from tests.fakes.upstream import FakeUpstream
from tests.harness import GatewayProcess
from tests.service.test_metrics import scrape, tokens

REQUEST = MessageCodec.for_type(chat_pb2.CreateEmbeddingRequest)
VECTORS = [[struct.unpack("<f", struct.pack("<f", x))[0] for x in (0.5, -0.125, 3e-05)]]


@pytest.fixture
def fakes(upstream: FakeUpstream) -> Iterator[dict[str, FakeUpstream]]:
    """The model's upstream (the conftest's), and its fallback's."""
    spare = FakeUpstream().start()
    yield {"main": upstream, "spare": spare}
    spare.stop()


@pytest.fixture
def gateway(fakes: dict[str, FakeUpstream], gateway_factory: Callable[..., GatewayProcess]) -> GatewayProcess:
    return gateway_factory(
        {
            "routing": {"retries": 1, "backoff_initial": 0.01, "backoff_max": 0.02, "cooldown_failures": 1000},
            "providers": {name: {"type": "openai", "api_url": f"{fake.url}/v1"} for name, fake in fakes.items()},
            "models": {
                "embed": {"provider": "main", "model": "text-embedding-3-large", "fallback": ["embed-spare"]},
                "embed-spare": {"provider": "spare", "model": "spare-embedding"},
                "dummy": "dummy",
            },
        }
    )


@pytest.fixture
def stub(gateway: GatewayProcess) -> chat_pb2_grpc.ChatServiceStub:
    return chat_pb2_grpc.ChatServiceStub(gateway.channel())


def _request(**fields: Any) -> chat_pb2.CreateEmbeddingRequest:
    return REQUEST.decode({"model": "embed", **fields})


def test_input_forms_and_vectors(stub: chat_pb2_grpc.ChatServiceStub, fakes: dict[str, FakeUpstream]) -> None:
    fakes["main"].embed(VECTORS)
    request = chat_pb2.CreateEmbeddingRequest(model="embed", encoding_format="float")
    request.input_token_lists.lists.add(ids=[1, 2, 3])
    request.input_token_lists.lists.add(ids=[4])
    reply, call = stub.CreateEmbedding.with_call(request, timeout=10)
    assert fakes["main"].last().json == {
        "model": "text-embedding-3-large",
        "input": [[1, 2, 3], [4]],
        "encoding_format": "float",
    }
    assert reply.data[0].WhichOneof("embedding") == "embedding_floats"
    assert list(reply.data[0].embedding_floats.values) == VECTORS[0]
    assert (reply.usage.prompt_tokens, reply.usage.total_tokens) == (5, 5)
    assert dict(call.initial_metadata())["x-llm-gateway-model"] == "embed"

    reply = stub.CreateEmbedding(_request(input="text", encoding_format="base64"), timeout=10)
    assert fakes["main"].last().json["input"] == "text"
    assert reply.data[0].embedding_base64 == struct.pack("<3f", *VECTORS[0])  # the bytes, not floats


def test_retries_and_fallback(stub: chat_pb2_grpc.ChatServiceStub, fakes: dict[str, FakeUpstream]) -> None:
    fakes["main"].reply(503, {"error": {"message": "down", "type": "server_error"}})
    fakes["spare"].embed(VECTORS)
    reply, call = stub.CreateEmbedding.with_call(_request(input=["a"]), timeout=10)
    assert list(reply.data[0].embedding_floats.values) == VECTORS[0]
    assert len(fakes["main"].received) == 2  # the first attempt and its retry
    assert fakes["spare"].last().json["model"] == "spare-embedding"
    metadata = dict(call.initial_metadata())
    assert (metadata["x-llm-gateway-model"], metadata["x-llm-gateway-attempts"]) == ("embed-spare", "3")


def test_token_metrics(
    gateway: GatewayProcess, stub: chat_pb2_grpc.ChatServiceStub, fakes: dict[str, FakeUpstream]
) -> None:
    fakes["main"].embed(VECTORS)
    stub.CreateEmbedding(_request(input="reported"), timeout=10)  # the upstream says 5
    fakes["main"].embed(VECTORS, usage=False)
    texts = ["The quick brown fox", "jumps over the lazy dog"]
    stub.CreateEmbedding(_request(input=texts), timeout=10)  # counted here
    stub.CreateEmbedding(_request(input=[7, 8, 9]), timeout=10)  # token ids: 3
    samples = scrape(gateway)
    assert tokens(samples, model="embed", provider="main", usage="reported") == (5, 0, 5)
    estimated = sum(toktok.batch_count(texts, "cl100k_base")) + 3
    assert tokens(samples, model="embed", provider="main", usage="estimated") == (estimated, 0, estimated)
    assert tokens(samples, model="embed") == (5 + estimated, 0, 5 + estimated)  # summed as before the label


def test_errors_over_grpc(stub: chat_pb2_grpc.ChatServiceStub, fakes: dict[str, FakeUpstream]) -> None:
    for request, code, param in (
        (_request(), grpc.StatusCode.INVALID_ARGUMENT, "input"),
        (_request(input="x", model="missing"), grpc.StatusCode.NOT_FOUND, "model"),
        (_request(input="x", encoding_format="int8"), grpc.StatusCode.INVALID_ARGUMENT, "encoding_format"),
    ):
        with pytest.raises(grpc.RpcError) as raised:
            stub.CreateEmbedding(request, timeout=10)
        error = GatewayError.from_grpc(raised.value.code(), raised.value.details(), raised.value.trailing_metadata())
        assert (raised.value.code(), error.param) == (code, param)
    assert not fakes["main"].received
    fakes["main"].reply(400, {"error": {"message": "too long", "type": "invalid_request_error", "param": "input"}})
    with pytest.raises(grpc.RpcError) as raised:
        stub.CreateEmbedding(_request(input="x"), timeout=10)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(fakes["main"].received) == 1  # a 400 is not retried


def test_dummy_respects_dimensions_and_base64(stub: chat_pb2_grpc.ChatServiceStub) -> None:
    floats = stub.CreateEmbedding(_request(model="dummy", input="same", dimensions=12), timeout=10)
    packed = stub.CreateEmbedding(_request(model="dummy", input="same", dimensions=12, encoding_format="base64"))
    values = list(floats.data[0].embedding_floats.values)
    assert len(values) == 12
    assert list(struct.unpack("<12f", packed.data[0].embedding_base64)) == values
