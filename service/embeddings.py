"""CreateEmbedding: OpenAI's /v1/embeddings through the same routing, retries, fallbacks, deadlines and
accounting as a unary chat completion (ChatCore's attempt loop, with the provider's `embed`).

The input reaches the upstream in the form the caller sent (a string, strings, token ids, lists of
token ids), and the vectors come back as the upstream sent them: base64 as its bytes, floats as
doubles, which hold every float32 and float64 the upstream can write.

Usage: the upstream's `prompt_tokens` and `total_tokens` are counted like a chat's prompt tokens. An
upstream that reports none gets its texts counted with the offline tokenizer (service/usage_estimate),
marked as estimated; token-id inputs are counted as they are.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from gateway import tracing
from gateway.call import CallInfo
from gateway.errors import InvalidRequestError
from llm_gateway.v1 import chat_pb2

from . import usage_estimate
from .accounting import RequestRecord
from .deadline import Deadline
from .providers import Provider
from .spans import RequestSpans

if TYPE_CHECKING:
    from .chat import ChatCore

# OpenAI's limits: at most 2048 inputs per request, none of them empty.
MAX_INPUTS = 2048
ENCODING_FORMATS = ("float", "base64")


async def create(
    core: ChatCore, request: chat_pb2.CreateEmbeddingRequest, call: CallInfo
) -> chat_pb2.CreateEmbeddingResponse:
    record = RequestRecord(call, request.model, stream=False, kind="embedding", meter=core.spend)
    spans = RequestSpans(tracing.TRACER, "CreateEmbedding", request, call) if tracing.TRACER else None
    response: chat_pb2.CreateEmbeddingResponse | None = None
    try:
        validate(request)
        if core.tenancy is not None:  # key, model access and limits, as for a chat completion
            await core.tenancy.admit(request, call, record)
        timeout = call.timeout or core._default_timeout
        plan = core.router.plan(request.model, time.monotonic() + timeout)
        loop = asyncio.get_running_loop()
        async with Deadline(loop.time() + timeout, loop):
            response = await core._complete(plan, request, call, record, spans, _embedder)
        assert response is not None
        record.usage, record.usage_estimated = _usage(request, response)
        return response
    except BaseException as exc:
        raise record.failed(exc) from None
    finally:
        record.finish()
        if spans is not None:
            spans.finish(record, response.model if response is not None else "")


def _embedder(provider: Provider) -> Callable[..., Awaitable[Any]]:
    embed: Callable[..., Awaitable[Any]] | None = getattr(provider, "embed", None)
    if embed is None:
        raise InvalidRequestError(
            f"The model is served by provider '{provider.name}' (type {provider.type}), which has no embeddings API.",
            param="model",
            code="embeddings_not_supported",
        )
    return embed


def validate(request: chat_pb2.CreateEmbeddingRequest) -> None:
    if not request.model:
        raise InvalidRequestError("You must provide a model parameter.", param="model")
    form = request.WhichOneof("input")
    if form is None:
        message = "'input' must not be empty." if "input" in request.extra else "'input' is a required property."
        raise InvalidRequestError(message, param="input")
    if form == "input_text":
        if not request.input_text:
            raise InvalidRequestError("'input' must not be an empty string.", param="input")
    elif form != "input_tokens":  # a list of token ids is one input, and non-empty: an empty list is kept raw
        items: Any = request.input_texts.values if form == "input_texts" else request.input_token_lists.lists
        if len(items) > MAX_INPUTS:
            raise InvalidRequestError(f"'input' must have at most {MAX_INPUTS} items, got {len(items)}.", param="input")
        for i, item in enumerate(items):
            if not (item if form == "input_texts" else item.ids):
                raise InvalidRequestError(f"'input[{i}]' must not be empty.", param=f"input[{i}]")
    if request.HasField("encoding_format") and request.encoding_format not in ENCODING_FORMATS:
        raise InvalidRequestError(
            f"Invalid 'encoding_format': {request.encoding_format!r}; it must be 'float' or 'base64'.",
            param="encoding_format",
        )
    if request.HasField("dimensions") and request.dimensions < 1:
        raise InvalidRequestError(
            f"Invalid 'dimensions': {request.dimensions}; it must be at least 1.", param="dimensions"
        )


def _usage(
    request: chat_pb2.CreateEmbeddingRequest, response: chat_pb2.CreateEmbeddingResponse
) -> tuple[chat_pb2.Usage, bool]:
    """The request's usage as the accounting counts it (a chat Usage, no completion), and whether it is estimated."""
    if response.HasField("usage") and response.usage.HasField("prompt_tokens"):
        reported = response.usage
        total = reported.total_tokens if reported.HasField("total_tokens") else reported.prompt_tokens
        return chat_pb2.Usage(prompt_tokens=reported.prompt_tokens, completion_tokens=0, total_tokens=total), False
    form = request.WhichOneof("input")
    if form == "input_tokens":
        tokens = len(request.input_tokens.ids)
    elif form == "input_token_lists":
        tokens = sum(len(ids.ids) for ids in request.input_token_lists.lists)
    else:
        texts = [request.input_text] if form == "input_text" else list(request.input_texts.values)
        tokens = usage_estimate.count_texts(texts)
    return chat_pb2.Usage(prompt_tokens=tokens, completion_tokens=0, total_tokens=tokens), True
