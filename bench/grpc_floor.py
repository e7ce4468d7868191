"""The bare gRPC floor: a minimal grpc.aio ChatService that answers every call with a fixed response.

It runs no gateway code at all (no routing, no upstream, no metrics), so its CPU per call is what
grpc.aio itself costs for the same messages: the floor under `grpc-direct`. Unary calls get one
ChatCompletion; streams get the same 20 chunks and usage chunk the nginx upstream serves, built once,
one message each as StreamChatCompletion sends them. Like the gateway's workers it runs on uvloop,
with the gateway's server options. It sends no initial metadata of its own; the gateway's
x-llm-gateway-* headers cost one more C-core batch per call (see bench/profile-notes.md, round 2).
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from typing import Any

import grpc
import orjson

from gateway.jsonpb import MessageCodec
from llm_gateway.v1 import chat_pb2, chat_pb2_grpc
from service.server import SERVER_OPTIONS

from .upstream import stream_body, unary_body


def _responses() -> tuple[chat_pb2.ChatCompletion, list[chat_pb2.ChatCompletionChunk]]:
    completion = MessageCodec.for_type(chat_pb2.ChatCompletion).decode(orjson.loads(unary_body()))
    codec = MessageCodec.for_type(chat_pb2.ChatCompletionChunk)
    chunks = [
        codec.decode(orjson.loads(event[len(b"data: ") :]))
        for event in stream_body().split(b"\n\n")
        if event.startswith(b"data: {")
    ]
    return completion, chunks


class FixedChat(chat_pb2_grpc.ChatServiceServicer):
    def __init__(self) -> None:
        self._completion, self._chunks = _responses()

    async def CreateChatCompletion(self, request: Any, context: Any) -> chat_pb2.ChatCompletion:
        return self._completion

    async def StreamChatCompletion(self, request: Any, context: Any) -> AsyncIterator[chat_pb2.ChatCompletionChunk]:
        for chunk in self._chunks:
            yield chunk


async def serve(port: int) -> None:
    server = grpc.aio.server(options=SERVER_OPTIONS)  # the gateway's own server options
    chat_pb2_grpc.add_ChatServiceServicer_to_server(FixedChat(), server)  # type: ignore[no-untyped-call]
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.run(serve(args.port))  # the gateway's workers run on uvloop too
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
