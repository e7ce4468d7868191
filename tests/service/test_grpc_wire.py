"""What arrives on the gRPC port as raw bytes: bodies that are not a protobuf message, messages over the
size limit, and many streams at once, against a real gateway process."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import DecodeError
from google.rpc import status_pb2

from gateway.errors import STATUS_DETAILS_KEY
from gateway.jsonpb import MessageCodec
from llm_gateway.v1 import chat_pb2, chat_pb2_grpc
from tests.harness import GatewayProcess

SERVICE = chat_pb2.DESCRIPTOR.services_by_name["ChatService"]
REQUEST = MessageCodec.for_type(chat_pb2.CreateChatCompletionRequest)
# A field-1 varint key, then a varint that never ends: no message type decodes it.
GARBAGE = b"\x08" + b"\xff" * 11


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    process = GatewayProcess(None, tmp_path_factory.mktemp("wire"), args=("--grpc-only",)).start()
    yield process
    process.stop()


def _detail(error: grpc.RpcError) -> chat_pb2.ErrorDetail:
    trailers = dict(error.trailing_metadata() or ())  # type: ignore[attr-defined]
    status = status_pb2.Status.FromString(trailers[STATUS_DETAILS_KEY])
    detail = chat_pb2.ErrorDetail()
    assert status.details[0].Unpack(detail)
    return detail


@pytest.mark.parametrize("method", list(SERVICE.methods), ids=lambda m: m.name)
def test_undecodable_request_is_invalid_argument(gateway: GatewayProcess, method: MethodDescriptor) -> None:
    with pytest.raises(DecodeError):  # the premise: these bytes are no message of this RPC's request type
        message_factory.GetMessageClass(method.input_type).FromString(GARBAGE)
    path = f"/{SERVICE.full_name}/{method.name}"
    with gateway.channel() as channel:
        # No serializers: the bytes go on the wire as they are.
        call = (channel.unary_stream if method.server_streaming else channel.unary_unary)(path)
        with pytest.raises(grpc.RpcError) as info:
            reply = call(GARBAGE, timeout=10)
            if method.server_streaming:
                list(reply)
    error = info.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == (
        f"The request could not be parsed: it is not a valid {method.input_type.full_name} message."
    )
    detail = _detail(error)
    assert (detail.http_status, detail.type) == (400, "invalid_request_error")

    line = gateway.wait_log(lambda entry: entry.get("method") == path)
    assert line["level"] == "INFO" and line["msg"] == "request could not be parsed" and line["bytes"] == len(GARBAGE)
    text = gateway.log_text()
    assert len([entry for entry in gateway.log_lines() if path in str(entry.values())]) == 1
    assert "Traceback" not in text and "DecodeError" not in text
    assert not [entry for entry in gateway.log_lines() if entry["level"] not in ("INFO", "DEBUG")]


def test_a_valid_request_still_works_on_every_kind_of_rpc(gateway: GatewayProcess) -> None:
    request = REQUEST.decode({"model": "dummy", "messages": [{"role": "user", "content": "one two"}]})
    with gateway.channel() as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        assert stub.CreateChatCompletion(request, timeout=10).choices[0].message.content
        assert len(list(stub.StreamChatCompletion(request, timeout=10))) > 1
        assert "dummy" in {m.id for m in stub.ListModels(chat_pb2.ListModelsRequest(), timeout=10).data}


def test_a_5_mb_message_is_resource_exhausted(gateway: GatewayProcess) -> None:
    big = REQUEST.decode({"model": "dummy", "messages": [{"role": "user", "content": "x" * (5 * 1024 * 1024)}]})
    with gateway.channel() as channel, pytest.raises(grpc.RpcError) as info:
        chat_pb2_grpc.ChatServiceStub(channel).CreateChatCompletion(big, timeout=20)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_500_concurrent_streams(gateway: GatewayProcess) -> None:
    request = REQUEST.decode({"model": "dummy", "messages": [{"role": "user", "content": "one two three"}]})

    async def run() -> list[str]:
        async with grpc.aio.insecure_channel(gateway.grpc_address) as channel:
            stub = chat_pb2_grpc.ChatServiceStub(channel)

            async def one() -> str:
                chunks = [c async for c in stub.StreamChatCompletion(request, timeout=120)]
                return "".join(c.choices[0].delta.content for c in chunks if c.choices)

            return await asyncio.gather(*(one() for _ in range(500)))

    texts = asyncio.run(run())
    assert len(texts) == 500 and len(set(texts)) == 1 and texts[0]
