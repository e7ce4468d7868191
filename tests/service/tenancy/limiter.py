"""Drive the real Tenancy in the test process, on either state backend."""

from __future__ import annotations

from typing import Any

from gateway.call import CallInfo
from gateway.config import parse
from gateway.errors import GatewayError
from llm_gateway.v1 import chat_pb2
from service.accounting import RequestRecord
from service.tenancy import Tenancy
from service.tenancy.failover import FailoverState
from service.tenancy.memory import MemoryState
from service.tenancy.redis import RedisState

KEY = "sk-test-alpha-0123456789"
OTHER = "sk-test-beta-0123456789"


def config(redis_url: str = "", workers: int = 1, **sections: Any) -> Any:
    data: dict[str, Any] = {
        "server": {"workers": workers},
        "models": {"gpt-4o": "dummy", "mini": "dummy"},
        # A generous timeout: on this shared 2-core machine a slow answer would be served (rightly) by the
        # in-process fallback, which is not what the suite measures.
        "state": {"redis_url": redis_url, "timeout": 1.0, **sections.pop("state", {})},
        **sections,
    }
    return parse(data, {})


def chat(model: str = "gpt-4o", text: str = "Hello there", **fields: Any) -> chat_pb2.CreateChatCompletionRequest:
    return chat_pb2.CreateChatCompletionRequest(
        model=model, messages=[chat_pb2.ChatMessage(role="user", content_text=text)], **fields
    )


class Client:
    def __init__(self, tenancy: Tenancy) -> None:
        self.tenancy = tenancy

    async def admit(
        self, request: chat_pb2.CreateChatCompletionRequest | None = None, key: str | None = KEY
    ) -> tuple[RequestRecord, GatewayError | None]:
        call = CallInfo(metadata=(("authorization", f"Bearer {key}"),) if key else ())
        request = request or chat()
        record = RequestRecord(call, request.model, stream=False)
        try:
            await self.tenancy.admit(request, call, record)
        except GatewayError as error:
            record.error = error
            return record, error
        return record, None

    async def statuses(self, count: int, **kwargs: Any) -> list[int]:
        out = []
        for _ in range(count):
            record, error = await self.admit(**kwargs)
            out.append(error.http_status if error else 200)
            record.finish()
        return out

    async def sync(self) -> None:
        """Deliver queued settlements now (a Redis backend sends them with its next call)."""
        await self.tenancy.state.admit((), (), "")

    async def charged(self, bucket_id: str) -> float:
        state = await self._synced()
        return state.charged(bucket_id) if isinstance(state, MemoryState) else await state.charged(bucket_id)

    async def in_use(self, pool_id: str) -> int:
        state = await self._synced()
        return state.in_use(pool_id) if isinstance(state, MemoryState) else await state.in_use(pool_id)

    async def _synced(self) -> MemoryState | RedisState:
        await self.sync()
        state = self.tenancy.state
        if isinstance(state, FailoverState):
            return state.primary
        assert isinstance(state, MemoryState)
        return state


def finish(record: RequestRecord, prompt: int | None = None, completion: int = 0) -> None:
    if prompt is not None:
        record.usage = chat_pb2.Usage(
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
        )
    record.finish()
