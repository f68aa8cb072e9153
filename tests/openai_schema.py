"""Validate JSON against OpenAI's published OpenAPI schemas (test helper).

Why: wsgi-llama claims to be OpenAI-compatible, so tests check our responses
against ``#/components/schemas/<Name>`` of OpenAI's own API description rather
than against hand-written expectations.

The document is OpenAPI 3.1 but still carries OpenAPI-3.0 ``nullable: true``
keywords, which JSON Schema 2020-12 ignores (so ``{"type": "string",
"nullable": true}`` would wrongly reject ``null``), and a few 3.0-style boolean
``exclusiveMinimum``.  We rewrite those once (on load), then
validate with ``Draft202012Validator``.  ``discriminator``, ``x-*`` and other
unknown keywords are ignored by jsonschema, which is what we want.

Document: ``tests/data/openai-schemas.json``, the schemas the tests use (and
all they reference), extracted from OpenAI's document by
``tests/data/extract_openai_schemas.py``, which records the version.  Set
``$OPENAI_OPENAPI_JSON`` to validate against a whole document instead.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import jsonschema
from jsonschema.exceptions import best_match
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

__all__ = ["has_property", "property_accepts", "validate"]

_URI = "urn:openai-openapi"
# Keywords whose value is one subschema / a list of them / a name -> subschema map.
_ONE = {"items", "additionalProperties", "not", "if", "then", "else", "contains"}
_ONE |= {"propertyNames", "unevaluatedItems", "unevaluatedProperties"}
_LIST = {"allOf", "anyOf", "oneOf", "prefixItems"}
_MAP = {"properties", "patternProperties", "$defs", "dependentSchemas"}
# If any of these sit beside `type`, adding "null" to `type` is not enough.
_COMPOSITE = {"$ref", "allOf", "anyOf", "oneOf", "not", "const", "if"}
_ANNOTATIONS = {"nullable", "description", "title", "default", "example", "deprecated"}


def _document_path() -> Path:
    env = os.environ.get("OPENAI_OPENAPI_JSON")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent / "data" / "openai-schemas.json"


def _is_bare_nullable(schema: Any) -> bool:
    """``{"nullable": true}`` alone, as in ``allOf: [{$ref: X}, {nullable: true}]``."""
    return (
        isinstance(schema, dict)
        and schema.get("nullable") is True
        and schema.keys() <= _ANNOTATIONS
    )


def _fix(schema: Any) -> Any:
    """Copy of ``schema`` with 3.0 ``nullable``/``exclusiveMinimum`` made 2020-12."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    members = out.get("allOf")
    if isinstance(members, list) and any(map(_is_bare_nullable, members)):
        # The 3.0 idiom "X or null": lift nullability out of the allOf.
        out["allOf"] = [m for m in members if not _is_bare_nullable(m)]
        out["nullable"] = True
    for key, value in out.items():
        if key in _ONE:
            out[key] = _fix(value)
        elif key in _LIST and isinstance(value, list):
            out[key] = [_fix(v) for v in value]
        elif key in _MAP and isinstance(value, dict):
            out[key] = {name: _fix(v) for name, v in value.items()}
    for bound, flag in (
        ("minimum", "exclusiveMinimum"),
        ("maximum", "exclusiveMaximum"),
    ):
        # OpenAPI 3.0 style: a boolean flag on the bound, not the bound itself.
        if isinstance(out.get(flag), bool) and out.pop(flag) and bound in out:
            out[flag] = out.pop(bound)
    if out.pop("nullable", None) is not True:
        return out
    kind = out.get("type")
    if kind is None or _COMPOSITE & out.keys():
        return {"anyOf": [{"type": "null"}, out]}
    kinds = [kind] if isinstance(kind, str) else list(kind)
    out["type"] = kinds if "null" in kinds else [*kinds, "null"]
    if isinstance(out.get("enum"), list) and None not in out["enum"]:
        out["enum"] = [*out["enum"], None]
    return out


@functools.cache
def _schemas() -> dict[str, Any]:
    """Load and rewrite ``components.schemas`` once (a whole document: 3.4 MB)."""
    path = _document_path()
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; set OPENAI_OPENAPI_JSON")
    raw = json.loads(path.read_text(encoding="utf-8"))["components"]["schemas"]
    return {name: _fix(schema) for name, schema in raw.items()}


@functools.cache
def _registry() -> Registry[Any]:
    root = {"components": {"schemas": _schemas()}}
    return Registry().with_resource(
        _URI, Resource(contents=root, specification=DRAFT202012)
    )


@functools.cache
def _validator(schema_name: str) -> jsonschema.Draft202012Validator:
    if schema_name not in _schemas():
        raise KeyError(f"no schema #/components/schemas/{schema_name}")
    # Formats here: unixtime/int64/double/float/binary (unknown: ignored), date
    # (checked, stdlib) and uri (checked only if rfc3987 is installed).
    return jsonschema.Draft202012Validator(
        {"$ref": f"{_URI}#/components/schemas/{schema_name}"},
        registry=_registry(),
        format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER,
    )


def validate(instance: object, schema_name: str) -> None:
    """Raise ``jsonschema.ValidationError`` unless ``instance`` conforms to
    ``#/components/schemas/<schema_name>``; the message names the JSON path."""
    error = best_match(_validator(schema_name).iter_errors(instance))
    if error is None:
        return
    # A fresh error keeps str() short (no dump of a huge subschema); the
    # original, with full detail, stays available as __cause__.
    raise jsonschema.ValidationError(
        f"{schema_name} at {error.json_path}: {error.message}",
        path=error.path,
        schema_path=error.schema_path,
        context=error.context,
    ) from error


def _property_pointer(schema_name: str, prop: str) -> str | None:
    """JSON pointer to *prop* of a schema, looking through ``allOf`` and ``$ref``."""

    def search(pointer: str, schema: Any) -> str | None:
        if not isinstance(schema, dict):
            return None
        if prop in schema.get("properties", {}):
            return f"{pointer}/properties/{prop}"
        ref = schema.get("$ref", "")
        if ref.startswith("#/components/schemas/"):
            name = ref.rsplit("/", 1)[1]
            return search(f"/components/schemas/{name}", _schemas()[name])
        for i, member in enumerate(schema.get("allOf", [])):
            found = search(f"{pointer}/allOf/{i}", member)
            if found is not None:
                return found
        return None

    return search(f"/components/schemas/{schema_name}", _schemas()[schema_name])


def has_property(schema_name: str, prop: str) -> bool:
    return _property_pointer(schema_name, prop) is not None


def property_accepts(schema_name: str, prop: str, value: object) -> bool:
    """Whether OpenAI's schema allows *value* as *prop* of *schema_name*."""
    pointer = _property_pointer(schema_name, prop)
    if pointer is None:
        raise KeyError(f"{schema_name} has no property {prop!r}")
    return _pointer_validator(pointer).is_valid(value)


@functools.cache
def _pointer_validator(pointer: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(
        {"$ref": f"{_URI}#{pointer}"}, registry=_registry()
    )
