"""The OpenAPI 3.1 document served at ``/openapi.json``.

Why: clients, code generators and the schemathesis tests read it, so it must
say what the server really does. Request bodies are generated from the
pydantic models that validate them (:mod:`.schemas`), so the two cannot
drift; responses are written out here after what :mod:`.api` and
:mod:`.responses` send, which are OpenAI's shapes.
"""

from __future__ import annotations

import functools
from importlib import metadata
from typing import Any, NamedTuple

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


def _array(items: Schema) -> Schema:
    return {"type": "array", "items": items}


def _obj(required: str = "", **properties: Schema) -> Schema:
    """An object with *properties*; *required* names some, space-separated."""
    schema: Schema = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required.split()
    return schema


def _event(chunk: str) -> Schema:
    """A Server-Sent Event: JSON of a *chunk* or an error, or ``[DONE]``."""
    json_text = {
        **_STR,
        "contentMediaType": "application/json",
        "contentSchema": {"anyOf": [_ref(chunk), _ref("Error")]},
    }
    return _obj("data", data={"anyOf": [{"const": "[DONE]"}, json_text]})


def _result(object_: str, choice: Schema, *, chunk: bool = False) -> Schema:
    """A completion or chat completion, or a streamed chunk of one."""
    return _obj(
        "id object created model choices" + ("" if chunk else " usage"),
        id=_STR,
        object={"const": object_},
        created=_INT,
        model=_STR,
        choices=_array(choice),
        usage=_null(_ref("Usage")) if chunk else _ref("Usage"),  # chunk: if asked
    )


def _token_logprob(*, top: bool) -> Schema:
    fields = {"token": _STR, "logprob": _NUM, "bytes": _null(_array(_INT))}
    if top:
        fields["top_logprobs"] = _array(_token_logprob(top=False))
    return _obj(" ".join(fields), **fields)


def _text_choice(finish_reason: Schema) -> Schema:
    return _obj(
        "text index logprobs finish_reason",
        text=_STR,
        index=_INT,
        logprobs=_null(_ref("CompletionLogprobs")),
        finish_reason=finish_reason,
    )


_FINISH = ["stop", "length", "tool_calls", "function_call"]
_CHAT_CHOICE = {"index": _INT, "logprobs": _null(_ref("ChatLogprobs"))}
_TOOL_CALL = _obj(
    "id type function",
    id=_STR,
    type={"const": "function"},
    function=_obj("name arguments", name=_STR, arguments=_STR),
)

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
    "Document": _obj("openapi info paths", openapi=_STR),
    "Metrics": {
        "type": "string",
        "description": "Prometheus' text exposition format (OpenMetrics when "
        "the Accept header asks for it).",
    },
    "Model": _obj(
        "id object created owned_by",
        id=_STR,
        object={"const": "model"},
        created=_INT,
        owned_by=_STR,
    ),
    "ModelList": _obj(
        "object data", object={"const": "list"}, data=_array(_ref("Model"))
    ),
    "Usage": _obj(
        "prompt_tokens completion_tokens total_tokens",
        prompt_tokens=_INT,
        completion_tokens=_INT,
        total_tokens=_INT,
    ),
    "CompletionLogprobs": _obj(
        "tokens text_offset token_logprobs top_logprobs",
        tokens=_array(_STR),
        text_offset=_array(_INT),
        token_logprobs=_array(_null(_NUM)),
        top_logprobs=_array(_null({"type": "object", "additionalProperties": _NUM})),
    ),
    "ChatLogprobs": _obj(
        "content",
        content=_null(_array(_token_logprob(top=True))),
        refusal=_null(_array(_token_logprob(top=True))),
    ),
    "Completion": _result(
        "text_completion", _text_choice({"enum": ["stop", "length"]})
    ),
    "CompletionChunk": _result(
        "text_completion", _text_choice({"enum": ["stop", "length", None]}), chunk=True
    ),
    "ChatCompletion": _result(
        "chat.completion",
        _obj(
            "index message logprobs finish_reason",
            **_CHAT_CHOICE,
            message=_obj(
                "role content refusal",
                role={"const": "assistant"},
                content=_null(_STR),
                refusal={"type": "null"},
                tool_calls=_array(_TOOL_CALL),
                function_call=_obj("name arguments", name=_STR, arguments=_STR),
            ),
            finish_reason={"enum": _FINISH},
        ),
    ),
    "ChatCompletionChunk": _result(
        "chat.completion.chunk",
        _obj(
            "index delta logprobs finish_reason",
            **_CHAT_CHOICE,
            delta=_obj(
                role={"const": "assistant"},
                content=_null(_STR),
                tool_calls=_array({"type": "object"}),
                function_call={"type": "object"},
            ),
            finish_reason={"enum": [*_FINISH, None]},
        ),
        chunk=True,
    ),
    "Embeddings": _obj(
        "object data model usage",
        object={"const": "list"},
        data=_array(
            _obj(
                "object embedding index",
                object={"const": "embedding"},
                # base64 of little-endian float32 with encoding_format "base64"
                embedding={"anyOf": [_array(_NUM), _STR]},
                index=_INT,
            )
        ),
        model=_STR,
        usage=_obj("prompt_tokens total_tokens", prompt_tokens=_INT, total_tokens=_INT),
    ),
    "Tokens": _obj("tokens", tokens=_array(_INT)),
    "Count": _obj("count", count=_INT),
    "Text": _obj("text", text=_STR),
    "CompletionEvent": _event("CompletionChunk"),
    "ChatCompletionEvent": _event("ChatCompletionChunk"),
}

#: Error statuses: what they mean, and the headers they always carry.
_ERRORS: dict[int, tuple[str, dict[str, str]]] = {
    400: (
        "Invalid request: the body is not a JSON object, a field is invalid, a "
        "token id is outside the vocabulary or the prompt exceeds the context.",
        {},
    ),
    401: (
        "The API key is missing or wrong (only when the server has keys).",
        {"WWW-Authenticate": "`Bearer`."},
    ),
    404: ("No such model.", {}),
    413: ("The body is larger than the server accepts.", {}),
    503: (
        "The model's queue is full, or the wait in it timed out.",
        {"Retry-After": "Seconds to wait before retrying."},
    ),
}
_AUTH = (401,)
_BODY = (400, 401, 404, 413)  # a body naming a model (404: with several models)
_QUEUED = (*_BODY, 503)


class _Route(NamedTuple):
    path: str
    method: str
    operation_id: str
    summary: str
    ok: str  # the 200 body's component
    errors: tuple[int, ...] = ()
    body: type[BaseModel] | None = None
    streams: bool = False
    media: str = "application/json"


_ROUTES = (
    _Route("/health", "get", "health", "Liveness (no API key needed)", "Health"),
    _Route("/openapi.json", "get", "openapi", "This document", "Document", _AUTH),
    _Route(
        "/metrics",
        "get",
        "metrics",
        "Prometheus metrics (an API key unless LLAMA_METRICS_AUTH=0)",
        "Metrics",
        _AUTH,
        media="text/plain",
    ),
    _Route("/v1/models", "get", "listModels", "The models served", "ModelList", _AUTH),
    _Route(
        "/v1/models/{model_id}", "get", "retrieveModel", "A model", "Model", (401, 404)
    ),
    _Route(
        "/v1/completions",
        "post",
        "createCompletion",
        "Continue a prompt",
        "Completion",
        _QUEUED,
        schemas.CompletionRequest,
        streams=True,
    ),
    _Route(
        "/v1/chat/completions",
        "post",
        "createChatCompletion",
        "Answer a conversation",
        "ChatCompletion",
        _QUEUED,
        schemas.ChatCompletionRequest,
        streams=True,
    ),
    _Route(
        "/v1/embeddings",
        "post",
        "createEmbedding",
        "Embed texts",
        "Embeddings",
        _QUEUED,
        schemas.EmbeddingRequest,
    ),
    _Route(
        "/extras/tokenize",
        "post",
        "tokenize",
        "A text's token ids",
        "Tokens",
        _BODY,
        schemas.TokenizeRequest,
    ),
    _Route(
        "/extras/tokenize/count",
        "post",
        "countTokens",
        "How many tokens a text has",
        "Count",
        _BODY,
        schemas.TokenizeRequest,
    ),
    _Route(
        "/extras/detokenize",
        "post",
        "detokenize",
        "The text of token ids",
        "Text",
        _BODY,
        schemas.DetokenizeRequest,
    ),
)

_STREAMING = (
    "With `stream: true`, Server-Sent Events instead: chunks, then `[DONE]`. "
    "`: ping` comments keep the connection alive; an error once the stream has "
    "begun is sent as an event holding an error object."
)


def _untitled(schema: Any) -> Any:
    """*schema* without the ``title`` annotations pydantic generates."""
    if isinstance(schema, dict):
        return {
            key: _untitled(value)
            for key, value in schema.items()
            if not (key == "title" and isinstance(value, str))
        }
    if isinstance(schema, list):
        return [_untitled(value) for value in schema]
    return schema


def _request_schemas() -> dict[str, Schema]:
    """The request models' JSON Schemas, as pydantic validates them."""
    models = sorted({r.body for r in _ROUTES if r.body}, key=lambda m: m.__name__)
    _, top = models_json_schema(
        [(model, "validation") for model in models],
        ref_template="#/components/schemas/{model}",
    )
    return _untitled(top["$defs"])


def _error_response(status: int) -> Schema:
    description, headers = _ERRORS[status]
    response: Schema = {
        "description": description,
        "content": {"application/json": {"schema": _ref("Error")}},
    }
    if headers:
        response["headers"] = {
            name: {"description": text, "required": True, "schema": _STR}
            for name, text in headers.items()
        }
    return response


def _operation(route: _Route) -> Schema:
    content = {route.media: {"schema": _ref(route.ok)}}
    if route.streams:
        content["text/event-stream"] = {"schema": _ref(f"{route.ok}Event")}
    ok = {"description": _STREAMING if route.streams else "OK", "content": content}
    spec: Schema = {
        "operationId": route.operation_id,
        "summary": route.summary,
        "responses": {"200": ok, **{str(s): _error_response(s) for s in route.errors}},
    }
    if route.body is not None:
        schema = _ref(route.body.__name__)
        spec["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": schema}},
        }
    if 401 not in route.errors:
        spec["security"] = []  # no API key needed
    if "{model_id}" in route.path:
        spec["parameters"] = [
            {
                "name": "model_id",
                "in": "path",
                "required": True,
                "description": "A model's id, as /v1/models lists it.",
                "schema": {"type": "string", "minLength": 1},
            }
        ]
    return spec


def _version() -> str:
    try:
        return metadata.version("wsgi-llama")
    except metadata.PackageNotFoundError:
        return "0"


@functools.cache
def document(server_url: str = "") -> dict[str, Any]:
    """The OpenAPI document of the API mounted at *server_url* (built once each).

    Treat the result as read-only: it is shared between calls.
    """
    components = _request_schemas()
    clash = components.keys() & RESPONSES.keys()
    assert not clash, f"component names used twice: {clash}"
    paths: Schema = {}
    for route in _ROUTES:
        paths.setdefault(route.path, {})[route.method] = _operation(route)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "wsgi-llama",
            "version": _version(),
            "description": "An OpenAI-compatible llama.cpp server. Requests may "
            "carry fields not listed here; they are ignored. Every error is an "
            "OpenAI error object.",
        },
        "servers": [{"url": server_url or "/"}],
        "security": [{}, {"bearer": []}],
        "paths": paths,
        "components": {
            "schemas": {**components, **RESPONSES},
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
