"""The OpenAPI 3.1 document served at ``/openapi.json``.

Why: clients, code generators and the schemathesis fuzz tests read it, so it
must say what the server really does. Request bodies are generated from the
pydantic models that validate them (:mod:`.schemas`), so the two cannot
drift; responses are written out here after what :mod:`.api` and
:mod:`.responses` send, which are OpenAI's shapes.
"""

from __future__ import annotations

import functools
from importlib import metadata
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from . import schemas

Schema = dict[str, Any]

_STR: Schema = {"type": "string"}
_INT: Schema = {"type": "integer"}
_NUM: Schema = {"type": "number"}


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _null(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


def _list(items: Schema) -> Schema:
    return {"type": "array", "items": items}


def _obj(required: str = "", **properties: Schema) -> Schema:
    """An object with *properties*, of which the space-separated *required*."""
    schema: Schema = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required.split()
    return schema


def _sse(chunk: str) -> Schema:
    """One Server-Sent Event: a *chunk*, an error, or the final ``[DONE]``."""
    json_data = {
        "type": "string",
        "contentMediaType": "application/json",
        "contentSchema": {"anyOf": [_ref(chunk), _ref("Error")]},
    }
    return _obj(
        "data",
        event={"const": "message"},
        data={"anyOf": [{"const": "[DONE]"}, json_data]},
    )


_USAGE = _obj(
    "prompt_tokens completion_tokens total_tokens",
    prompt_tokens=_INT,
    completion_tokens=_INT,
    total_tokens=_INT,
)
_TOP = _list(
    _obj("token logprob bytes", token=_STR, logprob=_NUM, bytes=_null(_list(_INT)))
)
_TOOL_CALL = _obj(
    "id type function",
    id=_STR,
    type={"const": "function"},
    function=_obj("name arguments", name=_STR, arguments=_STR),
)
_ANSWER = {"type": "string", "enum": ["stop", "length", "tool_calls", "function_call"]}
_CHOICE_BASE = {"index": _INT, "logprobs": _null(_ref("ChatLogprobs"))}

#: Response bodies, by component name.
RESPONSES: dict[str, Schema] = {
    "Error": _obj(
        "error",
        error=_obj(
            "message type param code",
            message=_STR,
            type=_STR,
            param=_null(_STR),
            code=_null(_STR),
        ),
    ),
    "Health": _obj("status", status={"const": "ok"}),
    "Document": _obj("openapi info paths", openapi=_STR, info={"type": "object"}),
    "Model": _obj(
        "id object created owned_by",
        id=_STR,
        object={"const": "model"},
        created=_INT,
        owned_by=_STR,
    ),
    "ModelList": _obj(
        "object data", object={"const": "list"}, data=_list(_ref("Model"))
    ),
    "Usage": _USAGE,
    "CompletionLogprobs": _obj(
        "tokens text_offset token_logprobs top_logprobs",
        tokens=_list(_STR),
        text_offset=_list(_INT),
        token_logprobs=_list(_null(_NUM)),
        top_logprobs=_list(_null({"type": "object", "additionalProperties": _NUM})),
    ),
    "Completion": _obj(
        "id object created model choices usage",
        id=_STR,
        object={"const": "text_completion"},
        created=_INT,
        model=_STR,
        choices=_list(
            _obj(
                "text index logprobs finish_reason",
                text=_STR,
                index=_INT,
                logprobs=_null(_ref("CompletionLogprobs")),
                finish_reason={"enum": ["stop", "length"]},
            )
        ),
        usage=_ref("Usage"),
    ),
    "CompletionChunk": _obj(
        "id object created model choices",
        id=_STR,
        object={"const": "text_completion"},
        created=_INT,
        model=_STR,
        choices=_list(
            _obj(
                "text index logprobs finish_reason",
                text=_STR,
                index=_INT,
                logprobs=_null(_ref("CompletionLogprobs")),
                finish_reason={"enum": ["stop", "length", None]},
            )
        ),
        usage=_null(_ref("Usage")),
    ),
    "ChatLogprobs": _obj(
        "content",
        content=_null(
            _list(
                _obj(
                    "token logprob bytes top_logprobs",
                    token=_STR,
                    logprob=_NUM,
                    bytes=_null(_list(_INT)),
                    top_logprobs=_TOP,
                )
            )
        ),
        refusal=_null(_list({"type": "object"})),
    ),
    "ChatCompletion": _obj(
        "id object created model choices usage",
        id=_STR,
        object={"const": "chat.completion"},
        created=_INT,
        model=_STR,
        choices=_list(
            _obj(
                "index message logprobs finish_reason",
                **_CHOICE_BASE,
                message=_obj(
                    "role content refusal",
                    role={"const": "assistant"},
                    content=_null(_STR),
                    refusal={"type": "null"},
                    tool_calls=_list(_TOOL_CALL),
                    function_call=_obj("name arguments", name=_STR, arguments=_STR),
                ),
                finish_reason=_ANSWER,
            )
        ),
        usage=_ref("Usage"),
    ),
    "ChatCompletionChunk": _obj(
        "id object created model choices",
        id=_STR,
        object={"const": "chat.completion.chunk"},
        created=_INT,
        model=_STR,
        choices=_list(
            _obj(
                "index delta logprobs finish_reason",
                **_CHOICE_BASE,
                delta=_obj(
                    role={"const": "assistant"},
                    content=_null(_STR),
                    tool_calls=_list({"type": "object"}),
                    function_call={"type": "object"},
                ),
                finish_reason=_null(_ANSWER),
            )
        ),
        usage=_null(_ref("Usage")),
    ),
    "Embeddings": _obj(
        "object data model usage",
        object={"const": "list"},
        data=_list(
            _obj(
                "object embedding index",
                object={"const": "embedding"},
                embedding=_list(_NUM),
                index=_INT,
            )
        ),
        model=_STR,
        usage=_obj("prompt_tokens total_tokens", prompt_tokens=_INT, total_tokens=_INT),
    ),
    "Tokens": _obj("tokens", tokens=_list(_INT)),
    "Count": _obj("count", count=_INT),
    "Text": _obj("text", text=_STR),
    "CompletionEvent": _sse("CompletionChunk"),
    "ChatCompletionEvent": _sse("ChatCompletionChunk"),
}

_ERRORS: dict[int, tuple[str, dict[str, str]]] = {
    400: (
        "Invalid request: the body is not a JSON object, a field is invalid, a "
        "token id is outside the vocabulary or the prompt exceeds the context.",
        {},
    ),
    401: (
        "No or a wrong API key (only when the server has API keys).",
        {"WWW-Authenticate": "Always 'Bearer'."},
    ),
    404: ("No such model.", {}),
    413: ("The body is larger than the server's LLAMA_MAX_REQUEST_BYTES.", {}),
    503: (
        "The model's queue is full, or the wait for it timed out.",
        {"Retry-After": "Seconds to wait before retrying."},
    ),
}

# path, method, operationId, summary, request model, 200 body, streams, errors
_Route = tuple[str, str, str, str, type[BaseModel] | None, str, bool, tuple[int, ...]]
_ROUTES: tuple[_Route, ...] = (
    ("/health", "get", "health", "Liveness", None, "Health", False, ()),
    (
        "/openapi.json",
        "get",
        "openapi",
        "This document",
        None,
        "Document",
        False,
        (401,),
    ),
    (
        "/v1/models",
        "get",
        "listModels",
        "The models served",
        None,
        "ModelList",
        False,
        (401,),
    ),
    (
        "/v1/models/{model_id}",
        "get",
        "retrieveModel",
        "One model",
        None,
        "Model",
        False,
        (401, 404),
    ),
    (
        "/v1/completions",
        "post",
        "createCompletion",
        "Complete a prompt",
        schemas.CompletionRequest,
        "Completion",
        True,
        (400, 401, 404, 413, 503),
    ),
    (
        "/v1/chat/completions",
        "post",
        "createChatCompletion",
        "Answer a chat",
        schemas.ChatCompletionRequest,
        "ChatCompletion",
        True,
        (400, 401, 404, 413, 503),
    ),
    (
        "/v1/embeddings",
        "post",
        "createEmbedding",
        "Embed text",
        schemas.EmbeddingRequest,
        "Embeddings",
        False,
        (400, 401, 404, 413, 503),
    ),
    (
        "/extras/tokenize",
        "post",
        "tokenize",
        "Text to token ids",
        schemas.TokenizeRequest,
        "Tokens",
        False,
        (400, 401, 404, 413),
    ),
    (
        "/extras/tokenize/count",
        "post",
        "countTokens",
        "Count a text's tokens",
        schemas.TokenizeRequest,
        "Count",
        False,
        (400, 401, 404, 413),
    ),
    (
        "/extras/detokenize",
        "post",
        "detokenize",
        "Token ids to text",
        schemas.DetokenizeRequest,
        "Text",
        False,
        (400, 401, 404, 413),
    ),
)


def _untitled(schema: Any) -> Any:
    """*schema* without pydantic's generated ``title`` annotations."""
    if isinstance(schema, dict):
        return {
            k: _untitled(v)
            for k, v in schema.items()
            if not (k == "title" and isinstance(v, str))
        }
    if isinstance(schema, list):
        return [_untitled(v) for v in schema]
    return schema


def _requests() -> Schema:
    models = {route[4] for route in _ROUTES if route[4] is not None}
    _, top = models_json_schema(
        [(m, "validation") for m in sorted(models, key=lambda m: m.__name__)],
        ref_template="#/components/schemas/{model}",
    )
    return _untitled(top["$defs"])


def _operation(route: _Route) -> Schema:
    path, method, operation_id, summary, request, body, streams, errors = route
    content: Schema = {"application/json": {"schema": _ref(body)}}
    if streams:
        content["text/event-stream"] = {
            "schema": _ref(f"{body}Event"),
        }
    ok = "OK." + (
        " With `stream: true`, Server-Sent Events: chunks, then "
        "`[DONE]`; `: ping` comments keep the connection alive, and "
        "an error after the start comes as an `{error}` event."
        if streams
        else ""
    )
    responses: Schema = {"200": {"description": ok, "content": content}}
    for status in errors:
        description, headers = _ERRORS[status]
        responses[str(status)] = {
            "description": description,
            "content": {"application/json": {"schema": _ref("Error")}},
            **(
                {
                    "headers": {
                        name: {"description": text, "required": True, "schema": _STR}
                        for name, text in headers.items()
                    }
                }
                if headers
                else {}
            ),
        }
    operation: Schema = {
        "operationId": operation_id,
        "summary": summary,
        "responses": responses,
    }
    if request is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _ref(request.__name__)}},
        }
    if path == "/health":
        operation["security"] = []
    if "{model_id}" in path:
        operation["parameters"] = [
            {
                "name": "model_id",
                "in": "path",
                "required": True,
                "description": "A model's id, as /v1/models lists it.",
                "schema": {"type": "string", "minLength": 1},
            }
        ]
    return operation


def _version() -> str:
    try:
        return metadata.version("wsgi-llama")
    except metadata.PackageNotFoundError:
        return "0"


@functools.cache
def document(server_url: str = "") -> dict[str, Any]:
    """The OpenAPI 3.1 document of the API mounted at *server_url* (built once)."""
    requests = _requests()
    clash = requests.keys() & RESPONSES.keys()
    assert not clash, f"component names used twice: {clash}"
    paths: Schema = {}
    for route in _ROUTES:
        paths.setdefault(route[0], {})[route[1]] = _operation(route)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "wsgi-llama",
            "version": _version(),
            "description": "An OpenAI-compatible llama.cpp server. Unknown "
            "request fields are ignored; errors are OpenAI's `{error}` objects.",
        },
        "servers": [{"url": server_url or "/"}],
        "security": [{}, {"bearer": []}],
        "paths": paths,
        "components": {
            "schemas": {**requests, **RESPONSES},
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "`Authorization: Bearer <key>`. Optional: "
                    "needed only when the server is given API keys "
                    "(LLAMA_API_KEY); /health never needs one.",
                }
            },
        },
    }
