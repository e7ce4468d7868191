"""The built-in provider: a deterministic reply, no network, no keys.

Its prompt token count is the number of whitespace-separated words in the input's text; its reply is
a fixed sentence that names the model and echoes the start of the last user message.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator

from gateway.call import CallInfo
from gateway.config import ProviderConfig, Timeouts
from llm_gateway.v1 import chat_pb2

_ids = itertools.count(1)
# Keys OpenAI always sends, as null: they travel as raw JSON in `extra` (proto/README.md, rule 8).
_LOGPROBS_NULL = {"logprobs": "null"}
_REFUSAL_NULL = {"refusal": "null"}
_OPEN_CHOICE = {"logprobs": "null", "finish_reason": "null"}


def _open(index: int, delta: chat_pb2.Delta) -> chat_pb2.ChunkChoice:
    """A chunk choice before the choice's last one: finish_reason is still null."""
    return chat_pb2.ChunkChoice(index=index, delta=delta, extra=_OPEN_CHOICE)


def _words(message: chat_pb2.ChatMessage) -> list[str]:
    if message.HasField("content_text"):
        return message.content_text.split()
    if message.HasField("content_parts"):
        return [word for part in message.content_parts.parts if part.HasField("text") for word in part.text.split()]
    return []


def prompt_tokens(request: chat_pb2.CreateChatCompletionRequest) -> int:
    return sum(len(_words(message)) for message in request.messages)


def reply_words(request: chat_pb2.CreateChatCompletionRequest) -> list[str]:
    last_user = next((m for m in reversed(request.messages) if m.role == "user"), None)
    echo = _words(last_user)[:8] if last_user is not None else []
    return (
        ["Hello", "from", "the", "dummy", "provider.", "You", "said:", *echo]
        if echo
        else ["Hello", "from", "the", "dummy", "provider."]
    )


class DummyProvider:
    def __init__(self, config: ProviderConfig) -> None:
        self.name = config.name
        self.type = config.type
        self.url = ""
        self._latency = config.latency_ms / 1000.0

    def _plan(
        self, request: chat_pb2.CreateChatCompletionRequest, upstream_model: str
    ) -> tuple[str, int, list[str], str, chat_pb2.Usage]:
        words = reply_words(request)
        finish = "stop"
        limit = (
            request.max_completion_tokens
            if request.HasField("max_completion_tokens")
            else (request.max_tokens if request.HasField("max_tokens") else None)
        )
        if limit is not None and limit < len(words):
            words, finish = words[: max(limit, 0)], "length"
        choices = request.n if request.HasField("n") and request.n > 0 else 1
        prompt = prompt_tokens(request)
        usage = chat_pb2.Usage(
            prompt_tokens=prompt, completion_tokens=len(words) * choices, total_tokens=prompt + len(words) * choices
        )
        return f"chatcmpl-dummy-{next(_ids)}", choices, words, finish, usage

    async def complete(
        self, request: chat_pb2.CreateChatCompletionRequest, upstream_model: str, call: CallInfo, timeouts: Timeouts
    ) -> chat_pb2.ChatCompletion:
        if self._latency:
            await asyncio.sleep(self._latency)
        completion_id, choices, words, finish, usage = self._plan(request, upstream_model)
        return chat_pb2.ChatCompletion(
            id=completion_id,
            object="chat.completion",
            created=int(time.time()),
            model=upstream_model,
            choices=[
                chat_pb2.Choice(
                    index=i,
                    message=chat_pb2.ResponseMessage(role="assistant", content=" ".join(words), extra=_REFUSAL_NULL),
                    finish_reason=finish,
                    extra=_LOGPROBS_NULL,
                )
                for i in range(choices)
            ],
            usage=usage,
        )

    async def stream(
        self, request: chat_pb2.CreateChatCompletionRequest, upstream_model: str, call: CallInfo, timeouts: Timeouts
    ) -> AsyncIterator[list[chat_pb2.ChatCompletionChunk]]:
        completion_id, choices, words, finish, usage = self._plan(request, upstream_model)
        created = int(time.time())
        pieces = [word if i == 0 else " " + word for i, word in enumerate(words)]
        delay = self._latency / (len(pieces) + 1) if self._latency else 0.0

        def chunk(*choice: chat_pb2.ChunkChoice) -> chat_pb2.ChatCompletionChunk:
            return chat_pb2.ChatCompletionChunk(
                id=completion_id,
                object="chat.completion.chunk",
                created=created,
                model=upstream_model,
                choices=choice,
            )

        steps = [[chunk(_open(index, chat_pb2.Delta(role="assistant", content=""))) for index in range(choices)]]
        steps += [[chunk(_open(index, chat_pb2.Delta(content=piece))) for index in range(choices)] for piece in pieces]
        last = [
            chunk(chat_pb2.ChunkChoice(index=index, delta=chat_pb2.Delta(), finish_reason=finish, extra=_LOGPROBS_NULL))
            for index in range(choices)
        ]
        final = chunk()
        final.usage.CopyFrom(usage)
        final.extra["choices"] = "[]"  # OpenAI's usage chunk has an empty choices list
        last.append(final)
        if not delay:  # everything is ready at once: one batch
            yield [c for step in steps for c in step] + last
            return
        # The latency is spread over the stream: before the first chunk and before each piece.
        steps[-1] += last
        for step in steps:
            await asyncio.sleep(delay)
            yield step

    async def close(self) -> None:
        return None
