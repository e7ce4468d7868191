"""What travels with every call besides the request message, whichever way the call is made."""

from __future__ import annotations

import itertools
import secrets
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from google.protobuf.message import Message

Metadata = tuple[tuple[str, str], ...]

# Request ids: 16 random hex digits drawn once per process, then a 16-digit counter. Unique across
# workers and restarts, and about 0.2 us each; uuid4() takes 2 (os.urandom is a system call per id).
_ID_PREFIX = secrets.token_hex(8)
_ID_COUNTER = itertools.count(1)


def new_request_id() -> str:
    """32 lower-case hex digits, like uuid4().hex."""
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"


# Not frozen: a frozen dataclass's __init__ sets each field through object.__setattr__ (about 8,300
# instructions against 3,100). No one assigns a field; a changed call is a dataclasses.replace().
@dataclass(slots=True)
class CallInfo:
    # gRPC-style metadata: lower-case keys (authorization, x-request-id, traceparent, ...).
    metadata: Metadata = ()
    # Seconds left before the caller gives up; None means the gateway's configured request timeout.
    timeout: float | None = None
    # Filled by the service before its first response message: what answered (x-llm-gateway-model,
    # x-llm-gateway-deployment, x-llm-gateway-attempts). The REST facade sends them as headers, the
    # gRPC servicer as initial metadata.
    response_metadata: dict[str, str] = field(default_factory=dict)

    def get(self, key: str, default: str = "") -> str:
        for k, v in self.metadata:
            if k == key:
                return v
        return default


class ChatBackend(Protocol):
    """How the REST facade reaches the service: in the same process, or over a gRPC channel.

    `method` is the full gRPC method name, like "/llm_gateway.v1.ChatService/ListModels". Failures
    are raised as `gateway.errors.GatewayError`.
    """

    def unary(self, method: str, request: Message, call: CallInfo) -> Awaitable[Message]:
        """An awaitable of the reply (a coroutine: `async def unary` fits)."""
        ...

    def stream(self, method: str, request: Message, call: CallInfo) -> AsyncIterator[Sequence[Message]]:
        """A server-streaming call's messages in batches, never empty: those that were ready together."""
        ...

    async def ready(self) -> bool: ...

    async def close(self) -> None: ...
