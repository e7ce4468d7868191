"""Anthropic's Messages API (`POST <api_url>/v1/messages`) behind the gateway's OpenAI contract.

Requests are translated from the proto straight to Anthropic's JSON, responses and stream events
straight to protos: no OpenAI JSON in between. The wire plumbing (pool, heads rendered once, deadlines,
SSE in batches) is HTTPProvider's, shared with the OpenAI-compatible providers.

A JSON `response_format` (json_object, json_schema) is asked for the way Anthropic documents it: one
tool whose input schema is the schema, forced with tool_choice; its input comes back as the message's
content, streamed as content deltas. What does not map is refused with a 400: `n` > 1, `logprobs`,
a JSON response_format together with tools. OpenAI-only tuning fields (penalties, seed, logit_bias,
store, ...) are left out. Anthropic's own request fields `thinking`, `top_k`, `mcp_servers`,
`container` and `context_management` pass through when a client sends them.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import orjson

from gateway.call import CallInfo
from gateway.config import ProviderConfig, Timeouts
from gateway.errors import BadGatewayError, GatewayError, InvalidRequestError, UpstreamError
from llm_gateway.v1 import chat_pb2

from .http_provider import Chunks, HTTPProvider, passed_back

# max_tokens is required by Anthropic: when a client sets none, the model's maximum output, as
# LiteLLM does (a prefix table, longest first; 4096 for models it does not know).
DEFAULT_MAX_TOKENS = (
    ("claude-opus-4-5", 64000),
    ("claude-opus-4", 32000),
    ("claude-sonnet-4", 64000),
    ("claude-haiku-4", 64000),
    ("claude-3-7-sonnet", 64000),
    ("claude-3-5-sonnet", 8192),
    ("claude-3-5-haiku", 8192),
)
FALLBACK_MAX_TOKENS = 4096

FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

# Anthropic's error types and the HTTP status each comes with (for errors inside a 200 stream).
ERROR_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}
OVERLOADED = 529  # Anthropic's own status; our clients get 503, which every SDK retries

JSON_TOOL = "json_response"  # the tool a JSON response_format is asked for through
_PASSED_THROUGH = ("thinking", "top_k", "mcp_servers", "container", "context_management")
_REASONING_BUDGETS = {"low": 1024, "medium": 2048, "high": 4096}
_TOOL_ID = re.compile(r"[^a-zA-Z0-9_-]")
# Keys OpenAI sends as null: they travel as raw JSON in `extra` (proto/README.md, rule 8).
_OPEN_CHOICE = {"logprobs": "null", "finish_reason": "null"}
_LOGPROBS_NULL = {"logprobs": "null"}
_EMPTY_OBJECT = "{}"


def default_max_tokens(model: str) -> int:
    for prefix, tokens in DEFAULT_MAX_TOKENS:
        if model.startswith(prefix):
            return tokens
    return FALLBACK_MAX_TOKENS


def messages_url(api_url: str) -> str:
    return api_url + ("/messages" if api_url.endswith("/v1") else "/v1/messages")


class AnthropicProvider(HTTPProvider):
    def __init__(self, config: ProviderConfig) -> None:
        super().__init__(config, messages_url(config.api_url))
        headers = {
            "content-type": "application/json",
            "accept": "application/json",
            "anthropic-version": config.anthropic_version,
        }
        if config.anthropic_beta:
            headers["anthropic-beta"] = config.anthropic_beta
        headers.update((key.lower(), value) for key, value in config.headers.items())
        if config.api_key:
            headers["x-api-key"] = config.api_key
        self._head = self.render_head("POST", self.url, headers)
        self._stream_head = self.render_head("POST", self.url, {**headers, "accept": "text/event-stream"})

    async def complete(
        self, request: chat_pb2.CreateChatCompletionRequest, upstream_model: str, call: CallInfo, timeouts: Timeouts
    ) -> chat_pb2.ChatCompletion:
        body = request_body(request, upstream_model, stream=False)
        obj = await self._json(self._head, body, call, timeouts)
        try:
            return completion(obj, json_tool(request))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BadGatewayError(f"Provider {self.name} sent an invalid response: {exc!r}") from None

    def stream(
        self, request: chat_pb2.CreateChatCompletionRequest, upstream_model: str, call: CallInfo, timeouts: Timeouts
    ) -> AsyncIterator[Chunks]:
        events = StreamTranslator(self.name, upstream_model, json_tool(request))
        return self._events(
            self._stream_head, lambda: request_body(request, upstream_model, stream=True), call, timeouts, events.step
        )

    def _error(self, status: int, body: bytes, headers: Mapping[str, str]) -> GatewayError:
        return upstream_error(status, body, passed_back(headers))


# ---------------------------------------------------------------------------------------- errors


def upstream_error(status: int, body: bytes, headers: Mapping[str, str] | None = None) -> UpstreamError:
    """Anthropic's `{"type": "error", "error": {"type", "message"}}` as our OpenAI-shaped error, with
    the same status (529 overloaded becomes 503). A body of another shape passes through as it is."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        value = None
    error = value.get("error") if type(value) is dict else None
    if status == OVERLOADED:
        status = 503
    if type(error) is not dict:
        return UpstreamError(status, body, headers)
    details = error.get("details")
    code = details.get("error_code") if type(details) is dict else None
    openai = {
        "error": {
            "message": str(error.get("message") or f"Anthropic answered with HTTP {status}."),
            "type": str(error.get("type") or "api_error"),
            "param": None,
            "code": code if type(code) is str else None,
        }
    }
    return UpstreamError(status, orjson.dumps(openai), headers)


# ---------------------------------------------------------------------------------------- request


def request_body(request: chat_pb2.CreateChatCompletionRequest, model: str, stream: bool) -> dict[str, Any]:
    """The Messages API request for an OpenAI chat request; InvalidRequestError for what cannot map."""
    system: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []
    for i, message in enumerate(request.messages):
        role = message.role
        if role == "system" or role == "developer":
            system.extend(_blocks(message, f"messages[{i}]", images=False))
        elif role == "user":
            blocks = _blocks(message, f"messages[{i}]", images=True)
            _add_turn(turns, "user", blocks if blocks or not message.HasField("content_text") else message.content_text)
        elif role == "assistant":
            blocks = _assistant_blocks(message, i)
            if blocks:  # an empty assistant turn is no turn: Anthropic refuses empty content
                _add_turn(turns, "assistant", blocks)
        elif role == "tool":
            _add_turn(turns, "user", [_tool_result(message, i)])
        else:
            raise InvalidRequestError(
                f"Invalid value for 'messages[{i}].role': {role!r} is not supported by this model.",
                param=f"messages[{i}].role",
            )
    for turn in turns:  # one plain text block is sent as the string it came as
        content = turn["content"]
        if type(content) is list and len(content) == 1 and content[0].keys() == {"type", "text"}:
            turn["content"] = content[0]["text"]

    body: dict[str, Any] = {"model": model, "messages": turns}
    if system:
        plain = all(block.keys() == {"type", "text"} for block in system)
        body["system"] = "\n\n".join(block["text"] for block in system) if plain and len(system) == 1 else system
    if request.HasField("max_completion_tokens"):
        body["max_tokens"] = request.max_completion_tokens
    elif request.HasField("max_tokens"):
        body["max_tokens"] = request.max_tokens
    else:
        body["max_tokens"] = default_max_tokens(model)
    stop = request.WhichOneof("stop")
    if stop == "stop_text":
        body["stop_sequences"] = [request.stop_text]
    elif stop == "stop_list" and request.stop_list.values:
        body["stop_sequences"] = list(request.stop_list.values)
    if request.HasField("temperature"):
        body["temperature"] = request.temperature
    if request.HasField("top_p"):
        body["top_p"] = request.top_p
    if stream:
        body["stream"] = True
    if request.tools:
        body["tools"] = [_tool(tool, i) for i, tool in enumerate(request.tools)]
    choice = _tool_choice(request)
    if choice is not None:
        body["tool_choice"] = choice
    if json_tool(request) is not None:
        _json_format(request, body)
    user = request.user or request.safety_identifier
    if user:
        body["metadata"] = {"user_id": user}
    extra = request.extra
    for key in _PASSED_THROUGH:
        if key in extra and extra[key] != "null":
            body[key] = orjson.Fragment(extra[key])
    if "thinking" not in body and request.reasoning_effort in _REASONING_BUDGETS:
        body["thinking"] = {"type": "enabled", "budget_tokens": _REASONING_BUDGETS[request.reasoning_effort]}
    _refuse_unmappable(request)
    return body


def _refuse_unmappable(request: chat_pb2.CreateChatCompletionRequest) -> None:
    if request.HasField("n") and request.n > 1:
        raise InvalidRequestError("This model does not support 'n' greater than 1.", param="n")
    if request.logprobs:
        raise InvalidRequestError("This model does not support 'logprobs'.", param="logprobs")
    kind = request.response_format.type if request.HasField("response_format") else "text"
    if kind not in ("", "text", "json_object", "json_schema"):
        raise InvalidRequestError(
            f"This model does not support 'response_format' of type {kind!r}.", param="response_format"
        )


def json_tool(request: chat_pb2.CreateChatCompletionRequest) -> str | None:
    """The tool a JSON response_format goes through, when the request has one."""
    if request.HasField("response_format") and request.response_format.type in ("json_object", "json_schema"):
        return JSON_TOOL
    return None


def _json_format(request: chat_pb2.CreateChatCompletionRequest, body: dict[str, Any]) -> None:
    if request.tools:
        raise InvalidRequestError(
            "This model does not support a JSON 'response_format' together with 'tools'.", param="response_format"
        )
    schema: Any = {"type": "object"}
    description = "Answer with a JSON object, as this tool's input."
    if request.response_format.HasField("json_schema"):
        spec = orjson.loads(request.response_format.json_schema)
        if type(spec) is dict and type(spec.get("schema")) is dict:
            schema = spec["schema"]
            if type(spec.get("description")) is str:
                description = f"{description} {spec['description']}"
        elif request.response_format.type == "json_schema":
            raise InvalidRequestError(
                "Invalid value for 'response_format.json_schema': expected an object with a 'schema'.",
                param="response_format.json_schema",
            )
    body["tools"] = [{"name": JSON_TOOL, "description": description, "input_schema": schema}]
    body["tool_choice"] = {"type": "tool", "name": JSON_TOOL}


def _add_turn(turns: list[dict[str, Any]], role: str, content: list[dict[str, Any]] | str) -> None:
    """Consecutive messages of one role become one turn: Anthropic's turns alternate."""
    if turns and turns[-1]["role"] == role:
        last = turns[-1]
        if type(last["content"]) is str:
            last["content"] = [{"type": "text", "text": last["content"]}] if last["content"] else []
        last["content"].extend([{"type": "text", "text": content}] if type(content) is str else content)
    else:
        turns.append({"role": role, "content": content})


def _blocks(message: chat_pb2.ChatMessage, where: str, images: bool) -> list[dict[str, Any]]:
    """A message's content as Anthropic content blocks, empty texts left out."""
    blocks: list[dict[str, Any]]
    kind = message.WhichOneof("content")
    if kind == "content_text":
        blocks = [{"type": "text", "text": message.content_text}] if message.content_text else []
    elif kind == "content_parts":
        blocks = []
        for j, part in enumerate(message.content_parts.parts):
            block = _part(part, f"{where}.content[{j}]", images)
            if block is not None:
                blocks.append(block)
    else:
        blocks = []
    if blocks and "cache_control" in message.extra:  # LiteLLM's message-level form: on its last block
        blocks[-1]["cache_control"] = orjson.Fragment(message.extra["cache_control"])
    return blocks


def _part(part: chat_pb2.ContentPart, where: str, images: bool) -> dict[str, Any] | None:
    kind = part.type
    block: dict[str, Any]
    if kind == "text":
        if not part.text:
            return None
        block = {"type": "text", "text": part.text}
    elif kind == "image_url" and images:
        block = {"type": "image", "source": _image_source(part.image_url.url, where)}
    elif kind == "file" and images:
        block = _document(part, where)
    else:
        raise InvalidRequestError(
            f"Invalid value for '{where}.type': content of type {kind!r} is not supported here by this model.",
            param=f"{where}.type",
        )
    if "cache_control" in part.extra:
        block["cache_control"] = orjson.Fragment(part.extra["cache_control"])
    return block


def _data_url(url: str) -> tuple[str, str] | None:
    """(media type, base64 data) of a base64 data URL."""
    if not url.startswith("data:"):
        return None
    head, comma, data = url.partition(",")
    if not comma or not head.endswith(";base64"):
        return None
    return head[5:-7], data


def _image_source(url: str, where: str) -> dict[str, Any]:
    data = _data_url(url)
    if data is not None:
        return {"type": "base64", "media_type": data[0], "data": data[1]}
    if url.startswith(("https://", "http://")):
        return {"type": "url", "url": url}
    raise InvalidRequestError(
        f"Invalid value for '{where}.image_url.url': expected an http(s) URL or a base64 data URL.",
        param=f"{where}.image_url.url",
    )


def _document(part: chat_pb2.ContentPart, where: str) -> dict[str, Any]:
    file = orjson.loads(part.file) if part.HasField("file") else None
    data = _data_url(file.get("file_data", "")) if type(file) is dict else None
    if data is None:
        raise InvalidRequestError(
            f"Invalid value for '{where}.file': this model takes files as base64 data URLs in 'file_data'.",
            param=f"{where}.file",
        )
    return {"type": "document", "source": {"type": "base64", "media_type": data[0], "data": data[1]}}


def _tool_id(value: str) -> str:
    """Anthropic's tool ids match ^[a-zA-Z0-9_-]+$; other characters become `_` (the same on both sides)."""
    return _TOOL_ID.sub("_", value) if _TOOL_ID.search(value) else value


def _assistant_blocks(message: chat_pb2.ChatMessage, i: int) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    if "thinking_blocks" in message.extra:  # replayed as they came (with signatures); they must come first
        thinking = orjson.loads(message.extra["thinking_blocks"])
        if type(thinking) is list:
            blocks.extend(block for block in thinking if type(block) is dict)
    blocks.extend(_blocks(message, f"messages[{i}]", images=False))
    for j, call in enumerate(message.tool_calls):
        arguments = call.function.arguments
        where = f"messages[{i}].tool_calls[{j}].function.arguments"
        try:
            value = orjson.loads(arguments) if arguments.strip() else {}
        except orjson.JSONDecodeError:
            raise InvalidRequestError(f"Invalid value for '{where}': it is not valid JSON.", param=where) from None
        if type(value) is not dict:
            raise InvalidRequestError(f"Invalid value for '{where}': expected a JSON object.", param=where)
        blocks.append({"type": "tool_use", "id": _tool_id(call.id), "name": call.function.name, "input": value})
    return blocks


def _tool_result(message: chat_pb2.ChatMessage, i: int) -> dict[str, Any]:
    block: dict[str, Any] = {"type": "tool_result", "tool_use_id": _tool_id(message.tool_call_id)}
    if message.HasField("content_text"):
        if message.content_text:
            block["content"] = message.content_text
    else:
        content = _blocks(message, f"messages[{i}]", images=True)
        if content:
            block["content"] = content
    return block


def _tool(tool: chat_pb2.Tool, i: int) -> dict[str, Any]:
    out: dict[str, Any]
    if tool.type == "function":
        function = tool.function
        out = {"name": function.name}
        if function.HasField("description"):
            out["description"] = function.description
        out["input_schema"] = (
            orjson.Fragment(function.parameters) if function.HasField("parameters") else {"type": "object"}
        )
        if "cache_control" in tool.extra:
            out["cache_control"] = orjson.Fragment(tool.extra["cache_control"])
    elif tool.type and tool.type != "custom":  # Anthropic's server tools (web_search_..., bash_...) as sent
        out = {"type": tool.type, **{key: orjson.Fragment(value) for key, value in tool.extra.items()}}
    else:
        raise InvalidRequestError(
            f"Invalid value for 'tools[{i}].type': {tool.type!r} tools are not supported by this model.",
            param=f"tools[{i}].type",
        )
    return out


def _tool_choice(request: chat_pb2.CreateChatCompletionRequest) -> dict[str, Any] | None:
    choice: dict[str, Any] | None = None
    if request.HasField("tool_choice"):
        value = orjson.loads(request.tool_choice)
        if value == "auto":
            choice = {"type": "auto"}
        elif value == "none":
            choice = {"type": "none"}
        elif value == "required":
            choice = {"type": "any"}
        elif type(value) is dict and type(value.get("function")) is dict and value["function"].get("name"):
            choice = {"type": "tool", "name": value["function"]["name"]}
        else:
            raise InvalidRequestError(
                "Invalid value for 'tool_choice': expected 'none', 'auto', 'required' or a named function.",
                param="tool_choice",
            )
    if request.HasField("parallel_tool_calls") and not request.parallel_tool_calls and request.tools:
        if choice is None:
            choice = {"type": "auto"}
        if choice["type"] != "none":
            choice["disable_parallel_tool_use"] = True
    return choice


# ---------------------------------------------------------------------------------------- response


def usage(counts: Mapping[str, Any]) -> chat_pb2.Usage:
    """Anthropic's input_tokens exclude the cache: OpenAI's prompt_tokens are all three together."""
    cache_read = counts.get("cache_read_input_tokens") or 0
    cache_creation = counts.get("cache_creation_input_tokens") or 0
    prompt = (counts.get("input_tokens") or 0) + cache_creation + cache_read
    completion_tokens = counts.get("output_tokens") or 0
    return chat_pb2.Usage(
        prompt_tokens=prompt,
        completion_tokens=completion_tokens,
        total_tokens=prompt + completion_tokens,
        prompt_tokens_details=f'{{"cached_tokens":{int(cache_read)}}}',
        extra={
            "cache_creation_input_tokens": str(int(cache_creation)),
            "cache_read_input_tokens": str(int(cache_read)),
        },
    )


def finish_reason(stop_reason: str) -> str:
    return FINISH_REASONS.get(stop_reason, stop_reason)


def completion(obj: dict[str, Any], json_tool: str | None = None) -> chat_pb2.ChatCompletion:
    """The answer; with `json_tool`, that tool's input is the content (a JSON response_format)."""
    texts: list[str] = []
    thinking: list[str] = []
    thinking_blocks: list[dict[str, Any]] = []
    calls: list[chat_pb2.ToolCall] = []
    for block in obj["content"]:
        kind = block["type"]
        if kind == "text":
            texts.append(block["text"])
        elif kind == "tool_use" and block["name"] == json_tool:
            texts.append(orjson.dumps(block["input"]).decode())
        elif kind == "tool_use":
            calls.append(
                chat_pb2.ToolCall(
                    id=block["id"],
                    type="function",
                    function=chat_pb2.FunctionCall(name=block["name"], arguments=orjson.dumps(block["input"]).decode()),
                )
            )
        elif kind == "thinking":
            thinking.append(block["thinking"])
            thinking_blocks.append(block)
        elif kind == "redacted_thinking":
            thinking_blocks.append(block)
    message = chat_pb2.ResponseMessage(role="assistant", tool_calls=calls, extra={"refusal": "null"})
    if texts or not calls:
        message.content = "".join(texts)
    else:
        message.extra["content"] = "null"
    if thinking:
        message.extra["reasoning_content"] = orjson.dumps("".join(thinking)).decode()
    if thinking_blocks:
        message.extra["thinking_blocks"] = orjson.dumps(thinking_blocks).decode()
    choice = chat_pb2.Choice(index=0, message=message, extra=_LOGPROBS_NULL)
    stop_reason = obj.get("stop_reason")
    if stop_reason == "tool_use" and json_tool and not calls:
        stop_reason = "end_turn"  # the JSON answer is the content, not a call
    if stop_reason:
        choice.finish_reason = finish_reason(stop_reason)
    else:
        choice.extra["finish_reason"] = "null"
    return chat_pb2.ChatCompletion(
        id=obj.get("id") or "",
        object="chat.completion",
        created=int(time.time()),
        model=obj.get("model") or "",
        choices=[choice],
        usage=usage(obj.get("usage") or {}),
    )


class StreamTranslator:
    """One stream's state: Anthropic's events in, OpenAI chunks out (`step` per event)."""

    __slots__ = ("_args", "_base", "_counts", "_json", "_json_block", "_json_text", "_provider", "_thinking", "_tools")

    def __init__(self, provider: str, model: str, json_tool: str | None = None) -> None:
        self._provider = provider
        self._base = chat_pb2.ChatCompletionChunk(object="chat.completion.chunk", created=int(time.time()), model=model)
        self._counts: dict[str, Any] = {}
        self._tools: dict[int, int] = {}  # Anthropic's block index -> our tool-call index, dense from 0
        self._args: set[int] = set()  # tool calls (our index) that have had argument text
        # Thinking blocks being read (by Anthropic's index): the block, and its text in pieces.
        self._thinking: dict[int, tuple[dict[str, Any], list[str]]] = {}
        self._json = json_tool  # with a JSON response_format: its tool's input is the content
        self._json_block: int | None = None  # Anthropic's index of that tool's block
        self._json_text = False

    def _chunk(self) -> tuple[chat_pb2.ChatCompletionChunk, chat_pb2.Delta]:
        chunk = chat_pb2.ChatCompletionChunk()
        chunk.CopyFrom(self._base)
        choice = chunk.choices.add(index=0, extra=_OPEN_CHOICE)
        return chunk, choice.delta

    def step(self, data: bytes, out: Chunks) -> bool:
        try:
            event = orjson.loads(data)
            kind = event["type"]
        except (orjson.JSONDecodeError, TypeError, KeyError) as exc:
            raise BadGatewayError(f"Provider {self._provider} sent an invalid stream event: {exc!r}") from None
        try:
            if kind == "content_block_delta":  # most events: one per token
                delta = event["delta"]
                dtype = delta["type"]
                if dtype == "text_delta":
                    self._content(out, delta["text"])
                elif dtype == "input_json_delta":
                    partial = delta["partial_json"]
                    if partial:  # the first one is often empty
                        if event["index"] == self._json_block:
                            self._json_text = True
                            self._content(out, partial)
                        else:
                            index = self._tools[event["index"]]
                            self._args.add(index)
                            self._tool_delta(out, index).function.arguments = partial
                elif dtype == "thinking_delta":
                    chunk, out_delta = self._chunk()
                    out_delta.extra["reasoning_content"] = orjson.dumps(delta["thinking"]).decode()
                    out.append(chunk)
                    self._thinking[event["index"]][1].append(delta["thinking"])
                elif dtype == "signature_delta":
                    block = self._thinking[event["index"]][0]
                    block["signature"] = block.get("signature", "") + delta["signature"]
                # citations_delta and newer kinds carry nothing OpenAI has
            elif kind == "content_block_start":
                block = event["content_block"]
                btype = block["type"]
                if btype == "tool_use" and block["name"] == self._json:
                    self._json_block = event["index"]
                elif btype == "tool_use":
                    index = len(self._tools)
                    self._tools[event["index"]] = index
                    call = self._tool_delta(out, index)
                    call.id = block["id"]
                    call.type = "function"
                    call.function.name = block["name"]
                    call.function.arguments = ""
                elif btype == "text" and block.get("text"):
                    self._content(out, block["text"])
                elif btype == "thinking" or btype == "redacted_thinking":
                    self._thinking[event["index"]] = (dict(block), [block.get("thinking") or ""])
            elif kind == "content_block_stop":
                index = event["index"]
                tool = self._tools.get(index)
                if tool is not None and tool not in self._args:  # a tool without arguments gets "{}"
                    self._tool_delta(out, tool).function.arguments = _EMPTY_OBJECT
                elif index == self._json_block and not self._json_text:
                    self._content(out, _EMPTY_OBJECT)
                thinking = self._thinking.pop(index, None)
                if thinking is not None:  # the whole block once, with its signature, for the next turn
                    block, pieces = thinking
                    if block["type"] == "thinking":
                        block["thinking"] = "".join(pieces)
                    chunk, out_delta = self._chunk()
                    out_delta.extra["thinking_blocks"] = orjson.dumps([block]).decode()
                    out.append(chunk)
            elif kind == "message_start":
                message = event["message"]
                self._base.id = message.get("id") or ""
                if message.get("model"):
                    self._base.model = message["model"]
                self._counts.update(message.get("usage") or {})
                chunk, out_delta = self._chunk()
                out_delta.role = "assistant"
                out_delta.content = ""
                out.append(chunk)
            elif kind == "message_delta":
                counts = event.get("usage")
                if counts:  # cumulative: a field that is there replaces what message_start said
                    self._counts.update((key, value) for key, value in counts.items() if value is not None)
                stop_reason = (event.get("delta") or {}).get("stop_reason")
                if stop_reason == "tool_use" and self._json_block is not None and not self._tools:
                    stop_reason = "end_turn"  # the JSON answer is the content, not a call
                if stop_reason:
                    chunk = chat_pb2.ChatCompletionChunk()
                    chunk.CopyFrom(self._base)
                    chunk.choices.add(
                        index=0, delta=chat_pb2.Delta(), finish_reason=finish_reason(stop_reason), extra=_LOGPROBS_NULL
                    )
                    out.append(chunk)
            elif kind == "message_stop":
                chunk = chat_pb2.ChatCompletionChunk()
                chunk.CopyFrom(self._base)
                chunk.usage.CopyFrom(usage(self._counts))
                chunk.extra["choices"] = "[]"  # OpenAI's usage chunk has an empty choices list
                out.append(chunk)
                return True
            elif kind == "error":
                error = event.get("error") if type(event.get("error")) is dict else {}
                status = ERROR_STATUS.get(str(error.get("type")), 502)
                raise upstream_error(status, data)
            # ping, and event types newer than this code: nothing to say
        except (KeyError, TypeError, AttributeError) as exc:
            raise BadGatewayError(f"Provider {self._provider} sent an invalid {kind} event: {exc!r}") from None
        return False

    def _content(self, out: Chunks, text: str) -> None:
        chunk, delta = self._chunk()
        delta.content = text
        out.append(chunk)

    def _tool_delta(self, out: Chunks, index: int) -> chat_pb2.ToolCall:
        chunk, delta = self._chunk()
        out.append(chunk)
        return delta.tool_calls.add(index=index)
