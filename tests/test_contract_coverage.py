"""Every field of OpenAI's chat completion request, response and stream chunk has a home in the proto.

Reads OpenAI's official spec from ../shared (CI has it); a fresh clone without it skips, saying why.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from google.protobuf.descriptor import Descriptor

from llm_gateway.v1 import chat_pb2

SPEC = Path(__file__).resolve().parents[2] / "shared" / "reference" / "openai-openapi.yaml"

pytestmark = pytest.mark.skipif(
    not SPEC.exists(), reason=f"OpenAI's spec is not at {SPEC} (../shared is only beside CI's and developers' clones)"
)


@pytest.fixture(scope="module")
def schemas() -> dict[str, Any]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml, when there, parses the 2 MB spec 10x faster
    return yaml.load(SPEC.read_text(), Loader=loader)["components"]["schemas"]  # type: ignore[no-any-return]


def _properties(schemas: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """Properties of a schema, through $ref and allOf."""
    if "$ref" in schema:
        return _properties(schemas, schemas[schema["$ref"].rsplit("/", 1)[1]])
    found = dict(schema.get("properties", {}))
    for part in schema.get("allOf", []):
        found.update(_properties(schemas, part))
    return found


def _item(schemas: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in schema:
        return _item(schemas, schemas[schema["$ref"].rsplit("/", 1)[1]])
    return schema["items"]  # type: ignore[no-any-return]


def _fields(message: Descriptor) -> set[str]:
    variants = {o.name for o in message.oneofs if o.GetOptions().Extensions[chat_pb2.json_variant]}
    return {f.name for f in message.fields} | variants


def _missing(schemas: dict[str, Any], schema: dict[str, Any], message: Descriptor) -> set[str]:
    return set(_properties(schemas, schema)) - _fields(message)


def test_request_fields(schemas: dict[str, Any]) -> None:
    request = {"$ref": "#/components/schemas/CreateChatCompletionRequest"}
    assert not _missing(schemas, request, chat_pb2.CreateChatCompletionRequest.DESCRIPTOR)
    assert "stream_options" in _properties(schemas, request)
    options = _properties(schemas, request)["stream_options"]
    assert not _missing(schemas, options, chat_pb2.StreamOptions.DESCRIPTOR)


def test_message_and_part_fields(schemas: dict[str, Any]) -> None:
    message = chat_pb2.ChatMessage.DESCRIPTOR
    for name, schema in schemas.items():
        if name.startswith("ChatCompletionRequest") and name.endswith("Message") and "properties" in schema:
            assert not _missing(schemas, schema, message), name
    parts = chat_pb2.ContentPart.DESCRIPTOR
    for name in (
        "ChatCompletionRequestMessageContentPartText",
        "ChatCompletionRequestMessageContentPartImage",
        "ChatCompletionRequestMessageContentPartAudio",
        "ChatCompletionRequestMessageContentPartRefusal",
    ):
        assert not _missing(schemas, schemas[name], parts), name


def test_response_fields(schemas: dict[str, Any]) -> None:
    response = schemas["CreateChatCompletionResponse"]
    assert not _missing(schemas, response, chat_pb2.ChatCompletion.DESCRIPTOR)
    choice = _item(schemas, _properties(schemas, response)["choices"])
    assert not _missing(schemas, choice, chat_pb2.Choice.DESCRIPTOR)
    assert not _missing(schemas, _properties(schemas, choice)["message"], chat_pb2.ResponseMessage.DESCRIPTOR)
    assert not _missing(schemas, schemas["CompletionUsage"], chat_pb2.Usage.DESCRIPTOR)
    tool_call = schemas["ChatCompletionMessageToolCall"]
    assert not _missing(schemas, tool_call, chat_pb2.ToolCall.DESCRIPTOR)


def test_stream_chunk_fields(schemas: dict[str, Any]) -> None:
    chunk = schemas["CreateChatCompletionStreamResponse"]
    assert not _missing(schemas, chunk, chat_pb2.ChatCompletionChunk.DESCRIPTOR)
    choice = _item(schemas, _properties(schemas, chunk)["choices"])
    assert not _missing(schemas, choice, chat_pb2.ChunkChoice.DESCRIPTOR)
    assert not _missing(schemas, schemas["ChatCompletionStreamResponseDelta"], chat_pb2.Delta.DESCRIPTOR)
    assert not _missing(schemas, schemas["ChatCompletionMessageToolCallChunk"], chat_pb2.ToolCall.DESCRIPTOR)


def test_models_list_fields(schemas: dict[str, Any]) -> None:
    assert not _missing(schemas, schemas["ListModelsResponse"], chat_pb2.ListModelsResponse.DESCRIPTOR)
    missing = _missing(schemas, schemas["Model"], chat_pb2.Model.DESCRIPTOR)
    assert missing <= {"shutdown_date"}  # kept, like any key the proto lacks, in `extra`


def test_embedding_fields(schemas: dict[str, Any]) -> None:
    response = schemas["CreateEmbeddingResponse"]
    for schema, message in (
        (schemas["CreateEmbeddingRequest"], chat_pb2.CreateEmbeddingRequest),
        (response, chat_pb2.CreateEmbeddingResponse),
        (schemas["Embedding"], chat_pb2.Embedding),
        (_properties(schemas, response)["usage"], chat_pb2.EmbeddingUsage),
    ):
        assert not _missing(schemas, schema, message.DESCRIPTOR), message.DESCRIPTOR.name
