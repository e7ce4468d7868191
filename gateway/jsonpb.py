"""Descriptor-driven JSON <-> protobuf codec, faithful to OpenAI's JSON.

`json_format` is slow (pure Python, ~0.4 ms for a 2 KB request) and lossy (ints become floats in
Struct, int64 becomes a string, nulls and unknown keys vanish). This codec follows the rules in
proto/README.md instead, and builds one table per message type the first time it meets the type,
so a request costs a dict lookup and a setattr per key.

    codec = MessageCodec.for_type(chat_pb2.CreateChatCompletionRequest)
    request = codec.loads(body)          # bytes -> message, raises JsonMappingError
    body = codec.dumps(request)          # message -> bytes
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from typing import Any, ClassVar, Generic, TypeVar

import orjson
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, OneofDescriptor
from google.protobuf.message import Message

from llm_gateway.v1 import chat_pb2

from . import codec_gen

M = TypeVar("M", bound=Message)

_RAW_JSON = chat_pb2.raw_json
_EXTRA_JSON = chat_pb2.extra_json
_JSON_VARIANT = chat_pb2.json_variant
_JSON_ARRAY = chat_pb2.json_array

_NULL = "null"
_KEPT = 1024  # documents kept for dumps(); a REST call dumps its own within one batch of being decoded
_ORDERS = 1024  # sequences of extra keys whose map order is kept
_EMPTY_LIST = "[]"

Decoder = Callable[[Message, Any], None]
Encoder = Callable[[Any], Any]


class JsonMappingError(ValueError):
    """A JSON value that does not fit the message; `param` is the path to it, like `messages[0].role`."""

    def __init__(self, template: str, param: str) -> None:
        self.template = template
        self.param = param
        self.message = template.format(param=param)
        super().__init__(self.message)

    def under(self, prefix: str) -> JsonMappingError:
        if not self.param:
            return JsonMappingError(self.template, prefix)
        sep = "" if self.param.startswith("[") else "."
        return JsonMappingError(self.template, f"{prefix}{sep}{self.param}")


def _type_error(key: str, expected: str, value: Any) -> JsonMappingError:
    got = "null" if value is None else type(value).__name__
    got = {
        "str": "a string",
        "dict": "an object",
        "list": "an array",
        "bool": "a boolean",
        "int": "an integer",
        "float": "a number",
    }.get(got, got)
    return JsonMappingError(f"Invalid type for '{{param}}': expected {expected}, but got {got}.", key)


def _out_of_range(value: Any, key: str) -> JsonMappingError:
    return JsonMappingError(f"Invalid value for '{{param}}': {value} is out of range.", key)


def _dumps_raw(value: Any) -> str:
    return orjson.dumps(value).decode()


class MessageCodec(Generic[M]):
    # Keyed by the descriptor itself: two pools may define messages of the same full name.
    _cache: ClassVar[dict[Descriptor, MessageCodec[Any]]] = {}

    @classmethod
    def for_type(cls, message_type: type[M]) -> MessageCodec[M]:
        return cls._for_descriptor(message_type.DESCRIPTOR, message_type)  # type: ignore[arg-type]

    @classmethod
    def _for_descriptor(cls, descriptor: Descriptor, message_type: type[Message]) -> MessageCodec[Any]:
        codec = cls._cache.get(descriptor)
        if codec is None:
            codec = cls(descriptor, message_type)
            cls._cache[descriptor] = codec
            codec._build()  # after caching, so recursive message types find themselves
        return codec

    def __init__(self, descriptor: Descriptor, message_type: type[Message]) -> None:
        self.descriptor = descriptor
        self.message_type = message_type
        self._decoders: dict[str, Decoder] = {}
        # Keyed by the field descriptor ListFields() hands back (hashed by identity, cheaper than its
        # name); None for values that go to JSON as they are.
        self._encoders: dict[FieldDescriptor, tuple[str, Encoder | None]] = {}
        self._repeated: frozenset[str] = frozenset()
        self._extra: str | None = None
        # The generated functions (gateway/codec_gen.py), set by _build().
        self.decode_into: Decoder = self.decode_into_generic
        self.encode: Callable[[Message], dict[str, Any]] = self.encode_generic
        self.canon: Callable[[dict[str, Any]], dict[str, Any] | None] = lambda obj: None
        # The extra map's iteration order for each sequence of keys inserted into a fresh one.
        self._orders: dict[tuple[str, ...], tuple[str, ...]] = {}
        # Messages from decode_kept() by id: (message, its wire form then, the document). None until
        # this process first dumps the type, so a process that never writes it as JSON keeps nothing.
        self._kept: dict[int, tuple[Message, bytes, dict[str, Any]]] | None = None

    # ------------------------------------------------------------------ public

    def loads(self, data: bytes | str) -> M:
        try:
            value = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise JsonMappingError(f"We could not parse the JSON body of your request: {exc}.", "") from None
        if not isinstance(value, dict):
            raise JsonMappingError(
                "The request body must be a JSON object, but got "
                + _type_error("", "", value).message.split("got ")[1],
                "",
            )
        return self.decode(value)

    def decode(self, obj: dict[str, Any]) -> M:
        message = self.message_type()
        self.decode_into(message, obj)
        return message  # type: ignore[return-value]

    def decode_kept(self, obj: dict[str, Any]) -> M:
        """decode(), for a document the caller hands over and never changes: if the message is then
        dumped unchanged, its JSON is made from the document, not read back field by field."""
        message = self.message_type()
        self.decode_into(message, obj)
        kept = self._kept
        if kept is not None:
            kept[id(message)] = (message, message.SerializeToString(), obj)  # the entry holds it: ids stay unique
            if len(kept) > _KEPT:  # messages never dumped (a gRPC call's, a dropped chunk) age out
                del kept[next(iter(kept))]
        return message  # type: ignore[return-value]

    def decode_into_generic(self, message: Message, obj: dict[str, Any]) -> None:
        """What the generated `decode_into` does, one table lookup and call per key: the reference
        the tests hold the generated code to."""
        decoders = self._decoders
        extra = None  # the message's extra map, looked up once it is needed (chunks carry 2-3 nulls each)
        for key, value in obj.items():
            decoder = decoders.get(key)
            if decoder is None or value is None or (type(value) is list and not value and key in self._repeated):
                # Unknown keys, and known keys whose value the typed field cannot hold, keep their JSON.
                if extra is None:
                    if self._extra is None:
                        raise JsonMappingError("Unrecognized request argument supplied: {param}", key)
                    extra = getattr(message, self._extra)
                extra[key] = _NULL if value is None else _dumps_raw(value)
            else:
                decoder(message, value)

    def encode_generic(self, message: Message) -> dict[str, Any]:
        """What the generated `encode` does, by table: the reference for the tests."""
        out: dict[str, Any] = {}
        encoders = self._encoders
        extra = None
        for field, value in message.ListFields():
            key, encoder = encoders[field]
            if not key:
                extra = value
            elif encoder is None:
                out[key] = value
            else:
                out[key] = encoder(value)
        if extra:
            # Keys, then lookups: the map's items() view is Python code, its iteration and [] are C.
            for key in extra:
                # A typed value wins over a stale raw one (the service may have set the field).
                if key not in out:
                    out[key] = orjson.Fragment(extra[key])
        return out

    def dumps(self, message: Message) -> bytes:
        kept = self._kept
        if kept is None:
            self._kept = {}  # this process writes the type as JSON: decode_kept() keeps documents from now on
        else:
            entry = kept.pop(id(message), None)
            # The same wire form is the same message: the document's JSON is the message's.
            if entry is not None and entry[0] is message and entry[1] == message.SerializeToString():
                out = self.canon(entry[2])
                if out is not None:
                    return orjson.dumps(out)
        return orjson.dumps(self.encode(message))

    def _extra_order(self, keys: tuple[str, ...]) -> tuple[str, ...]:
        """The order the extra map iterates `keys` in, inserted in this order into a fresh map (as
        decode_into does); it depends on the keys and that order alone, so it is learnt once."""
        order = self._orders.get(keys)
        if order is None:
            if len(keys) < 2 or self._extra is None:
                return keys
            extra = getattr(self.message_type(), self._extra)
            for key in keys:
                extra[key] = _NULL
            order = tuple(extra)
            if len(self._orders) < _ORDERS:
                self._orders[keys] = order
        return order

    # ------------------------------------------------------------------ tables

    def _build(self) -> None:
        repeated: set[str] = set()
        variants: set[str] = set()
        for oneof in self.descriptor.oneofs:
            if _option(oneof.GetOptions(), _JSON_VARIANT):
                variants.add(oneof.name)
                if any(member.message_type is not None for member in oneof.fields):
                    repeated.add(oneof.name)  # an empty array for it is kept raw, like any empty list
                self._decoders[oneof.name] = self._variant_decoder(oneof)
                for member in oneof.fields:
                    self._encoders[member] = (oneof.name, self._variant_encoder(member))
        for field in self.descriptor.fields:
            if _option(field.GetOptions(), _EXTRA_JSON):
                self._extra = field.name
                self._encoders[field] = ("", None)
                continue
            container = field.containing_oneof
            if container is not None and container.name in variants:
                continue
            if _is_repeated(field):
                repeated.add(field.name)
            self._decoders[field.name] = self._field_decoder(field)
            self._encoders[field] = (field.name, self._field_encoder(field))
        self._repeated = frozenset(repeated)
        self._compile(variants)

    def _compile(self, variants: set[str]) -> None:
        """The generated decode_into and encode (gateway/codec_gen.py), from the tables just built."""
        plan: list[codec_gen.DecodeField] = []
        for field in self.descriptor.fields:
            container = field.containing_oneof
            key = container.name if container is not None and container.name in variants else field.name
            if key not in self._decoders or any(spec.key == key for spec in plan):
                continue
            kind, target = self._decode_kind(field) if key == field.name else (codec_gen.CALL, None)
            target = self._decoders[key] if target is None else target
            plan.append(codec_gen.DecodeField(key, kind, key in self._repeated, target))
        where = f"<jsonpb {self.descriptor.full_name}>"
        namespace = dict(_GENERATED_GLOBALS)
        source = codec_gen.decoder_source(plan, self._extra, namespace)
        self.decode_into = codec_gen.compile_function(source, "decode_into", namespace, where)
        fields: list[codec_gen.EncodeField] = []
        for field, (key, encoder) in self._encoders.items():
            sub, repeated = None, False
            container = field.containing_oneof
            in_variant = container is not None and container.name in variants
            message_type = field.message_type
            inline = message_type is not None and not _option(message_type.GetOptions(), _JSON_ARRAY)
            if key and not in_variant and inline and message_type is not None:
                sub = MessageCodec._for_descriptor(message_type, _message_class(field))
                repeated = _is_repeated(field)
            fields.append(codec_gen.EncodeField(field, key, encoder, sub, repeated))
        namespace = dict(_GENERATED_GLOBALS)
        source = codec_gen.encoder_source(fields, namespace)
        self.encode = codec_gen.compile_function(source, "encode", namespace, where)
        by_name = self.descriptor.fields_by_name
        canon: list[codec_gen.CanonField] = []
        for spec in sorted(plan, key=lambda spec: by_name[spec.key].number if spec.key in by_name else 0):
            typed = by_name.get(spec.key)
            # Left to encode(): a oneof, a float field (it reads back rounded to 32 bits), and a field
            # without presence (its zero value is not listed).
            plain = typed is not None and typed.type != FieldDescriptor.TYPE_FLOAT
            plain = plain and typed is not None and (typed.has_presence or _is_repeated(typed))
            kind = spec.kind if plain else codec_gen.CALL
            canon.append(codec_gen.CanonField(spec.key, kind, spec.repeated, spec.target))
        namespace = dict(_GENERATED_GLOBALS, extra_order=self._extra_order)
        source = codec_gen.canon_source(canon, namespace)
        self.canon = codec_gen.compile_function(source, "canon", namespace, where)

    def _decode_kind(self, field: FieldDescriptor) -> tuple[str, Any]:
        """How the generated decoder handles a field: inline (with its sub-codec), or by its closure (None)."""
        if field.message_type is not None:
            if _option(field.message_type.GetOptions(), _JSON_ARRAY):
                return codec_gen.CALL, None
            sub = MessageCodec._for_descriptor(field.message_type, _message_class(field))
            return (codec_gen.MESSAGES if _is_repeated(field) else codec_gen.MESSAGE), sub
        if _option(field.GetOptions(), _RAW_JSON):
            return codec_gen.RAW, None
        if _is_repeated(field) or field.type == FieldDescriptor.TYPE_BYTES:
            return codec_gen.CALL, None
        if field.type == FieldDescriptor.TYPE_STRING:
            return codec_gen.STRING, None
        kind = _INLINE_KINDS.get(_SCALAR_CHECKS[field.type][0])
        return (codec_gen.CALL, None) if kind is None else (kind, None)

    def _field_decoder(self, field: FieldDescriptor) -> Decoder:
        name = field.name
        if field.message_type is not None:
            sub = MessageCodec._for_descriptor(field.message_type, _message_class(field))
            if _option(field.message_type.GetOptions(), _JSON_ARRAY):
                return _array_decoder(name, sub, _is_repeated(field))
            if _is_repeated(field):

                def decode_messages(message: Message, value: Any) -> None:
                    if type(value) is not list:
                        raise _type_error(name, "an array", value)
                    container = getattr(message, name)
                    for i, item in enumerate(value):
                        if type(item) is not dict:
                            raise _type_error(f"{name}[{i}]", "an object", item)
                        try:
                            sub.decode_into(container.add(), item)
                        except JsonMappingError as exc:
                            raise exc.under(f"{name}[{i}]") from None

                return decode_messages

            def decode_message(message: Message, value: Any) -> None:
                if type(value) is not dict:
                    raise _type_error(name, "an object", value)
                child = getattr(message, name)
                child.SetInParent()
                try:
                    sub.decode_into(child, value)
                except JsonMappingError as exc:
                    raise exc.under(name) from None

            return decode_message

        if _option(field.GetOptions(), _RAW_JSON):

            def decode_raw(message: Message, value: Any) -> None:
                setattr(message, name, _dumps_raw(value))

            return decode_raw

        check, expected = _SCALAR_CHECKS[field.type]
        if _is_repeated(field):

            def decode_scalars(message: Message, value: Any) -> None:
                if type(value) is not list:
                    raise _type_error(name, f"an array of {expected}", value)
                for i, item in enumerate(value):
                    if not check(item):
                        raise _type_error(f"{name}[{i}]", expected, item)
                try:
                    getattr(message, name).extend(value)
                except ValueError:
                    raise JsonMappingError("Invalid value in '{param}': a number is out of range.", name) from None

            return decode_scalars

        if field.type == FieldDescriptor.TYPE_BYTES:

            def decode_bytes(message: Message, value: Any) -> None:
                setattr(message, name, _base64(value, name))

            return decode_bytes

        if field.type == FieldDescriptor.TYPE_STRING:  # the common case, and one that cannot overflow

            def decode_string(message: Message, value: Any) -> None:
                if type(value) is not str:
                    raise _type_error(name, expected, value)
                setattr(message, name, value)

            return decode_string

        def decode_scalar(message: Message, value: Any) -> None:
            if not check(value):
                raise _type_error(name, expected, value)
            try:
                setattr(message, name, value)
            except ValueError:
                raise _out_of_range(value, name) from None

        return decode_scalar

    def _field_encoder(self, field: FieldDescriptor) -> Encoder | None:
        if field.message_type is not None:
            sub = MessageCodec._for_descriptor(field.message_type, _message_class(field))
            if _option(field.message_type.GetOptions(), _JSON_ARRAY):
                (inner,) = field.message_type.fields
                inner_name = inner.name
                if _is_repeated(field):
                    return lambda value: [sub.encode(item).get(inner_name, []) for item in value]
                return lambda value: sub.encode(value).get(inner_name, [])
            if _is_repeated(field):
                return lambda value: [sub.encode(item) for item in value]
            return sub.encode
        if _option(field.GetOptions(), _RAW_JSON):
            return orjson.Fragment
        if field.type == FieldDescriptor.TYPE_BYTES:
            return _base64_text if not _is_repeated(field) else lambda value: [_base64_text(v) for v in value]
        if _is_repeated(field):
            return list
        return None

    def _variant_decoder(self, oneof: OneofDescriptor) -> Decoder:
        key = oneof.name
        text_field = raw_field = None
        text_is_bytes = False
        # Array members: (member, its one repeated field, codec) by the JSON type of the array's items.
        lists: dict[type, tuple[str, str, MessageCodec[Any]]] = {}
        for member in oneof.fields:
            if member.message_type is not None:
                (inner,) = member.message_type.fields
                codec = MessageCodec._for_descriptor(member.message_type, _message_class(member))
                for kind in _item_kinds(inner):
                    lists.setdefault(kind, (member.name, inner.name, codec))
            elif _option(member.GetOptions(), _RAW_JSON):
                raw_field = member.name
            else:
                text_field = member.name
                text_is_bytes = member.type == FieldDescriptor.TYPE_BYTES
        expected = " or ".join(
            kind
            for kind, present in (("a string", text_field), ("an array", lists), ("an object", raw_field))
            if present
        )
        # One array member takes any array: its own decoder names a wrong item. Several are told apart
        # by the first item (a string, an integer, an array, ...).
        only = next(iter(lists.values())) if len({m for m, _, _ in lists.values()}) == 1 else None
        item_kinds = " or ".join(sorted({_KIND_NAMES[kind] for kind in lists}))

        def decode_variant(message: Message, value: Any) -> None:
            kind = type(value)
            if kind is str and text_field:
                setattr(message, text_field, _base64(value, key) if text_is_bytes else value)
            elif kind is list and lists:
                chosen = only or lists.get(type(value[0]))
                if chosen is None:
                    raise _type_error(f"{key}[0]", item_kinds, value[0])
                list_field, list_item, list_codec = chosen
                try:
                    list_codec.decode_into(getattr(message, list_field), {list_item: value})
                except JsonMappingError as exc:
                    raise JsonMappingError(exc.template, key + exc.param[len(list_item) :]) from None
                getattr(message, list_field).SetInParent()
            elif raw_field and kind is not str and kind is not list:
                setattr(message, raw_field, _dumps_raw(value))
            else:
                raise _type_error(key, expected, value)

        return decode_variant

    def _variant_encoder(self, member: FieldDescriptor) -> Encoder | None:
        if member.message_type is not None:
            (inner,) = member.message_type.fields
            sub = MessageCodec._for_descriptor(member.message_type, _message_class(member))
            inner_name = inner.name

            def encode_list(value: Message) -> Any:
                return sub.encode(value).get(inner_name, [])

            return encode_list
        if _option(member.GetOptions(), _RAW_JSON):
            return orjson.Fragment
        if member.type == FieldDescriptor.TYPE_BYTES:
            return _base64_text
        return None


def _array_decoder(name: str, sub: MessageCodec[Any], repeated: bool) -> Decoder:
    """A field of a json_array message type: the message (or each one) is a JSON array."""
    (inner,) = sub.descriptor.fields
    item = inner.name

    def decode_one(child: Message, value: Any, path: str) -> None:
        if type(value) is not list:
            raise _type_error(path, "an array", value)
        try:
            sub.decode_into(child, {item: value})
        except JsonMappingError as exc:
            raise JsonMappingError(exc.template, path + exc.param[len(item) :]) from None

    if not repeated:

        def decode_array(message: Message, value: Any) -> None:
            child = getattr(message, name)
            child.SetInParent()
            decode_one(child, value, name)

        return decode_array

    def decode_arrays(message: Message, value: Any) -> None:
        if type(value) is not list:
            raise _type_error(name, "an array of arrays", value)
        container = getattr(message, name)
        for i, array in enumerate(value):
            decode_one(container.add(), array, f"{name}[{i}]")

    return decode_arrays


def _base64(value: Any, key: str) -> bytes:
    if type(value) is not str:
        raise _type_error(key, "a base64 string", value)
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise JsonMappingError("Invalid value for '{param}': not a base64 string.", key) from None


def _base64_text(value: bytes) -> str:
    """Standard base64 with padding, as OpenAI writes it (proto3 JSON's form of bytes, too)."""
    return base64.b64encode(value).decode("ascii")


def _item_kinds(field: FieldDescriptor) -> tuple[type, ...]:
    """The JSON types (as orjson decodes them) of the items of an array held by this repeated field."""
    if field.message_type is not None:
        return (list,) if _option(field.message_type.GetOptions(), _JSON_ARRAY) else (dict,)
    if field.type in INTEGER_TYPES:
        return (int,)
    if field.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return (float, int)
    if field.type == FieldDescriptor.TYPE_BOOL:
        return (bool,)
    return (str,)


_KIND_NAMES = {
    list: "an array",
    dict: "an object",
    int: "an integer",
    float: "a number",
    bool: "a boolean",
    str: "a string",
}


def _is_repeated(field: FieldDescriptor) -> bool:
    return bool(field.is_repeated)


def _message_class(field: FieldDescriptor) -> type[Message]:
    assert field.message_type is not None
    return message_factory.GetMessageClass(field.message_type)


def _option(options: Any, extension: Any) -> bool:
    return bool(options.Extensions[extension])


def _is_int(value: Any) -> bool:
    return type(value) is int


def _is_number(value: Any) -> bool:
    return type(value) is float or type(value) is int


def _is_str(value: Any) -> bool:
    return type(value) is str


def _is_bool(value: Any) -> bool:
    return type(value) is bool


INTEGER_TYPES = (
    FieldDescriptor.TYPE_INT32,
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT32,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT32,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED32,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED32,
    FieldDescriptor.TYPE_SFIXED64,
)
_SCALAR_CHECKS: dict[int, tuple[Callable[[Any], bool], str]] = {
    **{t: (_is_int, "an integer") for t in INTEGER_TYPES},
    FieldDescriptor.TYPE_DOUBLE: (_is_number, "a number"),
    FieldDescriptor.TYPE_FLOAT: (_is_number, "a number"),
    FieldDescriptor.TYPE_STRING: (_is_str, "a string"),
    FieldDescriptor.TYPE_BOOL: (_is_bool, "a boolean"),
    FieldDescriptor.TYPE_BYTES: (_is_str, "a base64 string"),
}

_INLINE_KINDS: dict[Callable[[Any], bool], str] = {
    _is_int: codec_gen.INT,
    _is_number: codec_gen.NUMBER,
    _is_bool: codec_gen.BOOL,
}
# What the generated functions refer to by name.
_GENERATED_GLOBALS: dict[str, Any] = {
    "_type_error": _type_error,
    "JsonMappingError": JsonMappingError,
    "_dumps_raw": _dumps_raw,
    "_out_of_range": _out_of_range,
    "_fragment": orjson.Fragment,
}
