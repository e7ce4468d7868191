"""The generated decode and encode functions (gateway/codec_gen.py) against the generic table-driven
loop they replace: the same messages, the same errors, the same JSON bytes, for every message type
of the API and documents with every kind of value in every field (a seeded random walk)."""

from __future__ import annotations

import contextlib
import importlib
import pkgutil
import random
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

import llm_gateway.v1
from gateway.jsonpb import INTEGER_TYPES, JsonMappingError, MessageCodec


def _all_types() -> list[type[Message]]:
    types = []
    for module in pkgutil.iter_modules(llm_gateway.v1.__path__):
        if module.name.endswith("_pb2"):
            pb2 = importlib.import_module(f"llm_gateway.v1.{module.name}")
            types += [message_factory.GetMessageClass(d) for d in pb2.DESCRIPTOR.message_types_by_name.values()]
    return types


TYPES = _all_types()
CODECS = [MessageCodec.for_type(t) for t in TYPES]


@contextlib.contextmanager
def generic() -> Iterator[None]:
    """Every codec on its generic loop (the reference), for the duration."""
    saved = {codec: (codec.decode_into, codec.encode) for codec in MessageCodec._cache.values()}
    for codec in saved:
        codec.decode_into, codec.encode = codec.decode_into_generic, codec.encode_generic
    try:
        yield
    finally:
        for codec, (decode, encode) in saved.items():
            codec.decode_into, codec.encode = decode, encode


_ODD_VALUES: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    2**31,
    2**63 - 1,
    -(2**63),
    1.5,
    "",
    "x",
    "aGk=",
    [],
    [1],
    ["a"],
    [[1]],
    {},
    {"a": 1},
]


def _scalar(field: FieldDescriptor, rng: random.Random) -> Any:
    if field.type in INTEGER_TYPES:
        return rng.choice([0, 7, -3, 2**40])
    if field.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return rng.choice([0.5, 2, 1e10])
    if field.type == FieldDescriptor.TYPE_BOOL:
        return rng.choice([True, False])
    if field.type == FieldDescriptor.TYPE_BYTES:
        return rng.choice(["aGVsbG8=", "", "not base64!"])
    return rng.choice(["text", "", "é ☃"])


def _value(field: FieldDescriptor, rng: random.Random, depth: int) -> Any:
    if rng.random() < 0.15:
        return rng.choice(_ODD_VALUES)
    if field.message_type is not None:
        item: Any = _document(field.message_type, rng, depth + 1) if depth < 4 else {}
        if field.message_type.fields and len(field.message_type.fields) == 1 and rng.random() < 0.5:
            item = [_scalar(field.message_type.fields[0], rng) for _ in range(rng.randint(0, 2))]
    else:
        item = _scalar(field, rng)
    if field.is_repeated:
        return [item for _ in range(rng.randint(0, 3))]
    return item


def _document(descriptor: Descriptor, rng: random.Random, depth: int = 0) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    fields = list(descriptor.fields)
    rng.shuffle(fields)
    for field in fields:
        if rng.random() < 0.5:
            key = (
                field.containing_oneof.name if field.containing_oneof is not None and rng.random() < 0.7 else field.name
            )
            doc[key] = _value(field, rng, depth)
    if rng.random() < 0.2:
        doc[rng.choice(["unknown", "x_extra", "provider"])] = rng.choice(_ODD_VALUES)
    return doc


def _decode(codec: MessageCodec[Any], doc: dict[str, Any]) -> tuple[str, Any]:
    try:
        message = codec.decode(doc)
    except JsonMappingError as exc:
        return "error", (exc.message, exc.param)
    except Exception as exc:  # what neither handles (a JSON object for a map field) fails alike
        return "raised", (type(exc).__name__, str(exc))
    return "message", (message.SerializeToString(deterministic=True), codec.dumps(message))


@pytest.mark.parametrize("codec", CODECS, ids=lambda codec: codec.descriptor.name)
def test_generated_matches_generic(codec: MessageCodec[Any]) -> None:
    rng = random.Random(codec.descriptor.full_name)
    for _ in range(300):
        doc = _document(codec.descriptor, rng)
        generated = _decode(codec, doc)
        with generic():
            reference = _decode(codec, doc)
        assert generated == reference, orjson.dumps(doc)


@pytest.mark.parametrize("codec", CODECS, ids=lambda codec: codec.descriptor.name)
def test_generated_encode_matches_generic_on_set_messages(codec: MessageCodec[Any]) -> None:
    """Messages the service builds (typed fields over raw extras included) encode alike."""
    rng = random.Random("encode" + codec.descriptor.full_name)
    for _ in range(100):
        doc = _document(codec.descriptor, rng)
        try:
            message = codec.decode(doc)
        except Exception:
            continue
        if "extra" in codec.descriptor.fields_by_name:
            for field in codec.descriptor.fields:
                if field.name != "extra" and field.message_type is None and rng.random() < 0.3:
                    message.extra[field.name] = "123"  # a stale raw value a typed one must win over
        generated = codec.dumps(message)
        with generic():
            assert codec.dumps(message) == generated


def test_a_message_without_fields() -> None:
    codec = next(c for c in CODECS if not c.descriptor.fields)
    assert codec.dumps(codec.decode({})) == b"{}"


@pytest.mark.parametrize("codec", CODECS, ids=lambda codec: codec.descriptor.name)
def test_canon_is_the_decoded_message_encoded(codec: MessageCodec[Any]) -> None:
    """Where canon() answers, its JSON is the bytes encode() gives for the decoded message."""
    rng = random.Random("canon" + codec.descriptor.full_name)
    answered = 0
    for _ in range(300):
        doc = _document(codec.descriptor, rng)
        try:
            message = codec.decode(doc)
        except Exception:
            continue
        out = codec.canon(doc)
        if out is not None:
            answered += 1
            assert orjson.dumps(out) == orjson.dumps(codec.encode(message)), orjson.dumps(doc)
    assert answered or not codec.descriptor.fields or codec.descriptor.oneofs


def test_a_kept_document_is_dumped_as_the_message_is() -> None:
    chunk = next(c for c in CODECS if c.descriptor.name == "ChatCompletionChunk")
    doc = {
        "id": "c1",
        "service_tier": "default",  # before system_fingerprint, as OpenAI sends it; the message orders them
        "system_fingerprint": "fp",
        "choices": [{"index": 0, "delta": {"content": "hi"}, "logprobs": None, "finish_reason": None, "z": 1}],
        "usage": None,
        "obfuscation": "abc",
    }
    chunk.dumps(chunk.decode(doc))  # the first dumps() of the type turns keeping on
    for change in (None, "clear-usage", "content", "extra"):
        message = chunk.decode_kept(doc)
        if change == "clear-usage":
            del message.extra["usage"]
        elif change == "content":
            message.choices[0].delta.content = "ho"
        elif change == "extra":
            message.choices[0].extra["z"] = "2"
        expected = orjson.dumps(chunk.encode(message))
        assert chunk.dumps(message) == expected
        assert chunk.dumps(message) == expected  # no longer kept: encoded
