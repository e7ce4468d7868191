"""The facade's gRPC channel backend: streams through the batched twin RPC, and back to the plain RPC
against a service that does not have it (an older version of the service)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import grpc
import orjson
import pytest

from gateway.call import CallInfo
from gateway.config import parse
from gateway.errors import GatewayError, NotFoundError
from gateway.jsonpb import MessageCodec
from llm_gateway.v1 import chat_pb2
from rest_facade.channel import ChannelBackend, batched_twin
from service.chat import ChatCore
from service.grpc_handlers import method_handler
from service.grpc_servicer import ChatServicer
from tests.harness import GatewayProcess, free_port

SERVICE = chat_pb2.DESCRIPTOR.services_by_name["ChatService"]
PLAIN = "/llm_gateway.v1.ChatService/StreamChatCompletion"
BATCHED = "/llm_gateway.v1.ChatService/StreamChatCompletionBatches"
REQUEST = MessageCodec.for_type(chat_pb2.CreateChatCompletionRequest).decode(
    {"model": "dummy", "messages": [{"role": "user", "content": "one two three"}], "stream": True}
)


def test_the_stream_rpc_names_its_batched_twin() -> None:
    twin = batched_twin(SERVICE, SERVICE.methods_by_name["StreamChatCompletion"])
    assert twin is not None and (twin[0].name, twin[1]) == ("StreamChatCompletionBatches", "chunks")
    assert all(batched_twin(SERVICE, m) is None for m in SERVICE.methods if m.name != "StreamChatCompletion")


async def _collect(backend: ChannelBackend) -> tuple[list[list[dict[str, Any]]], dict[str, str]]:
    dumps = MessageCodec.for_type(chat_pb2.ChatCompletionChunk).dumps
    call = CallInfo(timeout=10)
    batches = [
        [{**orjson.loads(dumps(chunk)), "id": "-", "created": 0} for chunk in batch]  # each stream: its own id
        async for batch in backend.stream(PLAIN, REQUEST, call)
    ]
    return batches, call.response_metadata


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    process = GatewayProcess({}, tmp_path_factory.mktemp("channel"), args=("--grpc-only",))
    process.start()
    yield process
    process.stop()


def test_a_stream_comes_in_the_batches_the_service_sent(service: GatewayProcess) -> None:
    async def run() -> tuple[list[list[dict[str, Any]]], dict[str, str]]:
        backend = ChannelBackend(service.grpc_address, SERVICE)
        try:
            return await _collect(backend)
        finally:
            await backend.close()

    batches, metadata = asyncio.run(run())
    # The dummy has every chunk ready at once: one message over the wire, all chunks in it.
    assert len(batches) == 1 and len(batches[0]) == 12  # role, 10 words, finish
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in batches[0]).endswith("one two three")
    assert metadata["x-llm-gateway-model"] == "dummy"


class _Seen(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self) -> None:
        self.methods: list[str] = []

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: grpc.HandlerCallDetails
    ) -> Any:
        self.methods.append(details.method)  # type: ignore[attr-defined]
        return await continuation(details)


def test_an_older_service_without_the_twin_gets_the_plain_rpc() -> None:
    async def run() -> tuple[list[list[dict[str, Any]]], list[list[dict[str, Any]]], list[str]]:
        core = ChatCore(parse({}, {}))
        servicer = ChatServicer(core)
        seen = _Seen()
        server = grpc.aio.server(interceptors=(seen,))
        # Only the RPC an older service had: the batched twin is UNIMPLEMENTED, as for any unknown method.
        handler = method_handler(SERVICE.methods_by_name["StreamChatCompletion"], servicer.StreamChatCompletion)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE.full_name, {"StreamChatCompletion": handler}),)
        )
        port = free_port()
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        backend = ChannelBackend(f"127.0.0.1:{port}", SERVICE)
        try:
            first, _ = await _collect(backend)
            second, _ = await _collect(backend)
        finally:
            await backend.close()
            await server.stop(None)
            await core.close()
        return first, second, seen.methods

    first, second, methods = asyncio.run(run())
    assert methods == [BATCHED, PLAIN, PLAIN]  # the twin is tried once, then never again
    assert len(first) == 12 and all(len(batch) == 1 for batch in first)
    assert first == second


def test_errors_come_back_the_same_through_the_twin(service: GatewayProcess) -> None:
    request = chat_pb2.CreateChatCompletionRequest()
    request.CopyFrom(REQUEST)
    request.model = "no-such-model"

    async def run() -> GatewayError:
        backend = ChannelBackend(service.grpc_address, SERVICE)
        try:
            async for _ in backend.stream(PLAIN, request, CallInfo(timeout=10)):
                pass
        except GatewayError as exc:
            return exc
        finally:
            await backend.close()
        raise AssertionError("no error")

    error = asyncio.run(run())
    assert isinstance(error, NotFoundError)
    assert (error.http_status, error.code, error.param) == (404, "model_not_found", "model")
