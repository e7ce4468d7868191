"""The built-in provider: a deterministic reply, no network, no keys.

Its prompt token count is the number of whitespace-separated words in the input's text; its reply is
a fixed sentence that names the model and echoes the start of the last user message. Its embeddings
are unit vectors drawn from a hash of each input, so the same input always gets the same vector, of
`dimensions` numbers (64 when the request does not say), each exactly a float32 like a real model's.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import math
import struct
import time
from collections.abc import AsyncIterator, Sequence

from gateway.call import CallInfo
from gateway.config import ProviderConfig, Timeouts
from gateway.errors import InvalidRequestError
from llm_gateway.v1 import chat_pb2

_ids = itertools.count(1)
# Keys OpenAI always sends, as null: they travel as raw JSON in `extra` (proto/README.md, rule 8).
_LOGPROBS_NULL = {"logprobs": "null"}
_REFUSAL_NULL = {"refusal": "null"}
_OPEN_CHOICE = {"logprobs": "null", "finish_reason": "null"}
EMBEDDING_DIMENSIONS = 64
MAX_EMBEDDING_DIMENSIONS = 3072  # text-embedding-3-large's


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

    async def embed(
        self, request: chat_pb2.CreateEmbeddingRequest, upstream_model: str, call: CallInfo, timeouts: Timeouts
    ) -> chat_pb2.CreateEmbeddingResponse:
        if self._latency:
            await asyncio.sleep(self._latency)
        dimensions = request.dimensions if request.HasField("dimensions") else EMBEDDING_DIMENSIONS
        if dimensions > MAX_EMBEDDING_DIMENSIONS:
            raise InvalidRequestError(
                f"Invalid 'dimensions': {dimensions}; this model has at most {MAX_EMBEDDING_DIMENSIONS}.",
                param="dimensions",
            )
        as_base64 = request.encoding_format == "base64"
        inputs = embedding_inputs(request)
        data = []
        for index, item in enumerate(inputs):
            vector = _vector(item, dimensions)
            embedding = chat_pb2.Embedding(object="embedding", index=index)
            if as_base64:
                embedding.embedding_base64 = struct.pack(f"<{dimensions}f", *vector)
            else:
                embedding.embedding_floats.values.extend(vector)
            data.append(embedding)
        tokens = sum(len(item.split()) if isinstance(item, str) else len(item) for item in inputs)
        return chat_pb2.CreateEmbeddingResponse(
            object="list",
            data=data,
            model=upstream_model,
            usage=chat_pb2.EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens),
        )

    async def close(self) -> None:
        return None


def embedding_inputs(request: chat_pb2.CreateEmbeddingRequest) -> Sequence[str | Sequence[int]]:
    """The request's inputs, one per embedding: texts, or token id lists."""
    form = request.WhichOneof("input")
    if form == "input_text":
        return [request.input_text]
    if form == "input_texts":
        return list(request.input_texts.values)
    if form == "input_tokens":
        return [list(request.input_tokens.ids)]
    if form == "input_token_lists":
        return [list(ids.ids) for ids in request.input_token_lists.lists]
    return []


def _vector(item: str | Sequence[int], dimensions: int) -> list[float]:
    # The hash stretched to one signed 32-bit number per dimension: C speed, the same on every run.
    data = hashlib.shake_256(repr(item if isinstance(item, str) else list(item)).encode()).digest(4 * dimensions)
    values = struct.unpack(f"<{dimensions}i", data)
    norm = math.sqrt(math.fsum(v * v for v in values)) or 1.0
    # Rounded to float32, as models compute them: the float and base64 forms then say the same.
    return list(struct.unpack(f"<{dimensions}f", struct.pack(f"<{dimensions}f", *(v / norm for v in values))))
