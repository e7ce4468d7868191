"""OpenAPI documents as JSON Schema validators: the gateway's openapi.yaml (3.0) and OpenAI's reference (3.1).

Both are turned into JSON Schema 2020-12 once: `nullable: true` (3.0, and still used in places of OpenAI's 3.1
file) becomes `anyOf [..., {"type": "null"}]`, 3.0's boolean `exclusiveMinimum`/`exclusiveMaximum` become the
numeric form, and every `#/components/...` reference is made absolute, so any sub-schema validates on its own
against one `referencing` registry.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from tests.harness import ROOT

SPEC_PATH = ROOT / "openapi.yaml"
# OpenAI's official spec lives in the workspace's shared folder beside the repository, not in the repository.
OFFICIAL_PATH = ROOT.parent / "shared" / "reference" / "openai-openapi.yaml"


def to_json_schema(node: Any, base: str) -> Any:
    if isinstance(node, list):
        return [to_json_schema(item, base) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: to_json_schema(value, base) for key, value in node.items()}
    ref = out.get("$ref")
    if isinstance(ref, str) and ref.startswith("#"):
        out["$ref"] = base + ref
    for bound, limit in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(out.get(bound), bool) and out.pop(bound) and limit in out:
            out[bound] = out.pop(limit)
    if out.pop("nullable", False) is True:
        return {"anyOf": [out, {"type": "null"}]}
    return out


@dataclass
class Schemas:
    """The component schemas of one OpenAPI document, as validators."""

    document: dict[str, Any]
    base: str

    @functools.cached_property
    def registry(self) -> Registry[Any]:
        resource = DRAFT202012.create_resource(to_json_schema(self.document, self.base))
        return Registry().with_resource(self.base, resource)  # type: ignore[call-arg, no-any-return]

    def validator(self, pointer: str) -> Draft202012Validator:
        """A validator for the schema at a JSON pointer into the document, e.g. `/components/schemas/Error`."""
        return Draft202012Validator({"$ref": f"{self.base}#{pointer}"}, registry=self.registry)

    def schema(self, name: str) -> Draft202012Validator:
        return self.validator(f"/components/schemas/{name}")

    def errors(self, name: str, instance: Any) -> list[str]:
        return [_describe(error) for error in self.schema(name).iter_errors(instance)]

    def check(self, name: str, instance: Any) -> None:
        errors = self.errors(name, instance)
        assert not errors, f"{name} rejects the instance:\n  " + "\n  ".join(errors) + f"\ninstance: {instance!r}"

    def fill_omitted(self, name: str, instance: Any) -> tuple[Any, set[str]]:
        """The instance with each required key that is absent, but whose schema admits null (or else an empty
        list), set to that value; and the paths of the keys so filled. Whatever else is wrong stays wrong."""
        filled_instance = copy.deepcopy(instance)
        filled: set[str] = set()
        validator = self.schema(name)
        for _ in range(1000):
            changed = False
            for error in _leaf_errors(validator.iter_errors(filled_instance)):
                if error.validator != "required" or not isinstance(error.instance, dict):
                    continue
                properties = error.schema.get("properties", {}) if isinstance(error.schema, dict) else {}
                for key in error.validator_value:
                    if key in error.instance or key not in properties:
                        continue
                    admits = Draft202012Validator(properties[key], registry=self.registry)
                    for empty in (None, []):
                        if admits.is_valid(empty):
                            error.instance[key] = empty
                            filled.add(_path(error.absolute_path, key))
                            changed = True
                            break
            if not changed:
                return filled_instance, filled
        raise AssertionError("fill_omitted did not settle")


def _leaf_errors(errors: Iterator[Any]) -> Iterator[Any]:
    for error in errors:
        yield error
        if error.context:
            yield from _leaf_errors(iter(error.context))


def _path(path: Any, key: str | None = None) -> str:
    parts = [*path, key] if key is not None else list(path)
    text = "$"
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text


def _describe(error: Any) -> str:
    return f"{_path(error.absolute_path)}: {error.message}"


def load_yaml(path: Path) -> dict[str, Any]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when PyYAML has it: OpenAI's file is large
    with path.open(encoding="utf-8") as file:
        document: dict[str, Any] = yaml.load(file, Loader=loader)
    return document


@functools.cache
def gateway_schemas() -> Schemas:
    return Schemas(load_yaml(SPEC_PATH), "urn:llm-gateway:openapi")


@functools.cache
def _official_schemas() -> Schemas:
    return Schemas(load_yaml(OFFICIAL_PATH), "urn:openai:openapi")


def official_schemas() -> Schemas:
    """OpenAI's reference spec; the test skips, saying why, when the workspace's shared folder is not there."""
    if not OFFICIAL_PATH.is_file():
        pytest.skip(
            f"OpenAI's reference spec is not at {OFFICIAL_PATH} (the shared/ folder beside the repository, "
            "present in the project's workspace and CI but not in a plain clone); nothing to compare against"
        )
    return _official_schemas()
