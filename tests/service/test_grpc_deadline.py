"""A gateway error raised just as the caller's deadline passes (the service's own deadline is the same
instant): on a real grpc.aio server, the call ends as cancelled, counted as DEADLINE_EXCEEDED, and grpc.aio
logs no error for the batch that C-core can no longer send."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import grpc
import pytest

from gateway.errors import UpstreamTimeoutError
from llm_gateway.v1 import chat_pb2, chat_pb2_grpc
from service.grpc_servicer import _METRICS, _failed
from tests.harness import free_port


class _LateServicer(chat_pb2_grpc.ChatServiceServicer):
    def __init__(self) -> None:
        self.raised: list[BaseException] = []

    async def CreateChatCompletion(self, request: Any, context: Any) -> chat_pb2.ChatCompletion:
        started = time.perf_counter()
        # Past the caller's deadline; the gateway's own deadline fires at the same instant and fails the call.
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(1.0)
        try:
            await _failed(context, _METRICS["CreateChatCompletion"], started, UpstreamTimeoutError("late"), False)
        except BaseException as exc:
            self.raised.append(exc)
            raise
        return chat_pb2.ChatCompletion()


def test_an_error_after_the_deadline_ends_the_call_quietly(caplog: pytest.LogCaptureFixture) -> None:
    servicer = _LateServicer()

    async def go() -> grpc.StatusCode:
        server = grpc.aio.server()
        chat_pb2_grpc.add_ChatServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
        port = free_port()
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = chat_pb2_grpc.ChatServiceStub(channel)  # type: ignore[no-untyped-call]
                with pytest.raises(grpc.aio.AioRpcError) as failure:
                    await stub.CreateChatCompletion(chat_pb2.CreateChatCompletionRequest(), timeout=0.2)
            await asyncio.sleep(1.5)  # the handler finishes after the client has given up
            return failure.value.code()
        finally:
            await server.stop(None)

    with caplog.at_level(logging.DEBUG, logger="grpc._cython.cygrpc"):
        code = asyncio.run(go())
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert [type(exc) for exc in servicer.raised] == [asyncio.CancelledError]
    errors = [r.getMessage() for r in caplog.records if r.name.startswith("grpc") and r.levelno >= logging.ERROR]
    assert errors == []
