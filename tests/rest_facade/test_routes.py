"""Routes come from the google.api.http rules: the real ChatService, and made-up services for the rule
shapes ChatService does not use (path variables, query parameters, a body field, additional bindings)."""

from __future__ import annotations

import itertools

import pytest
from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import ServiceDescriptor

from gateway.jsonpb import JsonMappingError
from llm_gateway.v1 import chat_pb2
from rest_facade.routes import RouteConfigError, build_routes

CHAT = chat_pb2.DESCRIPTOR.services_by_name["ChatService"]
T = descriptor_pb2.FieldDescriptorProto
_packages = itertools.count(1)


def make_service(rules: list[tuple[str, bool, http_pb2.HttpRule]], stream_field: bool = True) -> ServiceDescriptor:
    """A service `tN.S` whose methods take `tN.Req` and have the given (name, server_streaming, rule).

    Each call gets its own package: the codec caches its tables by full message name."""
    package = f"t{next(_packages)}"
    pool = descriptor_pool.DescriptorPool()
    for dependency in (descriptor_pb2.DESCRIPTOR, http_pb2.DESCRIPTOR, annotations_pb2.DESCRIPTOR):
        proto = descriptor_pb2.FileDescriptorProto()
        dependency.CopyToProto(proto)
        pool.Add(proto)
    file = descriptor_pb2.FileDescriptorProto(
        name=f"{package}.proto", package=package, syntax="proto3", dependency=["google/api/annotations.proto"]
    )
    inner = file.message_type.add(name="Inner")
    inner.field.add(name="text", number=1, type=T.TYPE_STRING, label=T.LABEL_OPTIONAL)
    request = file.message_type.add(name="Req")
    request.field.add(name="name", number=1, type=T.TYPE_STRING, label=T.LABEL_OPTIONAL)
    request.field.add(name="limit", number=2, type=T.TYPE_INT32, label=T.LABEL_OPTIONAL)
    request.field.add(name="tags", number=3, type=T.TYPE_STRING, label=T.LABEL_REPEATED)
    request.field.add(name="ratio", number=4, type=T.TYPE_DOUBLE, label=T.LABEL_OPTIONAL)
    request.field.add(
        name="inner", number=5, type=T.TYPE_MESSAGE, type_name=f".{package}.Inner", label=T.LABEL_OPTIONAL
    )
    if stream_field:
        request.field.add(name="stream", number=6, type=T.TYPE_BOOL, label=T.LABEL_OPTIONAL)
    service = file.service.add(name="S")
    for name, streaming, rule in rules:
        method = service.method.add(
            name=name, input_type=f".{package}.Req", output_type=f".{package}.Req", server_streaming=streaming
        )
        method.options.Extensions[annotations_pb2.http].CopyFrom(rule)
    pool.Add(file)
    return pool.FindServiceByName(f"{package}.S")


def test_chat_service_routes() -> None:
    routes = {(r.http_method, r.path): r for r in build_routes(CHAT)}
    assert set(routes) == {("POST", "/v1/chat/completions"), ("POST", "/v1/embeddings"), ("GET", "/v1/models")}
    chat = routes[("POST", "/v1/chat/completions")]
    assert chat.unary is not None and chat.unary.method == "/llm_gateway.v1.ChatService/CreateChatCompletion"
    assert chat.streaming is not None and chat.streaming.method == "/llm_gateway.v1.ChatService/StreamChatCompletion"
    assert chat.body == "*"
    models = routes[("GET", "/v1/models")]
    assert models.unary is not None and models.streaming is None and models.body == ""
    embeddings = routes[("POST", "/v1/embeddings")]
    assert embeddings.unary is not None and embeddings.unary.method == "/llm_gateway.v1.ChatService/CreateEmbedding"
    assert embeddings.streaming is None and embeddings.body == "*"


def test_the_stream_flag_picks_the_rpc() -> None:
    (chat,) = [r for r in build_routes(CHAT) if r.path == "/v1/chat/completions"]
    assert chat.pick(chat.decode(b'{"model": "m", "stream": true}', {}, {})) is chat.streaming
    for body in (b'{"model": "m", "stream": false}', b'{"model": "m"}', b'{"model": "m", "stream": null}'):
        assert chat.pick(chat.decode(body, {}, {})) is chat.unary


def test_path_variables_and_query_parameters() -> None:
    service = make_service([("Get", False, http_pb2.HttpRule(get="/v1/things/{name}"))])
    (route,) = build_routes(service)
    assert route.sanic_path == "/v1/things/<name:str>"
    message = route.decode(
        b"",
        {"limit": ["5"], "tags": ["a", "b"], "ratio": ["0.5"], "stream": ["true"], "unknown": ["x"]},
        {"name": "x1"},
    )
    assert (message.name, message.limit, list(message.tags), message.ratio, message.stream) == (
        "x1",
        5,
        ["a", "b"],
        0.5,
        True,
    )
    with pytest.raises(JsonMappingError) as info:
        route.decode(b"", {"limit": ["many"]}, {"name": "x"})
    assert info.value.param == "limit"


def test_body_field_and_additional_bindings() -> None:
    rule = http_pb2.HttpRule(post="/v1/things/{name}:inner".replace(":inner", "/inner"), body="inner")
    rule.additional_bindings.add(put="/v1/inner", body="inner")
    routes = {(r.http_method, r.path): r for r in build_routes(make_service([("Set", False, rule)]))}
    assert set(routes) == {("POST", "/v1/things/{name}/inner"), ("PUT", "/v1/inner")}
    message = routes[("POST", "/v1/things/{name}/inner")].decode(b'{"text": "hi"}', {}, {"name": "n"})
    assert (message.name, message.inner.text) == ("n", "hi")
    with pytest.raises(JsonMappingError) as info:
        routes[("PUT", "/v1/inner")].decode(b'{"text": 1}', {}, {})
    assert info.value.param == "inner.text"


@pytest.mark.parametrize(
    ("rules", "stream_field", "says"),
    [
        ([("A", False, http_pb2.HttpRule(get="/x")), ("B", False, http_pb2.HttpRule(get="/x"))], True, "more than one"),
        (
            [("A", False, http_pb2.HttpRule(post="/x", body="*")), ("B", True, http_pb2.HttpRule(post="/x"))],
            True,
            "body",
        ),
        ([("A", False, http_pb2.HttpRule(post="/x")), ("B", True, http_pb2.HttpRule(post="/x"))], False, "stream"),
        ([("A", False, http_pb2.HttpRule(get="/x/{limit}"))], True, "not a string field"),
        ([("A", False, http_pb2.HttpRule(get="/x/{name=things/*}"))], True, "not supported"),
        ([("A", False, http_pb2.HttpRule(post="/x", body="missing"))], True, "does not exist"),
    ],
)
def test_rules_the_facade_cannot_serve_fail_at_start_up(
    rules: list[tuple[str, bool, http_pb2.HttpRule]], stream_field: bool, says: str
) -> None:
    with pytest.raises(RouteConfigError, match=says):
        build_routes(make_service(rules, stream_field))
