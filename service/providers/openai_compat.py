"""Any upstream that speaks OpenAI's chat completion API: OpenAI, Gemini, Ollama, vLLM, Groq, ...

The HTTP client is picked by measurement: httpx costs 3 to 8 times the CPU of aiohttp per request
(design notes, section 3), and aiohttp about 5 times that of `http1`, the gateway's own lean client
(bench/profile-notes.md). One keep-alive pool per provider, created on first use inside the serving
event loop; the request head is rendered once per provider, so a request adds only its body.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson

from gateway.call import CallInfo
from gateway.config import ProviderConfig, Timeouts
from gateway.errors import BadGatewayError, UpstreamError
from gateway.jsonpb import JsonMappingError, MessageCodec
from llm_gateway.v1 import chat_pb2

from .http_provider import HTTPProvider

_REQUEST = MessageCodec.for_type(chat_pb2.CreateChatCompletionRequest)
_COMPLETION = MessageCodec.for_type(chat_pb2.ChatCompletion)
_CHUNK = MessageCodec.for_type(chat_pb2.ChatCompletionChunk)
_EMBEDDING_REQUEST = MessageCodec.for_type(chat_pb2.CreateEmbeddingRequest)
_EMBEDDINGS = MessageCodec.for_type(chat_pb2.CreateEmbeddingResponse)

_DONE = b"[DONE]"


def api_base(config: ProviderConfig) -> str:
    """The URL the OpenAI paths (/chat/completions, /embeddings) go under, for a provider type and its api_url."""
    base = config.api_url
    if config.type == "gemini":
        if not base.endswith("/openai"):
            base += "/v1beta/openai"
    elif config.type == "ollama" and not base.endswith("/v1"):
        base += "/v1"
    return base


# The request heads of one set of URLs: chat, chat streamed, embeddings.
Heads = tuple[bytes, bytes, bytes]


class OpenAICompatibleProvider(HTTPProvider):
    def __init__(self, config: ProviderConfig) -> None:
        base, query = self._base(config)
        super().__init__(config, f"{base}/chat/completions{query}")
        headers = {"content-type": "application/json", "accept": "application/json"}
        headers.update((key.lower(), value) for key, value in config.headers.items())
        if config.api_key:
            headers.update(self._auth(config.api_key))
        self._headers = headers
        self._heads = self._render(base, query)

    def _base(self, config: ProviderConfig) -> tuple[str, str]:
        """The URL the OpenAI paths go under, and the query string that follows them."""
        return api_base(config), ""

    def _auth(self, api_key: str) -> dict[str, str]:
        return {"authorization": f"Bearer {api_key}"}

    def _render(self, base: str, query: str) -> Heads:
        """The heads for the URLs under `base`; the same origin, so the same pool: only the target differs."""
        headers = self._headers
        return (
            self.render_head("POST", f"{base}/chat/completions{query}", headers),
            self.render_head("POST", f"{base}/chat/completions{query}", {**headers, "accept": "text/event-stream"}),
            self.render_head("POST", f"{base}/embeddings{query}", headers),
        )

    def _heads_for(self, upstream_model: str) -> Heads:
        """The heads for a model: here one set per provider (Azure's deployment URLs name the model)."""
        return self._heads

    async def complete(
        self, request: chat_pb2.CreateChatCompletionRequest, upstream_model: str, call: CallInfo, timeouts: Timeouts
    ) -> chat_pb2.ChatCompletion:
        body = _REQUEST.encode(request)
        body["model"] = upstream_model
        if body.get("stream") is True:
            body["stream"] = False
        # The decode is a plain call after the exchange, not a coroutine of its own around it.
        return self._decoded(await self._json(self._heads_for(upstream_model)[0], body, call, timeouts), _COMPLETION)  # type: ignore[no-any-return]

    async def embed(
        self, request: chat_pb2.CreateEmbeddingRequest, upstream_model: str, call: CallInfo, timeouts: Timeouts
    ) -> chat_pb2.CreateEmbeddingResponse:
        body = _EMBEDDING_REQUEST.encode(request)
        body["model"] = upstream_model
        return self._decoded(await self._json(self._heads_for(upstream_model)[2], body, call, timeouts), _EMBEDDINGS)  # type: ignore[no-any-return]

    def _decoded(self, obj: dict[str, Any], codec: MessageCodec[Any]) -> Any:
        """A JSON answer decoded by `codec`."""
        try:
            return codec.decode_kept(obj)
        except JsonMappingError as exc:
            raise BadGatewayError(f"Provider {self.name} sent an invalid response: {exc}") from None

    def stream(
        self, request: chat_pb2.CreateChatCompletionRequest, upstream_model: str, call: CallInfo, timeouts: Timeouts
    ) -> AsyncIterator[list[chat_pb2.ChatCompletionChunk]]:
        head = self._heads_for(upstream_model)[1]
        return self._events(head, lambda: _stream_body(request, upstream_model), call, timeouts, self._step)

    def _step(self, data: bytes, out: list[chat_pb2.ChatCompletionChunk]) -> bool:
        # Once per event: the JSON, the error check and the decode inline, no call of our own between.
        if data == _DONE:
            return True
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            obj = None
        if type(obj) is not dict:  # _object() says what is wrong with it (it raises)
            obj = self._object(data, "stream event")
        if "error" in obj and "choices" not in obj:
            # An error after the stream started: providers report it as an event of its own.
            error = obj["error"] if isinstance(obj["error"], dict) else {}
            status = error.get("status") or error.get("code")
            raise UpstreamError(status if isinstance(status, int) and 400 <= status < 600 else 502, data)
        try:
            out.append(_CHUNK.decode_kept(obj))
        except JsonMappingError as exc:
            raise BadGatewayError(f"Provider {self.name} sent an invalid stream event: {exc}") from None
        return False


def _stream_body(request: chat_pb2.CreateChatCompletionRequest, upstream_model: str) -> dict[str, Any]:
    body = _REQUEST.encode(request)
    body["model"] = upstream_model
    body["stream"] = True
    # Always ask for usage, so every stream is accounted for; the service strips it again for
    # clients that did not ask.
    options = body.get("stream_options")
    body["stream_options"] = {**options, "include_usage": True} if type(options) is dict else {"include_usage": True}
    return body
