"""REST routes generated from the `google.api.http` rules of a gRPC service, like grpc-gateway.

Every rule (and its `additional_bindings`) of every method becomes a `Binding`; bindings that share
an HTTP verb and path template form one `Route`. Each binding gets its codecs and its full gRPC method
name here, once, at start-up, so a request costs a dict lookup, not a descriptor walk.

Supported rule shapes:
  - `body: "*"`: the whole JSON body is the request message;
  - `body: "field"`: the JSON body is that field of the request message;
  - no body: request fields come from the query string (scalars and repeated scalars);
  - `{field}` variables in the path bind top-level string fields.

Two RPCs may share one route when one is unary and the other server-streaming with the same request
type (CreateChatCompletion and StreamChatCompletion). The request's bool field `stream` then picks the
RPC: true means the streaming one, as in OpenAI's API.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import orjson
from google.api import annotations_pb2, http_pb2
from google.protobuf import message_factory
from google.protobuf.descriptor import FieldDescriptor, MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message

from gateway.jsonpb import INTEGER_TYPES, JsonMappingError, MessageCodec

HTTP_VERBS = ("get", "put", "post", "delete", "patch")
STREAM_SELECTOR = "stream"

_VARIABLE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


class RouteConfigError(ValueError):
    """An http rule this facade cannot serve; raised at start-up, never per request."""


@dataclass(frozen=True, slots=True)
class Binding:
    """One RPC reachable over REST."""

    method: str  # full gRPC method name, "/pkg.Service/Method"
    http_method: str  # upper case
    path: str  # the rule's path template
    body: str  # "*", a field name, or "" (query string)
    server_streaming: bool
    request: MessageCodec[Any]
    response: MessageCodec[Any]
    descriptor: MethodDescriptor


class Route:
    """One HTTP verb + path template, and the RPC or RPCs it reaches; validated and precomputed once."""

    __slots__ = ("_query", "body", "codec", "http_method", "path", "path_fields", "sanic_path", "streaming", "unary")

    def __init__(self, bindings: Sequence[Binding]) -> None:
        first = bindings[0]
        self.http_method = first.http_method
        self.path = first.path
        self.sanic_path = _VARIABLE.sub(r"<\1:str>", first.path)
        self.path_fields = tuple(_VARIABLE.findall(first.path))
        self.unary: Binding | None = None
        self.streaming: Binding | None = None
        for binding in bindings:
            slot = "streaming" if binding.server_streaming else "unary"
            if getattr(self, slot) is not None:
                raise self._error(f"more than one {slot} RPC is bound to it")
            setattr(self, slot, binding)
        if len({b.request.descriptor.full_name for b in bindings}) > 1:
            raise self._error("the RPCs sharing it take different requests")
        if len({b.body for b in bindings}) > 1:
            raise self._error("the RPCs sharing it have different body rules")
        self.codec: MessageCodec[Any] = first.request
        self.body = first.body
        self._query: dict[str, Callable[[Sequence[str]], Any]] = {}
        self._check_fields()

    @property
    def bindings(self) -> tuple[Binding, ...]:
        return tuple(b for b in (self.unary, self.streaming) if b is not None)

    def pick(self, request: Message) -> Binding:
        """The RPC for this request: the streaming one when both exist and the request asks to stream."""
        if self.unary is None:
            assert self.streaming is not None
            return self.streaming
        if self.streaming is not None and getattr(request, STREAM_SELECTOR):
            return self.streaming
        return self.unary

    def decode(self, body: bytes, query: Mapping[str, Sequence[str]], path_params: Mapping[str, str]) -> Message:
        """The request message for an HTTP request; raises JsonMappingError with the offending path."""
        message: Message
        if self.body == "*":
            message = self.codec.loads(body)  # bytes straight to orjson: no str decode, no json_format
        elif self.body:
            message = self.codec.decode({self.body: _loads_any(body)})
        else:
            # Unknown query parameters are ignored, as OpenAI and grpc-gateway do.
            fields = self._query
            message = self.codec.decode({key: fields[key](values) for key, values in query.items() if key in fields})
        for name, value in path_params.items():
            setattr(message, name, unquote(value))  # as grpc-gateway does: /admin/keys/team%3Abot is team:bot
        return message

    def _error(self, problem: str) -> RouteConfigError:
        return RouteConfigError(f"{self.http_method} {self.path}: {problem}")

    def _check_fields(self) -> None:
        descriptor = self.codec.descriptor
        if self.unary is not None and self.streaming is not None:
            selector = descriptor.fields_by_name.get(STREAM_SELECTOR)
            if selector is None or selector.type != FieldDescriptor.TYPE_BOOL:
                raise self._error(
                    f"a unary and a streaming RPC share it, but the request has no bool field {STREAM_SELECTOR!r}"
                    " to choose between them"
                )
        for name in self.path_fields:
            path_field = descriptor.fields_by_name.get(name)
            if path_field is None or path_field.type != FieldDescriptor.TYPE_STRING or path_field.is_repeated:
                raise self._error(f"{{{name}}} is not a string field")
        if self.body and self.body != "*" and self.body not in descriptor.fields_by_name:
            raise self._error(f"body field {self.body!r} does not exist")
        if not self.body:
            for query_field in descriptor.fields:
                converter = _query_converter(query_field)
                if converter is not None and query_field.name not in self.path_fields:
                    self._query[query_field.name] = converter


def build_routes(service: ServiceDescriptor) -> list[Route]:
    """Every REST route of `service`, from its methods' google.api.http options."""
    grouped: dict[tuple[str, str], list[Binding]] = {}
    for method in service.methods:
        options = method.GetOptions()
        if not options.HasExtension(annotations_pb2.http):
            continue
        rule = options.Extensions[annotations_pb2.http]
        for one in (rule, *rule.additional_bindings):
            binding = _binding(service, method, one)
            grouped.setdefault((binding.http_method, binding.path), []).append(binding)
    return [Route(bindings) for bindings in grouped.values()]


def _binding(service: ServiceDescriptor, method: MethodDescriptor, rule: http_pb2.HttpRule) -> Binding:
    pattern = rule.WhichOneof("pattern")
    if pattern in HTTP_VERBS:
        verb, path = pattern.upper(), getattr(rule, pattern)
    elif pattern == "custom":
        verb, path = rule.custom.kind.upper(), rule.custom.path
    else:
        raise RouteConfigError(f"{method.full_name}: http rule without a pattern")
    if method.client_streaming:
        raise RouteConfigError(f"{method.full_name}: client-streaming RPCs cannot be served over REST")
    if "*" in path or "=" in path or ":" in path:
        raise RouteConfigError(f"{method.full_name}: path template {path!r} is not supported (only {{field}})")
    return Binding(
        method=f"/{service.full_name}/{method.name}",
        http_method=verb,
        path=path,
        body=rule.body,
        server_streaming=method.server_streaming,
        request=MessageCodec.for_type(message_factory.GetMessageClass(method.input_type)),
        response=MessageCodec.for_type(message_factory.GetMessageClass(method.output_type)),
        descriptor=method,
    )


def _loads_any(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise JsonMappingError(f"We could not parse the JSON body of your request: {exc}.", "") from None


def _query_converter(query_field: FieldDescriptor) -> Callable[[Sequence[str]], Any] | None:
    """How a query parameter's string values become the field's JSON value; None for message fields."""
    if query_field.message_type is not None:
        return None
    scalar = _SCALAR_FROM_TEXT.get(query_field.type)
    if scalar is None:
        return None
    name = query_field.name

    def one(text: str) -> Any:
        try:
            return scalar(text)
        except ValueError:
            raise JsonMappingError(f"Invalid value for query parameter '{{param}}': {text!r}.", name) from None

    if query_field.is_repeated:
        return lambda values: [one(v) for v in values]
    return lambda values: one(values[-1])


def _bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("true", "1"):
        return True
    if lowered in ("false", "0"):
        return False
    raise ValueError(text)


def _float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(text)
    return number


_SCALAR_FROM_TEXT: dict[int, Callable[[str], Any]] = {
    FieldDescriptor.TYPE_STRING: str,
    FieldDescriptor.TYPE_BOOL: _bool,
    FieldDescriptor.TYPE_DOUBLE: _float,
    FieldDescriptor.TYPE_FLOAT: _float,
    **dict.fromkeys(INTEGER_TYPES, int),
}
