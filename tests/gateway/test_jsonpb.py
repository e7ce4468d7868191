"""The JSON <-> protobuf codec, rule by rule (proto/README.md)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from gateway.jsonpb import JsonMappingError, MessageCodec
from llm_gateway.v1 import chat_pb2

REQUEST = MessageCodec.for_type(chat_pb2.CreateChatCompletionRequest)
COMPLETION = MessageCodec.for_type(chat_pb2.ChatCompletion)


def roundtrip(obj: dict[str, Any]) -> Any:
    return orjson.loads(REQUEST.dumps(REQUEST.decode(obj)))


def test_null_and_absent_differ() -> None:
    with_null = {"model": "m", "messages": [{"role": "assistant", "content": None}], "temperature": None}
    absent = {"model": "m", "messages": [{"role": "assistant"}]}
    assert roundtrip(with_null) == with_null
    assert roundtrip(absent) == absent


def test_string_and_array_content_keep_their_form() -> None:
    text = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    parts = {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    empty = {"model": "m", "messages": [{"role": "user", "content": []}]}
    assert roundtrip(text) == text and roundtrip(parts) == parts and roundtrip(empty) == empty
    message = REQUEST.decode(parts).messages[0]
    assert message.WhichOneof("content") == "content_parts"


def test_stop_string_or_list() -> None:
    for stop in ("END", ["a", "b"]):
        obj = {"model": "m", "messages": [], "stop": stop}
        assert roundtrip(obj) == obj


def test_raw_json_fields_embed_json_and_keep_integers() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer", "maximum": 2**63 - 1, "minimum": -1}}}
    obj = {
        "model": "m",
        "messages": [],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": schema}}],
        "logit_bias": {"50256": -100},
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        "metadata": {"k": "v"},
        "tool_choice": "auto",
    }
    out = REQUEST.dumps(REQUEST.decode(obj))
    assert orjson.loads(out) == obj
    assert b'"maximum":9223372036854775807' in out
    message = REQUEST.decode(obj)
    assert orjson.loads(message.tools[0].function.parameters) == schema
    assert message.tool_choice == '"auto"'


def test_integers_stay_integers() -> None:
    obj = {"model": "m", "messages": [], "seed": 2**53 + 1, "n": 3, "max_tokens": 100}
    out = roundtrip(obj)
    assert out == obj and all(type(out[k]) is int for k in ("seed", "n", "max_tokens"))
    completion = {"id": "x", "created": 1700000000, "usage": {"prompt_tokens": 2**40, "total_tokens": 1}}
    assert orjson.loads(COMPLETION.dumps(COMPLETION.decode(completion))) == completion


def test_unknown_fields_are_kept_at_every_level() -> None:
    obj = {
        "model": "m",
        "future_param": {"x": [1, None, 2.5]},
        "messages": [
            {
                "role": "user",
                "cache_control": {"type": "ephemeral"},
                "content": [{"type": "text", "text": "t", "vendor": True}],
            }
        ],
        "tools": [{"type": "function", "function": {"name": "f", "x-extra": 1}, "extra": "not our map"}],
    }
    assert roundtrip(obj) == obj


def test_empty_lists_are_kept() -> None:
    obj = {"model": "m", "messages": [], "tools": [], "modalities": []}
    assert roundtrip(obj) == obj


def test_a_typed_value_wins_over_a_stale_raw_one() -> None:
    message = REQUEST.decode({"model": "m", "messages": [], "stream_options": None})
    message.stream_options.include_usage = True
    assert orjson.loads(REQUEST.dumps(message))["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize(
    ("obj", "param"),
    [
        ({"model": 5}, "model"),
        ({"messages": "hello"}, "messages"),
        ({"messages": ["hello"]}, "messages[0]"),
        ({"messages": [{"role": "user", "content": 1}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": [{"type": 1}]}]}, "messages[0].content[0].type"),
        ({"messages": [{"role": "user", "content": [{"image_url": "x"}]}]}, "messages[0].content[0].image_url"),
        ({"temperature": "hot"}, "temperature"),
        ({"n": 1.5}, "n"),
        ({"n": True}, "n"),
        ({"stream": "yes"}, "stream"),
        ({"stop": [1]}, "stop[0]"),
        ({"stop": {"a": 1}}, "stop"),
        ({"n": 2**40}, "n"),
        ({"tools": [{"function": {"strict": "no"}}]}, "tools[0].function.strict"),
    ],
)
def test_type_errors_name_the_path(obj: dict[str, Any], param: str) -> None:
    with pytest.raises(JsonMappingError) as info:
        REQUEST.decode(obj)
    assert info.value.param == param
    assert f"'{param}'" in info.value.message


@pytest.mark.parametrize("body", [b"", b"{", b"[1]", b'"text"', b"null", b"\xff\xfe"])
def test_bodies_that_are_not_objects(body: bytes) -> None:
    with pytest.raises(JsonMappingError):
        REQUEST.loads(body)


def test_tables_are_built_once() -> None:
    assert MessageCodec.for_type(chat_pb2.CreateChatCompletionRequest) is REQUEST


EMBEDDING_REQUEST = MessageCodec.for_type(chat_pb2.CreateEmbeddingRequest)
EMBEDDINGS = MessageCodec.for_type(chat_pb2.CreateEmbeddingResponse)


@pytest.mark.parametrize(
    ("value", "member"),
    [
        ("text", "input_text"),
        (["a", "b"], "input_texts"),
        ([1, 2, 2147483647], "input_tokens"),
        ([[1, 2], [3]], "input_token_lists"),
    ],
)
def test_a_oneof_with_several_array_members_picks_by_the_first_item(value: Any, member: str) -> None:
    obj = {"model": "m", "input": value}
    message = EMBEDDING_REQUEST.decode(obj)
    assert message.WhichOneof("input") == member
    assert orjson.loads(EMBEDDING_REQUEST.dumps(message)) == obj


@pytest.mark.parametrize(
    ("value", "param"),
    [
        ([1.5], "input[0]"),
        (["a", 1], "input[1]"),
        ([[1], 2], "input[1]"),
        ([[1, "x"]], "input[0][1]"),
        ([2**31], "input"),
        ({"a": 1}, "input"),
    ],
)
def test_array_members_name_the_bad_item(value: Any, param: str) -> None:
    with pytest.raises(JsonMappingError) as raised:
        EMBEDDING_REQUEST.decode({"input": value})
    assert raised.value.param == param


def test_bytes_are_base64_and_doubles_exact() -> None:
    obj = {
        "data": [
            {"object": "embedding", "index": 0, "embedding": "AACAPwAAAMA="},
            {"object": "embedding", "index": 1, "embedding": [0.1, -0.006929283495992422, 3.4028234663852886e38]},
        ]
    }
    message = EMBEDDINGS.decode(obj)
    assert message.data[0].embedding_base64 == b"\x00\x00\x80?\x00\x00\x00\xc0"  # 1.0, -2.0 as float32
    assert list(message.data[1].embedding_floats.values) == obj["data"][1]["embedding"]
    assert orjson.loads(EMBEDDINGS.dumps(message)) == obj
    with pytest.raises(JsonMappingError) as raised:
        EMBEDDINGS.decode({"data": [{"embedding": "not base64"}]})
    assert raised.value.param == "data[0].embedding"
