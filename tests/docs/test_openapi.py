"""openapi.yaml: a valid OpenAPI 3.0 document, true to the gateway, and compatible with OpenAI's official spec.

  - the document is valid OpenAPI 3.0 and describes every route the facade serves from the proto;
  - its schemas use OpenAI's field names, types, enums and required keys (compared with the official spec);
  - its examples, and real answers of a live gateway on the dummy model (unary, every SSE event, the model list,
    errors), validate against OpenAI's official schemas and against the spec's own documented responses;
  - its examples are what the gateway really answers;
  - /openapi.yaml serves it, and the wheel the Docker image installs carries it.

OpenAI's spec is read from <repo>/../shared/reference/openai-openapi.yaml; the comparisons skip when it is absent.
"""

from __future__ import annotations

import re
import shutil
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from openapi_spec_validator import OpenAPIV30SpecValidator

from rest_facade.docs import spec_bytes
from rest_facade.routes import build_routes
from rest_facade.server import SERVICES
from tests.docs.schemas import SPEC_PATH, Schemas, gateway_schemas, load_yaml, official_schemas
from tests.harness import ROOT, GatewayProcess
from tests.observability import test_dockerfile as dockerfile
from tests.rest_facade.rest import Reply, call, post, sse_events

HELLO = {"model": "dummy", "messages": [{"role": "user", "content": "Say hi"}]}
STREAM = {**HELLO, "stream": True, "stream_options": {"include_usage": True}}

# Keys OpenAI always sends, as null or [], that the dummy provider leaves out: a completion's choices[].logprobs
# and choices[].message.refusal, a chunk's choices[].finish_reason before the choice's last chunk, and the
# usage chunk's choices. OpenAI's schemas require them (reported as a gateway bug). These omissions alone are
# tolerated when comparing with the official schemas; any other missing key or mismatch fails.
KNOWN_OMISSIONS: set[str] = set()

# The gateway's schemas that have no component of their own in OpenAI's spec, and where OpenAI defines them.
INLINE_IN_OFFICIAL = {
    "ChatCompletionChoice": "/components/schemas/CreateChatCompletionResponse/properties/choices/items",
    "ChatCompletionChunkChoice": "/components/schemas/CreateChatCompletionStreamResponse/properties/choices/items",
}
# Examples OpenAI's schema cannot hold, and why: its Embedding has no base64 form, though its API sends one.
OPENAI_SCHEMA_GAPS = {"dummy_base64": "OpenAI's Embedding.embedding is an array only; base64 answers are strings"}
# Operations that are not the proto's: served by the facade itself.
FACADE_ROUTES = {("get", "/healthz"), ("get", "/readyz")}


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    return load_yaml(SPEC_PATH)


# ---------------------------------------------------------------------------------------------- helpers


def pointer(*parts: str) -> str:
    return "".join("/" + part.replace("~", "~0").replace("/", "~1") for part in parts)


def resolve(document: dict[str, Any], node: Any) -> Any:
    while isinstance(node, dict) and "$ref" in node:
        node = at(document, node["$ref"].removeprefix("#"))
    return node


def at(document: dict[str, Any], json_pointer: str) -> Any:
    node: Any = document
    for part in json_pointer.split("/")[1:]:
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def documented_response(spec: dict[str, Any], path: str, method: str, status: int) -> tuple[str, dict[str, Any]]:
    """The JSON pointer to the response the spec documents for this status (or its default), and that response."""
    responses = spec["paths"][path][method]["responses"]
    key = str(status) if str(status) in responses else "default"
    assert key in responses, f"{method.upper()} {path} does not document status {status}"
    response = responses[key]
    if "$ref" in response:
        return response["$ref"].removeprefix("#"), resolve(spec, response)
    return pointer("paths", path, method, "responses", key), response


def check_documented(spec: dict[str, Any], path: str, method: str, reply: Reply) -> None:
    """The reply matches what the spec documents: its status, content type, required headers and body schema."""
    where, response = documented_response(spec, path, method, reply.status)
    content_type = reply.headers["content-type"].split(";")[0]
    assert content_type in response.get("content", {}), f"{content_type} is not documented at {where}"
    for name, header in response.get("headers", {}).items():
        if resolve(spec, header).get("required"):
            assert name in reply.headers, f"{method.upper()} {path} {reply.status}: no {name} header"
    validator = gateway_schemas().validator(where + pointer("content", content_type, "schema"))
    if content_type == "text/event-stream":
        for data in sse_events(reply.body):
            assert validator.is_valid({"data": data.decode()}), data
            if data != b"[DONE]":
                gateway_schemas().check("CreateChatCompletionStreamResponse", orjson.loads(data))
    else:
        errors = [e.message for e in validator.iter_errors(orjson.loads(reply.body))]
        assert not errors, f"{method.upper()} {path} {reply.status}: {errors}\n{reply.body!r}"


def check_official(official: Schemas, name: str, instance: Any, where: str = "") -> None:
    """Valid against OpenAI's schema, once the known omissions (and only those) are filled in."""
    filled, omitted = official.fill_omitted(name, instance)
    general = {re.sub(r"\[\d+\]", "[*]", path) for path in omitted}
    assert general <= KNOWN_OMISSIONS, f"{where} {name}: required keys left out: {sorted(general - KNOWN_OMISSIONS)}"
    official.check(name, filled)


def check_official_event(official: Schemas, data: bytes) -> None:
    if data == b"[DONE]":
        return
    event = orjson.loads(data)
    check_official(official, "ErrorResponse" if "error" in event else "CreateChatCompletionStreamResponse", event)


def parse_sse_example(text: str) -> list[bytes]:
    return sse_events(text.encode())


def media_examples(media: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    if "example" in media:
        yield "example", media["example"]
    for name, example in media.get("examples", {}).items():
        yield name, example["value"]


def documented_examples(spec: dict[str, Any]) -> Iterator[tuple[str, str, str, Any]]:
    """(where, schema pointer, content type, value) for every request and response example of the spec."""
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            body = operation.get("requestBody")
            if body is not None:
                for content_type, media in resolve(spec, body)["content"].items():
                    where = pointer("paths", path, method, "requestBody", "content", content_type)
                    for name, value in media_examples(media):
                        yield f"{where} {name}", where + "/schema", content_type, value
            for status, response in operation["responses"].items():
                where = response["$ref"].removeprefix("#") if "$ref" in response else None
                where = where or pointer("paths", path, method, "responses", status)
                for content_type, media in resolve(spec, response).get("content", {}).items():
                    for name, value in media_examples(media):
                        yield f"{where} {name}", where + pointer("content", content_type, "schema"), content_type, value
    for name, response in spec["components"]["responses"].items():
        for content_type, media in response.get("content", {}).items():
            where = pointer("components", "responses", name, "content", content_type)
            for example, value in media_examples(media):
                yield f"{where} {example}", where + "/schema", content_type, value


def official_name(spec: dict[str, Any], schema_pointer: str) -> str | None:
    """OpenAI's component for the schema at this pointer of the gateway's spec: the same name, if it has it."""
    schema = at(spec, schema_pointer)
    ref = schema.get("$ref", "")
    return ref.rsplit("/", 1)[-1] or None


def masked(value: Any) -> Any:
    """A completion, chunk or model list with its per-call values (completion ids, timestamps) blanked."""
    if isinstance(value, dict):
        return {
            k: "*" if k == "created" or (k == "id" and str(v).startswith("chatcmpl-")) else masked(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [masked(item) for item in value]
    return value


# ---------------------------------------------------------------------------------------------- the document


def test_spec_is_valid_openapi_3_0(spec: dict[str, Any]) -> None:
    assert str(spec["openapi"]).startswith("3.0."), spec["openapi"]
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in OpenAPIV30SpecValidator(spec).iter_errors()
    ]
    assert not errors, "\n".join(errors)


def test_spec_documents_every_route_the_gateway_serves(spec: dict[str, Any]) -> None:
    routes = [route for service in SERVICES for route in build_routes(service)]
    served = {(route.http_method.lower(), route.path) for route in routes} | FACADE_ROUTES
    documented = {(method, path) for path, item in spec["paths"].items() for method in item if method != "parameters"}
    assert documented == served
    chat = spec["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert {"application/json", "text/event-stream"} <= set(chat), "the SSE form must be documented beside JSON"
    parameters = {resolve(spec, p)["name"] for p in spec["paths"]["/v1/chat/completions"]["post"]["parameters"]}
    assert {"x-request-id", "x-request-timeout", "traceparent"} <= parameters
    headers = spec["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["headers"]
    assert {"x-request-id", "x-llm-gateway-model", "x-llm-gateway-deployment", "x-llm-gateway-attempts"} <= set(headers)
    documented_statuses = set(spec["paths"]["/v1/chat/completions"]["post"]["responses"])
    assert {"200", "400", "404", "413", "429", "499", "500", "502", "503", "504"} <= documented_statuses
    assert {"NotFound", "MethodNotAllowed"} <= set(spec["components"]["responses"])


def test_the_served_spec_is_the_repository_file() -> None:
    assert (ROOT / "rest_facade" / "openapi.yaml").resolve() == SPEC_PATH.resolve()
    assert spec_bytes() == SPEC_PATH.read_bytes()


def _flat(document: dict[str, Any], schema: Any, depth: int = 0) -> list[dict[str, Any]]:
    """A schema's alternatives, with $ref resolved and anyOf/oneOf/allOf flattened (allOf members merged)."""
    schema = resolve(document, schema)
    if not isinstance(schema, dict) or depth > 20:
        return [{}]
    nullable = [{"type": "null"}] if schema.get("nullable") else []
    for key in ("anyOf", "oneOf"):
        if key in schema:
            rest = {k: v for k, v in schema.items() if k not in (key, "nullable")}
            return [{**rest, **alt} for option in schema[key] for alt in _flat(document, option, depth + 1)] + nullable
    if "allOf" in schema:
        merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
        for part in schema["allOf"]:
            for alt in _flat(document, part, depth + 1):
                merged.setdefault("properties", {}).update(alt.get("properties", {}))
                merged["required"] = [*merged.get("required", []), *alt.get("required", [])]
                merged.setdefault("type", alt.get("type"))
        return [merged, *nullable]
    return [{k: v for k, v in schema.items() if k != "nullable"}, *nullable]


def _types(document: dict[str, Any], schema: Any) -> set[str]:
    found: set[str] = set()
    for alt in _flat(document, schema):
        kind = alt.get("type") or ("object" if "properties" in alt else "any")
        found.update(kind if isinstance(kind, list) else [kind])
    return found


def _enum(document: dict[str, Any], schema: Any) -> set[Any] | None:
    """The allowed string values, or None when any string goes."""
    values: set[Any] = set()
    for alt in _flat(document, schema):
        if alt.get("type") in ("string", None) and "enum" not in alt and alt.get("type") != "null":
            return None
        values.update(alt.get("enum", []))
    return values


def _properties(document: dict[str, Any], schema: Any) -> tuple[dict[str, Any], set[str]]:
    properties: dict[str, Any] = {}
    required: set[str] = set()
    for alt in _flat(document, schema):
        properties.update(alt.get("properties", {}))
        required.update(alt.get("required", []))
    return properties, required


def test_component_schemas_agree_with_openais(spec: dict[str, Any]) -> None:
    """Same field names, JSON types, enum values and required keys as OpenAI's schema of the same name."""
    official = official_schemas().document
    theirs_by_name = {
        name: {"$ref": f"#/components/schemas/{name}"}
        for name in spec["components"]["schemas"]
        if name in official["components"]["schemas"]
    }
    theirs_by_name.update({name: at(official, where) for name, where in INLINE_IN_OFFICIAL.items()})
    assert {
        "CreateChatCompletionRequest",
        "CreateChatCompletionResponse",
        "CreateChatCompletionStreamResponse",
        "ListModelsResponse",
        "Model",
        "Error",
        "ErrorResponse",
        "CompletionUsage",
    } <= set(theirs_by_name)
    problems: list[str] = []
    for name, theirs in sorted(theirs_by_name.items()):
        mine = spec["components"]["schemas"][name]
        if _types(spec, mine) - _types(official, theirs) - {"any"} and "any" not in _types(official, theirs):
            problems.append(f"{name}: types {_types(spec, mine)} vs {_types(official, theirs)}")
        if "properties" not in mine:
            continue  # a union: each member is a component of its own, compared by its own name
        my_props, my_required = _properties(spec, mine)
        their_props, their_required = _properties(official, theirs)
        if extra := set(my_props) - set(their_props):
            problems.append(f"{name}: OpenAI has no field {sorted(extra)}")
        if extra := my_required - their_required:
            problems.append(f"{name}: requires {sorted(extra)}, which OpenAI does not")
        for field in sorted(set(my_props) & set(their_props)):
            my_types, their_types = _types(spec, my_props[field]), _types(official, their_props[field])
            their_types |= {"integer"} if "number" in their_types else set()
            if "any" not in their_types and my_types - their_types:
                problems.append(f"{name}.{field}: types {sorted(my_types)}, OpenAI's {sorted(their_types)}")
            my_enum, their_enum = _enum(spec, my_props[field]), _enum(official, their_props[field])
            if my_enum is not None and their_enum is not None and my_enum - their_enum:
                problems.append(f"{name}.{field}: values {sorted(my_enum - their_enum)} are not OpenAI's")
    assert not problems, "\n".join(problems)


def test_examples_match_their_own_schemas(spec: dict[str, Any]) -> None:
    checked = 0
    for where, schema_pointer, content_type, value in documented_examples(spec):
        own = gateway_schemas().validator(schema_pointer)
        if content_type == "text/event-stream":
            events = parse_sse_example(value)
            assert events[-1] == b"[DONE]", where
            for data in events:
                assert own.is_valid({"data": data.decode()}), (where, data)
                if data != b"[DONE]":
                    gateway_schemas().check("CreateChatCompletionStreamResponse", orjson.loads(data))
        else:
            errors = [e.message for e in own.iter_errors(value)]
            assert not errors, f"{where}: {errors}"
        checked += 1
    assert checked >= 6, "the spec should have request, completion, stream, model list and error examples"


def test_examples_validate_against_openais_schemas(spec: dict[str, Any]) -> None:
    official = official_schemas()
    checked: set[str] = set()
    for where, schema_pointer, content_type, value in documented_examples(spec):
        if content_type == "text/event-stream":
            for data in parse_sse_example(value):
                check_official_event(official, data)
            checked.add("CreateChatCompletionStreamResponse")
            continue
        name = official_name(spec, schema_pointer)
        if name == "CreateEmbeddingResponse" and where.rsplit(" ", 1)[-1] in OPENAI_SCHEMA_GAPS:
            continue
        if name is not None and name in official.document["components"]["schemas"]:
            check_official(official, name, value, where)
            checked.add(name)
    assert checked == {
        "CreateChatCompletionRequest",
        "CreateChatCompletionResponse",
        "CreateChatCompletionStreamResponse",
        "CreateEmbeddingRequest",
        "CreateEmbeddingResponse",
        "ListModelsResponse",
        "ErrorResponse",
    }


# ---------------------------------------------------------------------------------------------- a live gateway


@dataclass(frozen=True)
class Exchange:
    path: str
    method: str
    reply: Reply
    official: str | None  # OpenAI's schema for the body (each event's, for a stream)
    documented: str | None = None  # the spec's response for it, when not the operation's own


@pytest.fixture(scope="module")
def exchanges(gateway: GatewayProcess) -> list[Exchange]:
    """Real answers of the gateway: completions unary and streamed, the models, the probes and errors."""
    base = gateway.base_url
    chat = "/v1/chat/completions"
    answers = [
        Exchange(chat, "post", post(base, HELLO), "CreateChatCompletionResponse"),
        Exchange(chat, "post", post(base, {**HELLO, "n": 2, "max_tokens": 3}), "CreateChatCompletionResponse"),
        Exchange(chat, "post", post(base, STREAM), "CreateChatCompletionStreamResponse"),
        Exchange(chat, "post", post(base, {**HELLO, "stream": True, "n": 2}), "CreateChatCompletionStreamResponse"),
        Exchange("/v1/models", "get", call(base, "GET", "/v1/models"), "ListModelsResponse"),
        Exchange("/healthz", "get", call(base, "GET", "/healthz"), None),
        Exchange("/readyz", "get", call(base, "GET", "/readyz"), None),
        Exchange(chat, "post", post(base, {**HELLO, "model": "nope"}), "ErrorResponse"),
        Exchange(chat, "post", post(base, {"messages": HELLO["messages"]}), "ErrorResponse"),
        Exchange(chat, "post", post(base, b"{not json"), "ErrorResponse"),
        Exchange(chat, "post", post(base, {**HELLO, "temperature": "hot"}), "ErrorResponse"),
        Exchange(chat, "post", post(base, HELLO, headers={"x-request-timeout": "soon"}), "ErrorResponse"),
        Exchange(
            "/v1/models", "get", call(base, "GET", "/v1/models", headers={"x-request-timeout": "-1"}), "ErrorResponse"
        ),
        Exchange("/v1/models", "put", call(base, "PUT", "/v1/models"), "ErrorResponse", "MethodNotAllowed"),
        Exchange("/v1/nothing", "get", call(base, "GET", "/v1/nothing"), "ErrorResponse", "NotFound"),
    ]
    statuses = [answer.reply.status for answer in answers]
    assert statuses == [200] * 7 + [404, 400, 400, 400, 400, 400, 405, 404], statuses
    assert orjson.loads(answers[7].reply.body)["error"]["code"] == "model_not_found"
    assert answers[-2].reply.headers["allow"] == "GET"
    for answer in answers[:4]:
        headers = ("x-request-id", "x-llm-gateway-model", "x-llm-gateway-deployment", "x-llm-gateway-attempts")
        assert all(h in answer.reply.headers for h in headers), answer.reply.headers
    return answers


def test_real_responses_match_the_spec(spec: dict[str, Any], exchanges: list[Exchange]) -> None:
    for exchange in exchanges:
        if exchange.documented is None:
            check_documented(spec, exchange.path, exchange.method, exchange.reply)
        else:
            where = pointer("components", "responses", exchange.documented, "content", "application/json", "schema")
            assert gateway_schemas().validator(where).is_valid(orjson.loads(exchange.reply.body)), exchange.reply
    streams = [e.reply for e in exchanges if e.reply.headers["content-type"] == "text/event-stream"]
    assert len(streams) == 2 and all(len(sse_events(reply.body)) > 3 for reply in streams)


def test_real_responses_validate_against_openais_schemas(exchanges: list[Exchange]) -> None:
    official = official_schemas()
    for exchange in exchanges:
        if exchange.official is None:
            continue  # the health probes: not OpenAI's
        if exchange.reply.headers["content-type"] == "text/event-stream":
            for data in sse_events(exchange.reply.body):
                check_official_event(official, data)
        else:
            where = f"{exchange.method.upper()} {exchange.path} {exchange.reply.status}"
            check_official(official, exchange.official, orjson.loads(exchange.reply.body), where)


def test_the_examples_are_what_the_gateway_answers(spec: dict[str, Any], gateway: GatewayProcess) -> None:
    chat = spec["paths"]["/v1/chat/completions"]["post"]
    requests = chat["requestBody"]["content"]["application/json"]["examples"]
    answers = chat["responses"]["200"]["content"]
    assert requests["dummy"]["value"] == HELLO and requests["dummy_stream"]["value"] == STREAM

    unary = post(gateway.base_url, HELLO)
    assert masked(orjson.loads(unary.body)) == masked(answers["application/json"]["examples"]["dummy"]["value"])

    stream = post(gateway.base_url, STREAM)
    example = parse_sse_example(answers["text/event-stream"]["examples"]["dummy_stream"]["value"])
    real = sse_events(stream.body)
    assert real[-1] == example[-1] == b"[DONE]"
    assert [masked(orjson.loads(e)) for e in real[:-1]] == [masked(orjson.loads(e)) for e in example[:-1]]

    models = call(gateway.base_url, "GET", "/v1/models")
    listed = spec["paths"]["/v1/models"]["get"]["responses"]["200"]["content"]["application/json"]["examples"]
    assert masked(orjson.loads(models.body)) == masked(listed["dummy"]["value"])

    responses = spec["components"]["responses"]
    for reply, name in (
        (post(gateway.base_url, {**HELLO, "model": "nope"}), "ModelNotFound"),
        (post(gateway.base_url, {"messages": HELLO["messages"]}), "BadRequest"),
        (call(gateway.base_url, "PUT", "/v1/models"), "MethodNotAllowed"),
    ):
        assert orjson.loads(reply.body) == responses[name]["content"]["application/json"]["example"], name


def test_embedding_examples_are_what_the_gateway_answers(spec: dict[str, Any], gateway: GatewayProcess) -> None:
    operation = spec["paths"]["/v1/embeddings"]["post"]
    requests = operation["requestBody"]["content"]["application/json"]["examples"]
    answers = operation["responses"]["200"]["content"]["application/json"]["examples"]
    official = official_schemas()
    for name in ("dummy", "dummy_base64"):
        reply = call(gateway.base_url, "POST", "/v1/embeddings", requests[name]["value"])
        assert orjson.loads(reply.body) == answers[name]["value"], name
        check_documented(spec, "/v1/embeddings", "post", reply)
        if name not in OPENAI_SCHEMA_GAPS:
            check_official(official, "CreateEmbeddingResponse", orjson.loads(reply.body), name)
    error = call(gateway.base_url, "POST", "/v1/embeddings", {"model": "dummy"})
    check_documented(spec, "/v1/embeddings", "post", error)
    assert error.status == 400


def test_openapi_yaml_is_served(gateway: GatewayProcess) -> None:
    reply = call(gateway.base_url, "GET", "/openapi.yaml")
    assert reply.status == 200
    assert reply.headers["content-type"] in ("application/yaml", "text/yaml")
    assert reply.body == SPEC_PATH.read_bytes()
    assert yaml.safe_load(reply.body)["openapi"].startswith("3.0.")
    assert "x-request-id" in reply.headers


# ---------------------------------------------------------------------------------------------- packaging


def test_the_image_gets_the_spec(tmp_path: Path) -> None:
    """The Dockerfile's builder copies what the spec link needs, and the wheel it builds carries the spec.

    Docker copies rest_facade/openapi.yaml as the link it is, so the repository's openapi.yaml must be in the
    build context too; the context is replayed here with links kept, as Docker keeps them.
    """
    builder = dockerfile.parse_dockerfile(dockerfile.DOCKERFILE.read_text(encoding="utf-8"))[1][0]
    sources = dockerfile.copy_sources(builder)
    assert "openapi.yaml" in sources, "the builder stage must COPY openapi.yaml (rest_facade/openapi.yaml links to it)"
    context = tmp_path / "context"
    context.mkdir()
    for source in sources:
        if (ROOT / source).is_dir():
            shutil.copytree(
                ROOT / source, context / source, symlinks=True, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
            )
        else:
            shutil.copy2(ROOT / source, context / source, follow_symlinks=False)
    wheel = dockerfile.run_pip_wheel(context, tmp_path / "wheels")
    with zipfile.ZipFile(wheel) as archive:
        assert archive.read("rest_facade/openapi.yaml") == SPEC_PATH.read_bytes()
