"""Token counts for answers whose upstream reported no usage (llama.cpp, older Ollama and vLLM, proxies that
drop `stream_options`): counted here with an offline tokenizer, and marked as estimated.

Counted only when needed: a stream keeps a reference to each batch it passes on (one list append per
network read), and the text is gathered and counted once, at the end, only if no usage arrived.

The tokenizer is toktok-rs: OpenAI's encodings compiled into its wheel, no files to download (tiktoken
fetches its encoding files at run time, which must not happen here; toktok-rs gives tiktoken's ids).
Measured on this machine (2 cores), toktok 0.3.0:

    | encoding    | load once | 3 short chat texts, threads=1 | same, threads=0 (all cores) | 9 KB text |
    |-------------|-----------|-------------------------------|-----------------------------|-----------|
    | cl100k_base | 148 ms    | 16 us                         | 160 us                      | 34 us     |
    | o200k_base  | 403 ms    | 47 us                         | 234 us                      | 37 us     |

So counting runs on the calling thread (threads=1: spreading a few short texts over threads costs ten
times more). An encoding is loaded the first time a count needs it, once per process, in the request
that needs it (up to 0.4 s): loaded at start-up, the encodings cost every worker about 50 MB of RSS
(the bench's 125 MB against 75 MB), which workers whose upstreams report usage never need. `warm()`
loads them ahead, in a background thread, for a caller that wants that.

Models of the o200k family (gpt-4o, gpt-4.1, gpt-5, o1/o3/o4, chatgpt-*) are counted with o200k_base;
every other model with cl100k_base, as LiteLLM does for models it has no tokenizer for. For those it is
an estimate. Against SmolLM2's own tokenizer (llama.cpp's, from the model file `make test-real` uses), on
8 short texts (English prose, code, JSON, French): cl100k_base counts 120 tokens where SmolLM2 counts
130 (-8%; English within one token per text, French 30% under), o200k_base 117 (-10%). cl100k_base it is.

Prompt tokens follow OpenAI's cookbook formula for chat models: each message's texts (role, content,
name, tool calls), plus 3 tokens per message, 1 per name, and 3 that prime the reply.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

import orjson
import toktok  # type: ignore[import-untyped]

from gateway.config import Config
from llm_gateway.v1 import chat_pb2

from .accounting import RequestRecord

# The vendor field a usage object carries when the gateway counted it; clients that asked for usage see it.
ESTIMATED_KEY = "x_llm_gateway_estimated"
_ESTIMATED = {ESTIMATED_KEY: "true"}

DEFAULT_ENCODING = "cl100k_base"
_O200K_PREFIXES = ("gpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "o1", "o3", "o4", "chatgpt-", "gpt-realtime")
_TOKENS_PER_MESSAGE = 3
_TOKENS_PER_NAME = 1
_REPLY_PRIMING = 3

_loaded: dict[str, threading.Event] = {}  # encoding -> set once it is loaded


def warm(config: Config) -> None:
    """Load, in the background, the encodings of the models `config` routes to upstreams (once per process)."""
    models = {
        deployment.upstream_model
        for route in config.models.values()
        for deployment in route.deployments
        if deployment.provider in config.providers and config.providers[deployment.provider].type != "dummy"
    }
    _warm({encoding_for(model) for model in models})


def _warm(encodings: set[str]) -> None:
    missing = sorted(encodings - _loaded.keys())
    if missing:
        _loaded.update((name, threading.Event()) for name in missing)
        threading.Thread(target=_load, args=(missing,), name="tokenizer-load", daemon=True).start()


def _load(encodings: list[str]) -> None:
    for name in encodings:
        try:
            toktok.batch_count(["warm"], name, threads=1)
        finally:
            _loaded[name].set()


def encoding_for(model: str) -> str:
    name = model.rsplit("/", 1)[-1].lower()  # "openai/gpt-4o" and "azure/gpt-4o" count as gpt-4o
    return "o200k_base" if name.startswith(_O200K_PREFIXES) else DEFAULT_ENCODING


def count(texts: list[str], model: str = "") -> int:
    """The tokens of `texts`, each counted on its own."""
    if not texts:
        return 0
    encoding = encoding_for(model)
    loaded = _loaded.get(encoding)
    if loaded is None:
        _warm({encoding})
        loaded = _loaded[encoding]
    loaded.wait()  # at once, but for a count in the first moments after start-up
    return sum(toktok.batch_count(texts, encoding, threads=1))


def count_texts(texts: list[str], model: str = "") -> int:
    return count([text for text in texts if text], model)


def prompt_tokens(request: chat_pb2.CreateChatCompletionRequest, model: str) -> int:
    texts: list[str] = []
    names = 0
    for message in request.messages:
        texts.append(message.role)
        if message.HasField("content_text"):
            texts.append(message.content_text)
        elif message.HasField("content_parts"):
            texts.extend(part.text or part.refusal for part in message.content_parts.parts)
        if message.HasField("name"):
            texts.append(message.name)
            names += 1
        for tool_call in message.tool_calls:
            texts += (tool_call.function.name, tool_call.function.arguments)
    texts.extend(tool.function.name + tool.function.description + tool.function.parameters for tool in request.tools)
    overhead = _TOKENS_PER_MESSAGE * len(request.messages) + _TOKENS_PER_NAME * names + _REPLY_PRIMING
    return count_texts(texts, model) + overhead


def _usage(prompt: int, completion: int) -> chat_pb2.Usage:
    return chat_pb2.Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion, extra=_ESTIMATED
    )


def _reasoning(extra: Mapping[str, str]) -> list[str]:
    """Reasoning text some servers send beside the content (llama.cpp, vLLM, DeepSeek): raw JSON strings."""
    out = []
    for key in ("reasoning_content", "reasoning"):
        if key in extra:
            value = orjson.loads(extra[key])
            if type(value) is str:
                out.append(value)
    return out


def settle_stream(
    record: RequestRecord,
    request: chat_pb2.CreateChatCompletionRequest,
    batches: list[list[chat_pb2.ChatCompletionChunk]],
) -> chat_pb2.ChatCompletionChunk:
    """Count a stream that ended without usage into `record`; returns the usage chunk to send a client that asked."""
    pieces: dict[tuple[int, int, int], list[str]] = {}  # (choice, kind or tool call, ...) -> its text fragments
    last: chat_pb2.ChatCompletionChunk | None = None
    for batch in batches:
        for chunk in batch:
            last = chunk
            for choice in chunk.choices:
                delta = choice.delta
                at = choice.index
                if delta.content:
                    pieces.setdefault((at, -1, 0), []).append(delta.content)
                if delta.refusal:
                    pieces.setdefault((at, -2, 0), []).append(delta.refusal)
                if delta.extra:
                    for text in _reasoning(delta.extra):
                        pieces.setdefault((at, -3, 0), []).append(text)
                for tool_call in delta.tool_calls:
                    function = tool_call.function
                    key = (at, tool_call.index, 0)
                    if function.name:
                        pieces.setdefault((at, tool_call.index, 1), []).append(function.name)
                    if function.arguments:
                        pieces.setdefault(key, []).append(function.arguments)
    model = last.model if last is not None and last.model else request.model
    completion = count_texts(["".join(fragments) for fragments in pieces.values()], model)
    usage = _usage(prompt_tokens(request, model), completion)
    record.usage, record.usage_estimated = usage, True
    chunk = chat_pb2.ChatCompletionChunk(object="chat.completion.chunk", usage=usage)
    if last is not None:
        chunk.id, chunk.created, chunk.model = last.id, last.created, last.model
    chunk.extra["choices"] = "[]"  # OpenAI's usage chunk has an empty choices list
    return chunk


def settle_completion(
    record: RequestRecord, request: chat_pb2.CreateChatCompletionRequest, response: chat_pb2.ChatCompletion
) -> None:
    """Count a unary answer that came without usage into `record`, and give the response the estimate."""
    texts: list[str] = []
    for choice in response.choices:
        message = choice.message
        texts += (message.content, message.refusal)
        texts.extend(_reasoning(message.extra))
        for tool_call in message.tool_calls:
            texts += (tool_call.function.name, tool_call.function.arguments)
    model = response.model or request.model
    usage = _usage(prompt_tokens(request, model), count_texts(texts, model))
    response.usage.CopyFrom(usage)
    response.extra.pop("usage", None)  # an upstream's "usage": null gives way to the count
    record.usage, record.usage_estimated = response.usage, True
