"""Show that tests/openai_schema.validate accepts real OpenAI-shaped responses
and rejects realistic mistakes, naming the JSON path of the failure."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import openai_schema
import pytest
from openai_schema import validate

Json = dict[str, Any]

COMPLETION: Json = {
    "id": "cmpl-1",
    "object": "text_completion",
    "created": 1700000000,
    "model": "gemma-3-270m",
    "system_fingerprint": "fp_1",
    "choices": [
        {"index": 0, "text": "Hello", "logprobs": None, "finish_reason": "length"}
    ],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
}
CHAT: Json = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1700000000,
    "model": "gemma-3-270m",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hi!", "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
}
CHUNK: Json = {
    "id": "chatcmpl-1",
    "object": "chat.completion.chunk",
    "created": 1700000000,
    "model": "gemma-3-270m",
    "choices": [
        {
            "index": 0,
            "delta": {"role": "assistant", "content": "x"},
            "logprobs": None,
            "finish_reason": None,
        }
    ],
    "usage": None,  # `$ref` + `nullable` sibling in the document
}
MODELS: Json = {
    "object": "list",
    "data": [{"id": "gemma-3-270m", "object": "model", "created": 0, "owned_by": "me"}],
}
EMBEDDINGS: Json = {
    "object": "list",
    "model": "gemma-3-270m",
    "data": [{"object": "embedding", "index": 0, "embedding": [0.1, -0.2, 3]}],
    "usage": {"prompt_tokens": 2, "total_tokens": 2},
}
ERROR: Json = {
    "error": {
        "message": "model 'x' not found",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }
}

VALID = [
    (COMPLETION, "CreateCompletionResponse"),
    (CHAT, "CreateChatCompletionResponse"),
    (CHUNK, "CreateChatCompletionStreamResponse"),
    (MODELS, "ListModelsResponse"),
    (EMBEDDINGS, "CreateEmbeddingResponse"),
    (ERROR, "ErrorResponse"),
]


@pytest.mark.parametrize(("instance", "name"), VALID, ids=[n for _, n in VALID])
def test_valid(instance: Json, name: str) -> None:
    validate(instance, name)


def _without(doc: Json, *path: str | int) -> Json:
    """Copy of ``doc`` with the key at ``path`` removed."""
    out = copy.deepcopy(doc)
    node: Any = out
    for step in path[:-1]:
        node = node[step]
    del node[path[-1]]
    return out


def _with(doc: Json, value: object, *path: str | int) -> Json:
    """Copy of ``doc`` with ``value`` set at ``path``."""
    out = copy.deepcopy(doc)
    node: Any = out
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value
    return out


# (instance, schema, expected substring of the error message)
INVALID = [
    (_without(COMPLETION, "created"), "CreateCompletionResponse", "'created' is a re"),
    (
        _with(COMPLETION, "eos", "choices", 0, "finish_reason"),
        "CreateCompletionResponse",
        "$.choices[0].finish_reason: 'eos' is not one of",
    ),
    (  # logprobs may be null but must be present
        _without(COMPLETION, "choices", 0, "logprobs"),
        "CreateCompletionResponse",
        "$.choices[0]: 'logprobs' is a required property",
    ),
    (
        _without(CHAT, "choices", 0, "message", "refusal"),
        "CreateChatCompletionResponse",
        "$.choices[0].message: 'refusal' is a required property",
    ),
    (  # only stream chunks may have finish_reason null
        _with(CHAT, None, "choices", 0, "finish_reason"),
        "CreateChatCompletionResponse",
        "$.choices[0].finish_reason: None is not of type 'string'",
    ),
    (
        _with(CHAT, "chat.completion.chunk", "object"),
        "CreateChatCompletionResponse",
        "$.object: 'chat.completion.chunk' is not one of ['chat.completion']",
    ),
    (  # finish_reason may be null but must be present
        _without(CHUNK, "choices", 0, "finish_reason"),
        "CreateChatCompletionStreamResponse",
        "$.choices[0]: 'finish_reason' is a required property",
    ),
    (
        _with(CHUNK, "model", "choices", 0, "delta", "role"),
        "CreateChatCompletionStreamResponse",
        "$.choices[0].delta.role: 'model' is not one of",
    ),
    (
        _with(CHUNK, "1700000000", "created"),
        "CreateChatCompletionStreamResponse",
        "$.created: '1700000000' is not of type 'integer'",
    ),
    (
        _without(MODELS, "data", 0, "owned_by"),
        "ListModelsResponse",
        "$.data[0]: 'owned_by' is a required property",
    ),
    (
        _with(MODELS, "models", "object"),
        "ListModelsResponse",
        "$.object: 'models' is not one of ['list']",
    ),
    (_without(EMBEDDINGS, "usage"), "CreateEmbeddingResponse", "'usage' is a requ"),
    (
        _with(EMBEDDINGS, ["0.1"], "data", 0, "embedding"),
        "CreateEmbeddingResponse",
        "$.data[0].embedding[0]: '0.1' is not of type 'number'",
    ),
    (
        _without(ERROR, "error", "code"),
        "ErrorResponse",
        "$.error: 'code' is a required property",
    ),
    (
        {"error": "model not found"},
        "ErrorResponse",
        "$.error: 'model not found' is not of type 'object'",
    ),
]


@pytest.mark.parametrize(("instance", "name", "expected"), INVALID)
def test_invalid(instance: Json, name: str, expected: str) -> None:
    with pytest.raises(jsonschema.ValidationError) as caught:
        validate(instance, name)
    assert expected in str(caught.value)


@pytest.mark.parametrize(
    ("instance", "name"),
    [
        (None, "StopConfiguration"),  # nullable oneOf without `type`
        ("\n", "StopConfiguration"),
        (None, "ChatCompletionStreamOptions"),  # already 3.1-style anyOf null
        ({"role": "assistant", "content": None}, "ChatCompletionResponseMessage"),
    ],
)
def test_nullable_translation(instance: object, name: str) -> None:
    if name == "ChatCompletionResponseMessage":  # content null ok, refusal required
        with pytest.raises(jsonschema.ValidationError, match="'refusal' is a req"):
            validate(instance, name)
    else:
        validate(instance, name)


def test_fix_handles_openapi30_idioms() -> None:
    fix = openai_schema._fix
    assert fix({"type": "string", "enum": ["a"], "nullable": True}) == {
        "type": ["string", "null"],
        "enum": ["a", None],
    }
    ref = {"$ref": "#/components/schemas/X"}
    assert fix({**ref, "nullable": True}) == {"anyOf": [{"type": "null"}, ref]}
    assert fix({"allOf": [ref, {"nullable": True}]}) == {
        "anyOf": [{"type": "null"}, {"allOf": [ref]}]
    }
    assert fix({"type": "number", "minimum": 0, "exclusiveMinimum": True}) == {
        "type": "number",
        "exclusiveMinimum": 0,
    }
    # property *names* are not keywords
    props = {"properties": {"nullable": {"type": "boolean"}}}
    assert fix(props) == props


def test_unknown_schema_name() -> None:
    with pytest.raises(KeyError):
        validate({}, "NoSuchSchema")


def test_document_path_env_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_OPENAPI_JSON", "/elsewhere/openapi.json")
    assert openai_schema._document_path() == Path("/elsewhere/openapi.json")
    monkeypatch.delenv("OPENAI_OPENAPI_JSON")
    default = openai_schema._document_path()
    assert default == Path(__file__).parent / "data" / "openai-schemas.json"
    assert default.is_file()  # inside the repository: a plain clone has it


def test_vendored_schemas_are_complete_and_attributed() -> None:
    """Every ``$ref`` resolves inside the extract, and it says where it came from."""
    document = json.loads(openai_schema._document_path().read_text("utf-8"))
    names = document["components"]["schemas"].keys()
    refs = set(re.findall(r'"#/components/schemas/([^"]+)"', json.dumps(document)))
    assert refs <= names, sorted(refs - names)
    origin = document["x-extract"]
    assert origin["source"].startswith("https://github.com/openai/openai-openapi")
    assert origin["version"] and origin["extracted"]
    assert "Permission is hereby granted" in origin["licence"]
    assert set(origin["roots"]) <= names


def test_extract_follows_refs_transitively() -> None:
    from data.extract_openai_schemas import extract

    ref = "#/components/schemas/"
    schemas = {
        "Root": {"properties": {"a": {"$ref": ref + "A"}}},
        "A": {"anyOf": [{"$ref": ref + "B"}, {"type": "null"}]},
        "B": {"items": {"$ref": ref + "A"}},  # a cycle
        "Unused": {"type": "string"},
    }
    document = {"info": {"version": "9"}, "components": {"schemas": schemas}}
    out = extract(document, ("Root",))
    assert sorted(out["components"]["schemas"]) == ["A", "B", "Root"]
    assert out["x-extract"]["version"] == "9"
