"""Fuzz the API with schemathesis against its own /openapi.json.

Why: the document must describe the real API (clients and code generators
trust it), and no client input may cause a 5xx. Schemathesis generates
requests from the document, valid and invalid ("positive" and "negative"
data), sends them to the app in-process and checks every response against the
document: no 5xx, only documented statuses, content types and headers, and
bodies (OpenAI's error object for every 4xx, events for streams) that match
their schemas. Statuses random data cannot reach (401, 404, 413, 503, a model
found by id) are checked against the document with hand-made cases.

``OPENAPI_MAX_EXAMPLES=500`` fuzzes longer than the default.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import schemathesis
import yaml
from flask import Flask
from openapi_spec_validator import validate
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from wsgi_llama import create_blueprint, openapi, playground

MAX_EXAMPLES = int(os.environ.get("OPENAPI_MAX_EXAMPLES", "50"))


@schemathesis.check
def openai_error(ctx: Any, response: schemathesis.Response, case: Any) -> None:
    """Every 4xx, documented or not (a 405, say), is an OpenAI error object."""
    if 400 <= response.status_code < 500:
        jsonschema.validate(response.json(), openapi.RESPONSES["Error"])


@schemathesis.check
def no_failure_events(ctx: Any, response: schemathesis.Response, case: Any) -> None:
    """A stream reports no internal failure: that is a 500 sent as an event."""
    for line in response.content.splitlines():
        if line.startswith(b'data: {"error"'):
            error = json.loads(line[len(b"data: ") :])["error"]
            assert (error["type"], error["code"]) != ("server_error", None), error


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    openai_error,
    no_failure_events,
]

ALLOWING_503 = [check for check in CHECKS if check is not not_a_server_error]


def load(*modes: GenerationMode, phases: list[str] | None = None) -> Any:
    """The document as schemathesis reads it, generating *modes* of data."""
    schema = schemathesis.openapi.from_dict(copy.deepcopy(openapi.document()))
    schema.config.generation.update(
        modes=list(modes), max_examples=MAX_EXAMPLES, database="none"
    )
    if phases is not None:
        schema.config.phases.update(phases=phases)
    return schema


# Loaded at import, not from the served document through a fixture, because
# schemathesis.pytest.from_fixture fails on pytest 9 (it reads the removed
# Item._nodeid); test_served_document_is_this_one keeps the two the same.
schema = load(*GenerationMode)
streams = load(GenerationMode.POSITIVE, phases=["fuzzing"]).include(
    path_regex="completions$"
)


@pytest.fixture(scope="module")
def fuzz_app(
    make_app: Callable[..., Flask],
    tiny_model: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Flask:
    """The tiny model, loaded for embeddings too, generating at most 4 tokens.

    A small context and few tokens make the fuzzing several times faster; one
    thread keeps llama.cpp's spinning thread pool from crawling on a busy CPU.
    """
    config = tmp_path_factory.mktemp("openapi") / "models.yaml"
    model = {"model": str(tiny_model), "n_ctx": 256, "n_threads": 1, "embedding": True}
    config.write_text(yaml.safe_dump({"models": [model]}))
    return make_app(LLAMA_MODEL=None, LLAMA_CONFIG_FILE=str(config), LLAMA_MAX_TOKENS=4)


@schema.parametrize()
def test_api_conforms(case: schemathesis.Case, fuzz_app: Flask) -> None:
    case.call_and_validate(app=fuzz_app, checks=CHECKS)


@streams.parametrize()
def test_streams_conform(case: schemathesis.Case, fuzz_app: Flask) -> None:
    """Random data seldom sets ``stream``; here it always does."""
    if isinstance(case.body, dict):
        case.body["stream"] = True
    case.call_and_validate(app=fuzz_app, checks=CHECKS)


def call(
    app: Flask, path: str, method: str = "POST", checks: list[Any] = CHECKS, **case: Any
) -> Any:
    """Send one hand-made request and check its response against the document."""
    made = schema[path][method].Case(**case)
    return made.call_and_validate(app=app, checks=checks)


COMPLETIONS, CHAT, EMBEDDINGS = (
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/embeddings",
)
HI = [{"role": "user", "content": "Hi"}]
F = {
    "name": "f",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}},
}
TOOL = {"tools": [{"type": "function", "function": F}]}
TOOL["tool_choice"] = {"type": "function", "function": {"name": "f"}}
STREAM = {"stream": True, "stream_options": {"include_usage": True}}
#: Successes random data seldom reaches, by what they show.
SUCCESSES = {
    "logprobs": (COMPLETIONS, {"prompt": "Hello", "logprobs": 2}),
    "tokens-logprobs": (COMPLETIONS, {"prompt": [1, 72, 105], "logprobs": 2}),
    "echo-logprobs": (COMPLETIONS, {"prompt": "Hi", "echo": True, "logprobs": 1}),
    "stream-logprobs-usage": (COMPLETIONS, {"prompt": "Hi", "logprobs": 1, **STREAM}),
    "chat-logprobs": (CHAT, {"messages": HI, "logprobs": True, "top_logprobs": 2}),
    "chat-stream-logprobs-usage": (CHAT, {"messages": HI, "logprobs": True, **STREAM}),
    "tool-call": (CHAT, {"messages": HI, **TOOL}),
    "tool-call-stream": (CHAT, {"messages": HI, **TOOL, "stream": True}),
    "function-call": (
        CHAT,
        {"messages": HI, "functions": [F], "function_call": {"name": "f"}},
    ),
    "embed": (EMBEDDINGS, {"input": "Hi"}),
    "embed-several": (EMBEDDINGS, {"input": ["Hi", ""]}),
}


@pytest.mark.parametrize(("path", "body"), SUCCESSES.values(), ids=SUCCESSES)
def test_successes_conform(fuzz_app: Flask, path: str, body: Any) -> None:
    response = call(fuzz_app, path, body=body)
    assert response.status_code == 200
    assert b'"error"' not in response.content
    if path == EMBEDDINGS:
        assert all(len(v["embedding"]) == 64 for v in response.json()["data"])


def test_model_conforms(fuzz_app: Flask) -> None:
    tiny = {"model_id": "tiny"}
    response = call(fuzz_app, "/v1/models/{model_id}", "GET", path_parameters=tiny)
    assert response.json()["id"] == "tiny"


#: Requests that failed with a 500, or with an error event in a 200 stream.
FOUND = {
    "no-prompt-tokens": (COMPLETIONS, {"prompt": []}),
    "echo-tokens": (COMPLETIONS, {"prompt": [72], "echo": True}),
    "no-prompt-logprobs-stream": (
        COMPLETIONS,
        {"prompt": "", "logprobs": 1, "stream": True},
    ),
    "no-prompt-echo-logprobs": (
        COMPLETIONS,
        {"prompt": "", "logprobs": 1, "echo": True, "max_tokens": 1},
    ),
    "embed-nothing": (EMBEDDINGS, {"input": []}),
    "embed-tokens": (EMBEDDINGS, {"input": [72, 105]}),
    "embed-token-lists": (EMBEDDINGS, {"input": [[72, 105]]}),
    "embed-no-tokens": (EMBEDDINGS, {"input": [[]]}),
    "function-without-parameters": (
        CHAT,
        {"messages": HI, "functions": [{"name": "f"}], "function_call": {"name": "f"}},
    ),
    # Raw text: JSON that schemathesis would not write.
    "lone-surrogate-input": ("/extras/tokenize", '{"input": "\\ud800"}'),
    "lone-surrogate-prompt": (COMPLETIONS, '{"prompt": "\\udfff"}'),
    "infinite-ping-interval": (
        COMPLETIONS,
        '{"prompt": "Hi", "stream": true, "sse_ping_interval": Infinity}',
    ),
}


@pytest.mark.parametrize(("path", "body"), FOUND.values(), ids=FOUND)
def test_found_by_fuzzing(fuzz_app: Flask, path: str, body: Any) -> None:
    if isinstance(body, dict):
        made = schema[path]["POST"].Case(body=body)
        content = made.call_and_validate(app=fuzz_app, checks=CHECKS).content
    else:  # not JSON that schemathesis would write: send the text as it is
        response = fuzz_app.test_client().post(
            path, data=body, content_type="application/json"
        )
        content = response.get_data()
        assert response.status_code < 500, content
        schema[path]["POST"].validate_response(response)
    assert b'"server_error"' not in content


@pytest.fixture(scope="module")
def two_models(
    make_app: Callable[..., Flask],
    tiny_model: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Flask:
    config = tmp_path_factory.mktemp("openapi") / "two.yaml"
    models = [{"model": str(tiny_model), "model_alias": a} for a in ("a", "b")]
    config.write_text(yaml.safe_dump({"models": models}))
    return make_app(
        LLAMA_MODEL=None,
        LLAMA_CONFIG_FILE=str(config),
        LLAMA_API_KEY="key",
        LLAMA_MAX_REQUEST_BYTES=1000,
        LLAMA_QUEUE_SIZE=0,
        LLAMA_MAX_TOKENS=2,
    )


KEY = {"Authorization": "Bearer key"}


def test_api_key(two_models: Flask) -> None:
    assert call(two_models, "/health", "GET").status_code == 200
    for path in ("/openapi.json", "/v1/models"):
        assert call(two_models, path, "GET").status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert call(two_models, path, "GET", headers=wrong).status_code == 401
        assert call(two_models, path, "GET", headers=KEY).status_code == 200
    assert call(two_models, "/extras/tokenize", body={"input": "x"}).status_code == 401


def test_errors_conform(two_models: Flask) -> None:
    unknown = {"model": "c", "input": "x"}
    for path in ("/extras/tokenize", "/v1/embeddings"):
        assert call(two_models, path, body=unknown, headers=KEY).status_code == 404
    model = {"model_id": "c"}
    assert (
        call(
            two_models,
            "/v1/models/{model_id}",
            "GET",
            path_parameters=model,
            headers=KEY,
        ).status_code
        == 404
    )
    big = {"model": "a", "input": "x" * 2000}
    response = call(two_models, "/extras/tokenize", body=big, headers=KEY)
    assert response.status_code == 413


@pytest.fixture()
def busy(two_models: Flask) -> Iterator[None]:
    """Model "a" generating for someone else, with no room in its queue."""
    model = two_models.extensions["wsgi_llama"].pool.models["a"]
    ticket = model.queue.enter("a")
    yield
    ticket.leave()


@pytest.mark.usefixtures("busy")
def test_queue_full_conforms(two_models: Flask) -> None:
    for stream in (False, True):
        body = {"model": "a", "prompt": "x", "stream": stream}
        response = call(
            two_models, "/v1/completions", checks=ALLOWING_503, body=body, headers=KEY
        )
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "queue_full"


def test_document_is_valid_openapi_3_1(client: Any) -> None:
    document = client.get("/openapi.json").get_json()
    assert document["openapi"].startswith("3.1")
    assert document["servers"] == [{"url": "/"}]
    validate(document)


def test_served_document_is_this_one(client: Any) -> None:
    assert client.get("/openapi.json").get_json() == openapi.document()


def test_mounted_document_names_its_prefix(tiny_model: Path) -> None:
    app = Flask("mounted")
    app.config.update(LLAMA_MODEL=str(tiny_model), LLAMA_N_CTX=256)
    app.register_blueprint(create_blueprint(url_prefix="/llm"))
    document = app.test_client().get("/llm/openapi.json").get_json()
    assert document["servers"] == [{"url": "/llm"}]


def test_document_lists_exactly_the_blueprint_routes(app: Flask) -> None:
    routes = {
        (re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule), method.lower())
        for rule in app.url_map.iter_rules()
        if rule.endpoint.startswith("wsgi_llama.")
        # The playground is a page for people, not part of the API.
        and rule.endpoint.removeprefix("wsgi_llama.") not in playground.ENDPOINTS
        for method in rule.methods - {"HEAD", "OPTIONS"}
    }
    documented = {
        (path, method)
        for path, item in openapi.document()["paths"].items()
        for method in item
    }
    assert routes == documented
