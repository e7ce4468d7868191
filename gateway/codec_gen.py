"""Source generation for `gateway.jsonpb`: one decode and one encode function per message type, built
once when the type's codec is, with every field's handling written out inline.

The generic loop (a dict lookup per key, a call per field, `setattr` with the field's name) cost
about 5 us per streamed chunk each way; the generated code tests keys in the message's field order
and assigns attributes directly, so a typical key costs a string compare, a type test and one
attribute store. What the plan does not inline (arrays of arrays, oneofs, bytes, repeated scalars)
is left to the field's decoder or encoder closure, which the generic loop uses too.

    source = decoder_source(plan, extra="extra", namespace)   # a `def decode_into(message, obj)`
"""

from __future__ import annotations

import keyword
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

# How a field's JSON value becomes a message field; "call" hands it to the field's decoder closure.
STRING, INT, NUMBER, BOOL, RAW, MESSAGE, MESSAGES, CALL = (
    "string",
    "int",
    "number",
    "bool",
    "raw",
    "message",
    "messages",
    "call",
)
_CHECKS = {
    STRING: ("type(value) is str", "a string"),
    INT: ("type(value) is int", "an integer"),
    NUMBER: ("type(value) is float or type(value) is int", "a number"),
    BOOL: ("type(value) is bool", "a boolean"),
}


@dataclass(frozen=True)
class DecodeField:
    key: str  # the JSON key, the field's (or the oneof's) name
    kind: str
    repeated: bool  # an empty JSON array for it is kept raw in the extra map, whatever the kind
    target: Any = None  # the sub-codec (MESSAGE, MESSAGES) or the decoder closure (CALL)


@dataclass(frozen=True)
class EncodeField:
    field: Any  # the FieldDescriptor that ListFields() hands back
    key: str  # "" for the extra map
    encoder: Callable[[Any], Any] | None  # None: the value goes to JSON as it is
    sub: Any = None  # a sub-codec whose `encode` is called directly (singular or repeated messages)
    repeated: bool = False


def _attr(name: str) -> str:
    """`message.<name>`, or its getattr() form for names that are not Python identifiers."""
    if name.isidentifier() and not keyword.iskeyword(name):
        return f"message.{name}"
    return f"getattr(message, {name!r})"


def _set(name: str, value: str) -> str:
    if name.isidentifier() and not keyword.iskeyword(name):
        return f"message.{name} = {value}"
    return f"setattr(message, {name!r}, {value})"


def decoder_source(fields: Sequence[DecodeField], extra: str | None, namespace: dict[str, Any]) -> str:
    """`decode_into(message, obj)`: the keys of `obj` into `message`, exactly as the generic loop does.

    Each key is tested in field order; a handled key `continue`s, and what falls through (a null, an
    unknown key, an empty array for a repeated field) goes to the extra map as raw JSON."""
    lines = ["def decode_into(message, obj):", "    extra = None", "    for key, value in obj.items():"]
    lines.append("        if value is not None:")
    if not fields:
        lines.append("            pass")
    for i, spec in enumerate(fields):
        key, kind = spec.key, spec.kind
        lines.append(f"            if key == {key!r}:")
        body: list[str] = []
        if spec.repeated:
            # An empty array falls through to the extra map; any other value is the field's.
            body.append("if type(value) is not list or value:")
            inner = "    "
        else:
            inner = ""
        if kind in _CHECKS:
            test, expected = _CHECKS[kind]
            body.append(f"{inner}if not ({test}):")
            body.append(f"{inner}    raise _type_error({key!r}, {expected!r}, value)")
            if kind == STRING:  # a string cannot be out of range
                body.append(f"{inner}{_set(key, 'value')}")
            else:
                body.append(f"{inner}try:")
                body.append(f"{inner}    {_set(key, 'value')}")
                body.append(f"{inner}except ValueError:")
                body.append(f"{inner}    raise _out_of_range(value, {key!r}) from None")
        elif kind == RAW:
            body.append(f"{inner}{_set(key, '_dumps_raw(value)')}")
        elif kind == MESSAGE:
            namespace[f"c{i}"] = spec.target
            body += [
                f"{inner}if type(value) is not dict:",
                f"{inner}    raise _type_error({key!r}, 'an object', value)",
                f"{inner}child = {_attr(key)}",
                f"{inner}child.SetInParent()",
                f"{inner}try:",
                f"{inner}    c{i}.decode_into(child, value)",
                f"{inner}except JsonMappingError as exc:",
                f"{inner}    raise exc.under({key!r}) from None",
            ]
        elif kind == MESSAGES:
            namespace[f"c{i}"] = spec.target
            body += [
                f"{inner}if type(value) is not list:",
                f"{inner}    raise _type_error({key!r}, 'an array', value)",
                f"{inner}container = {_attr(key)}",
                f"{inner}decode = c{i}.decode_into",
                f"{inner}for i, item in enumerate(value):",
                f"{inner}    if type(item) is not dict:",
                f"{inner}        raise _type_error(f'{key}[{{i}}]', 'an object', item)",
                f"{inner}    try:",
                f"{inner}        decode(container.add(), item)",
                f"{inner}    except JsonMappingError as exc:",
                f"{inner}        raise exc.under(f'{key}[{{i}}]') from None",
            ]
        else:
            namespace[f"d{i}"] = spec.target
            body.append(f"{inner}d{i}(message, value)")
        body.append(f"{inner}continue")
        lines += ["                " + line for line in body]
    # Unknown keys, and known keys whose value the typed field cannot hold, keep their JSON.
    lines.append("        if extra is None:")
    if extra is None:
        lines.append("            raise JsonMappingError('Unrecognized request argument supplied: {param}', key)")
    else:
        lines.append(f"            extra = {_attr(extra)}")
    lines.append("        extra[key] = 'null' if value is None else _dumps_raw(value)")
    return "\n".join(lines) + "\n"


def encoder_source(fields: Sequence[EncodeField], namespace: dict[str, Any]) -> str:
    """`encode(message)`: the message's set fields as a JSON-ready dict, then its extra map's keys
    that no typed field took (as orjson fragments)."""
    plain: dict[Any, str] = {}
    lines = [
        "def encode(message):",
        "    out = {}",
        "    extra = None",
        "    for field, value in message.ListFields():",
    ]
    lines.append("        key = plain.get(field)")  # most fields are scalars that go as they are: one lookup
    lines.append("        if key is not None:")
    lines.append("            out[key] = value")
    lines.append("            continue")
    first = True
    for i, spec in enumerate(fields):
        if spec.key and spec.encoder is None and spec.sub is None:
            plain[spec.field] = spec.key
            continue
        namespace[f"f{i}"] = spec.field
        lines.append(f"        {'if' if first else 'elif'} field is f{i}:")
        first = False
        if not spec.key:
            lines.append("            extra = value")
        elif spec.sub is not None:
            namespace[f"c{i}"] = spec.sub
            if spec.repeated:
                lines.append(f"            encode = c{i}.encode")
                lines.append(f"            out[{spec.key!r}] = [encode(item) for item in value]")
            else:
                lines.append(f"            out[{spec.key!r}] = c{i}.encode(value)")
        else:
            namespace[f"e{i}"] = spec.encoder
            lines.append(f"            out[{spec.key!r}] = e{i}(value)")
    namespace["plain"] = plain
    lines += [
        "    if extra:",
        # Keys, then lookups: the map's items() view is Python code, its iteration and [] are C.
        "        for key in extra:",
        # A typed value wins over a stale raw one (the service may have set the field).
        "            if key not in out:",
        "                out[key] = _fragment(extra[key])",
        "    return out",
    ]
    return "\n".join(lines) + "\n"


def compile_function(source: str, name: str, namespace: dict[str, Any], filename: str) -> Callable[..., Any]:
    """The function `name` defined by `source`, with `namespace` as its globals."""
    exec(compile(source, filename, "exec"), namespace)  # our own generated source
    function: Callable[..., Any] = namespace[name]
    return function


@dataclass(frozen=True)
class CanonField:
    key: str
    kind: str  # STRING, INT, BOOL, RAW as they are; NUMBER as a float; MESSAGE(S) by `sub`; CALL not at all
    repeated: bool
    sub: Any = None


def canon_source(fields: Sequence[CanonField], namespace: dict[str, Any]) -> str:
    """`canon(obj)`: the JSON-ready dict that `encode(decode(obj))` gives, built from the decoded
    document itself (already checked by the decoder), or None where that takes the message.

    `fields` come in ListFields() order (field numbers); the keys the extra map took follow in that
    map's iteration order, which `extra_order` knows."""
    lines = ["def canon(obj):", "    out = {}", "    get = obj.get"]
    for i, spec in enumerate(fields):
        key, kind = spec.key, spec.kind
        lines.append(f"    value = get({key!r})")
        if kind == CALL:
            # Arrays of arrays, oneofs, bytes, repeated scalars, floats: left to encode().
            test = "type(value) is not list or value" if spec.repeated else "True"
            lines += ["    if value is not None:", f"        if {test}:", "            return None"]
            continue
        if spec.repeated:  # an empty array is the extra map's
            lines.append("    if value:")
        else:
            lines.append("    if value is not None:")
        if kind in (STRING, INT, BOOL, RAW):
            lines.append(f"        out[{key!r}] = value")
        elif kind == NUMBER:
            lines.append(f"        out[{key!r}] = float(value)")  # a double field reads back as a float
        elif kind == MESSAGE:
            namespace[f"c{i}"] = spec.sub
            lines += [
                f"        value = c{i}.canon(value)",
                "        if value is None:",
                "            return None",
                f"        out[{key!r}] = value",
            ]
        else:
            namespace[f"c{i}"] = spec.sub
            lines += [
                f"        canon = c{i}.canon",
                "        items = []",
                "        for item in value:",
                "            item = canon(item)",
                "            if item is None:",
                "                return None",
                "            items.append(item)",
                f"        out[{key!r}] = items",
            ]
    lines += [
        "    if len(out) < len(obj):  # nulls, unknown keys, empty arrays: the extra map's",
        "        keys = []",  # a loop, not a comprehension: no function object per call on 3.11
        "        for key in obj:",
        "            if key not in out:",
        "                keys.append(key)",
        "        if len(keys) == 1:",
        "            key = keys[0]",
        "            out[key] = obj[key]",
        "        else:",
        "            for key in extra_order(tuple(keys)):",
        "                out[key] = obj[key]",
        "    return out",
    ]
    return "\n".join(lines) + "\n"
