"""Hostile requests: each ends in a clean 4xx or a correct 200.

Never a 5xx, never a hang, never a dead server. A 4xx carries OpenAI's error
shape, ``{"error": {"message", "type", "param", "code"}}``, and, when one
field is at fault, names it in ``param``. A 200 is the route's real answer
(checked against OpenAI's schemas), and a stream must not turn into a
``server_error`` event after its status line.

Requests go in-process through the Flask test client (in a thread, so that a
hang fails the test instead of stalling the run), and a selection goes to
live gunicorn gevent servers, where a crash shows as a dropped connection and
a restarted worker. Inputs that kill the process (llama.cpp aborting) are sent
only to a server of their own.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai_schema
import pytest
from conftest import LiveServer
from flask import Flask
from flask.testing import FlaskClient
from openai._streaming import SSEDecoder
from openai_schema import validate
from pydantic import BaseModel

from wsgi_llama import create_app, schemas

TIMEOUT = 20.0  # seconds a single request may take before it counts as a hang
N_VOCAB = 260
MiB = 1024 * 1024

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
EMBEDDINGS = "/v1/embeddings"
TOKENIZE = "/extras/tokenize"
COUNT = "/extras/tokenize/count"
DETOKENIZE = "/extras/detokenize"

VALID: dict[str, dict[str, Any]] = {
    COMPLETIONS: {"prompt": "Hi", "max_tokens": 4},
    CHAT: {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
    EMBEDDINGS: {"input": "Hi"},
    TOKENIZE: {"input": "Hi"},
    COUNT: {"input": "Hi"},
    DETOKENIZE: {"tokens": [5, 6]},
}
POST_ROUTES = list(VALID)
GET_ROUTES = ["/health", "/openapi.json", "/v1/models", "/v1/models/tiny"]
SHORT = {
    COMPLETIONS: "completions",
    CHAT: "chat",
    EMBEDDINGS: "embeddings",
    TOKENIZE: "tokenize",
    COUNT: "count",
    DETOKENIZE: "detokenize",
}


@dataclass(frozen=True)
class Case:
    """A request, and what a correct server may answer.

    ``status`` None accepts any status below 500 (with the error shape when
    it is 4xx), for the few cases where more than one answer is right;
    ``param`` is the field a 4xx must name, ``code`` its error code.
    """

    path: str
    body: Any = None  # JSON-able, or bytes sent as they are
    method: str = "POST"
    status: int | tuple[int, ...] | None = None
    param: str | None = None
    code: str | None = None
    content_type: str | None = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    app: str = "default"  # which in-process app: default, embedder, small

    def data(self) -> bytes | None:
        if self.body is None and self.method != "POST":
            return None
        if isinstance(self.body, bytes):
            return self.body
        return json.dumps(self.body).encode()

    def all_headers(self) -> dict[str, str]:
        headers = dict(self.headers)
        if self.content_type is not None and self.method == "POST":
            headers["Content-Type"] = self.content_type
        return headers


def post(path: str, body: Any, **kw: Any) -> Case:
    if path == EMBEDDINGS:
        kw.setdefault("app", "embedder")
    return Case(path, body, **kw)


def bad(path: str, body: Any, param: str | None, status: int = 400, **kw: Any) -> Case:
    return post(path, body, status=status, param=param, **kw)


def ok(path: str, body: Any, **kw: Any) -> Case:
    return post(path, body, status=200, **kw)


# The replies


@dataclass
class Reply:
    status: int
    content_type: str
    body: bytes
    where: str

    def json(self) -> Any:
        return json.loads(self.body)


def check(case: Case, reply: Reply) -> None:
    """The whole contract: no 5xx, the error shape, the field, a real answer."""
    context = f"{reply.where}: {case.method} {case.path} -> {reply.status} "
    context += repr(reply.body[:300])
    assert reply.status < 500, context
    if case.status is not None:
        expected = case.status if isinstance(case.status, tuple) else (case.status,)
        assert reply.status in expected, context
    if reply.status >= 400:
        error = error_of(reply, context)
        if case.param is not None:
            assert names(error["param"], case.param), context
        if case.code is not None:
            assert error["code"] == case.code, context
        return
    if case.method == "HEAD" or reply.status >= 300:
        return
    if reply.content_type.startswith("text/event-stream"):
        check_stream(case, reply, context)
    elif reply.content_type.startswith("text/html"):  # the playground
        assert case.path == "/" and reply.body.startswith(b"<!doctype html>"), context
    else:
        check_answer(case, reply.json(), context)


def names(param: str | None, field: str) -> bool:
    """Whether an error's *param* is *field* or a part of it."""
    param = param or ""
    return param == field or param.startswith((field + ".", field + "["))


def error_of(reply: Reply, context: str) -> dict[str, Any]:
    assert reply.content_type.startswith("application/json"), context
    body = reply.json()
    validate(body, "ErrorResponse")
    assert set(body) == {"error"}, context
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, context
    assert isinstance(error["message"], str) and error["message"], context
    assert isinstance(error["type"], str) and error["type"], context
    assert error["type"] != "server_error", context
    return error


def check_answer(case: Case, body: Any, context: str) -> None:
    path = case.path
    if path == COMPLETIONS:
        logprobs = body["choices"][0]["logprobs"]
        if logprobs is not None:
            # Each token once, in order: together they are the text.
            assert "".join(logprobs["tokens"]) == body["choices"][0]["text"], context
            n = len(logprobs["tokens"])
            assert n == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"])
            # With echo, OpenAI sends null for the first token, though its
            # schema says number.
            if logprobs["token_logprobs"][:1] == [None]:
                body = json.loads(json.dumps(body))
                body["choices"][0]["logprobs"]["token_logprobs"][0] = 0.0
                body["choices"][0]["logprobs"]["top_logprobs"][0] = {}
        validate(body, "CreateCompletionResponse")
        check_length(case, body, context)
    elif path == CHAT:
        validate(body, "CreateChatCompletionResponse")
        check_length(case, body, context)
    elif path == EMBEDDINGS:
        validate(body, "CreateEmbeddingResponse")
    elif path == TOKENIZE:
        tokens = body["tokens"]
        assert all(isinstance(t, int) and 0 <= t < N_VOCAB for t in tokens), context
    elif path == COUNT:
        assert isinstance(body["count"], int) and body["count"] >= 0, context
    elif path == DETOKENIZE:
        assert isinstance(body["text"], str), context
    elif path == "/v1/models":
        validate(body, "ListModelsResponse")
    elif path.startswith("/v1/models/"):
        validate(body, "Model")
    elif path == "/health":
        assert body == {"status": "ok"}, context
    elif path == "/openapi.json":
        assert body["openapi"].startswith("3."), context


def check_length(case: Case, body: Any, context: str) -> None:
    """max_tokens holds, give or take the 3 bytes that finish a character."""
    request = json.loads(case.data() or b"{}")
    limit = request.get("max_completion_tokens") or request.get("max_tokens")
    if isinstance(limit, int) and 0 < limit < 10**6:
        assert body["usage"]["completion_tokens"] <= limit + 3, context


def check_stream(case: Case, reply: Reply, context: str) -> None:
    events = list(SSEDecoder().iter_bytes(iter([reply.body])))
    assert events, context
    for event in events[:-1]:
        payload = json.loads(event.data)
        assert "error" not in payload, context
        if case.path == CHAT:
            validate(payload, "CreateChatCompletionStreamResponse")
        else:
            # OpenAI has no schema of its own for completion chunks: they are
            # completions whose finish_reason is null until the last one.
            for choice in payload["choices"]:
                choice["finish_reason"] = choice["finish_reason"] or "length"
            validate(payload, "CreateCompletionResponse")
    assert events[-1].data == "[DONE]", context


# In-process


@pytest.fixture(scope="module")
def embedding_config(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: Path
) -> Path:
    config = tmp_path_factory.mktemp("hostile") / "embedding.yaml"
    config.write_text(
        f"models:\n  - model: {tiny_model}\n    model_alias: tiny\n"
        "    embedding: true\n    n_ctx: 256\n    n_threads: 1\n"
    )
    return config


@pytest.fixture(scope="module")
def apps(make_app: Callable[..., Flask], embedding_config: Path) -> dict[str, Flask]:
    # One thread each: llama.cpp's threads spin while they wait for each
    # other, and on a busy machine two of them made a 4-token completion take
    # 0.5 s instead of 2 ms.
    default = make_app(LLAMA_N_THREADS=1)
    embedder = create_app({"LLAMA_CONFIG_FILE": str(embedding_config)})
    embedder.testing = True
    # A small context, so that a generation that runs to its end ends soon.
    small = make_app(LLAMA_N_CTX=128, LLAMA_N_THREADS=1)
    return {"default": default, "embedder": embedder, "small": small}


def in_process(client: FlaskClient, case: Case) -> Reply:
    """Send *case* through the test client; fail, not stall, if it hangs."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            response = client.open(
                case.path,
                method=case.method,
                data=case.data(),
                headers=case.all_headers(),
            )
            box["reply"] = Reply(
                response.status_code,
                response.content_type or "",
                response.get_data(),
                "in-process",
            )
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(TIMEOUT)
    assert not thread.is_alive(), f"no answer within {TIMEOUT:g} s: {str(case)[:300]}"
    if "error" in box:
        raise box["error"]
    return box["reply"]


def run_in_process(apps: dict[str, Flask], case: Case) -> None:
    client = apps[case.app].test_client()
    check(case, in_process(client, case))
    health = in_process(client, Case("/health", method="GET"))
    assert health.status == 200


# Every field of every route, with a value of every wrong kind
#
# What each field takes is written down here, from OpenAI's API reference and
# llama-cpp-python's server, and not read from wsgi_llama.schemas: a loosened
# request model must fail these tests. test_table_agrees_with_openai compares
# the table with OpenAI's own request schemas, field by field, and lists where
# (and why) this server differs.

Check = Callable[[Any], bool]


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def integer(low: float = -math.inf, high: float = math.inf) -> Check:
    return lambda v: is_int(v) and low <= v <= high


def number(low: float = -math.inf, high: float = math.inf) -> Check:
    """JSON has one number type: an integer is a number too; bools are not."""
    return lambda v: (is_int(v) or isinstance(v, float)) and low <= v <= high


def const(*values: Any) -> Check:
    return lambda v: isinstance(v, str) and v in values


def boolean(value: Any) -> bool:
    return isinstance(value, bool)


def string(value: Any) -> bool:
    return isinstance(value, str)


def null(value: Any) -> bool:
    return value is None


def either(*checks: Check) -> Check:
    return lambda v: any(check(v) for check in checks)


def array(item: Check, min_items: int = 0, max_items: float = math.inf) -> Check:
    return lambda v: (
        isinstance(v, list) and min_items <= len(v) <= max_items and all(map(item, v))
    )


def obj(value: Any) -> bool:
    return isinstance(value, dict)


def record(**fields: Check) -> Check:
    """An object whose listed fields (all required) pass their checks."""
    return lambda v: obj(v) and all(k in v and c(v[k]) for k, c in fields.items())


token = integer(0, N_VOCAB - 1)  # the tiny model's vocabulary
tokens = array(token, 1)


def token_key(key: str) -> bool:
    return re.fullmatch(r"-?[0-9]+", key) is not None and token(int(key))


def logit_bias(value: Any) -> bool:
    return obj(value) and all(
        token_key(k) and number(-100, 100)(b) for k, b in value.items()
    )


def grammar(value: Any) -> bool:
    """GBNF with a root rule (the battery's one string, "x", is not)."""
    return isinstance(value, str) and value.startswith("root ::=")


text_part = record(type=const("text"), text=string)
message = record(role=const("system", "developer", "user", "assistant", "tool"))
function = record(name=string)
tool = record(type=const("function"), function=function)
tool_call = record(id=string, function=record(name=string, arguments=string))
optional_string = either(string, null)

SAMPLING: dict[str, Check] = {
    "model": optional_string,  # any name, or none: one model serves them all
    "max_tokens": either(integer(0), null),  # no upper bound: cut to fit
    "temperature": number(0, 2),
    "top_p": number(0, 1),
    "top_k": integer(0),
    "min_p": number(0, 1),
    "typical_p": number(0, 1),
    "repeat_penalty": number(0),
    "presence_penalty": number(-2, 2),
    "frequency_penalty": number(-2, 2),
    "mirostat_mode": integer(0, 2),
    "mirostat_tau": number(0),
    "mirostat_eta": number(0),
    "stop": either(string, array(string), null),
    "seed": either(integer(0, 2**32 - 1), null),  # llama.cpp's seeds are uint32
    "logit_bias": either(logit_bias, null),
    "grammar": either(grammar, null),
    "n": integer(1, 16),  # each choice a sequence of the engine
    "stream": boolean,
    "stream_options": either(obj, null),  # unknown members are ignored
    "sse_ping_interval": either(number(high=3600), null),  # <= 0: off
    "user": optional_string,
}
# The valid body of each route, and what each of its fields takes.
FIELDS: dict[str, dict[str, Check]] = {
    COMPLETIONS: {
        **SAMPLING,
        "prompt": either(string, array(string, 1, 1), tokens),
        "suffix": optional_string,
        "echo": boolean,
        "logprobs": either(integer(0, 20), null),
        "best_of": integer(1, 1),
    },
    CHAT: {
        **SAMPLING,
        "messages": array(message, 1),
        "max_completion_tokens": either(integer(0), null),
        "logprobs": boolean,
        "top_logprobs": either(integer(0, 20), null),
        "response_format": either(
            record(type=const("text", "json_object", "json_schema")), null
        ),
        "tools": either(array(tool), null),
        # Naming a function needs tools to name: the valid body has none.
        "tool_choice": either(const("none", "auto", "required"), null),
        "functions": either(array(function), null),
        "function_call": either(const("none", "auto"), null),
        # The valid body's message is the user's.
        "messages[0].role": const("user", "system", "developer", "assistant", "tool"),
        "messages[0].content": either(string, array(text_part)),
        "messages[0].name": optional_string,
        "messages[0].tool_calls": either(array(tool_call), null),
        "messages[0].tool_call_id": optional_string,
    },
    EMBEDDINGS: {
        "model": optional_string,
        "input": either(string, array(string, 1), tokens, array(tokens, 1)),
        "encoding_format": const("float", "base64"),
        "user": optional_string,
    },
    TOKENIZE: {"model": optional_string, "input": string},
    COUNT: {"model": optional_string, "input": string},
    DETOKENIZE: {"model": optional_string, "tokens": array(token)},
}

WRONG: dict[str, Any] = {
    "true": True,
    "float": 0.5,
    "string": "x",
    "list": [1],
    "object": {"x": 1},
    "null": None,
    "negative": -1,
    "huge": 10**30,
}


def with_value(path: str, name: str, value: Any) -> dict[str, Any]:
    body = json.loads(json.dumps(VALID[path]))
    if name.startswith("messages[0]."):
        body["messages"][0][name.removeprefix("messages[0].")] = value
    else:
        body[name] = value
    return body


def field_cases() -> Iterator[Any]:
    for path, fields in FIELDS.items():
        for name, takes in fields.items():
            for kind, value in WRONG.items():
                body = with_value(path, name, value)
                # A small context keeps max_tokens=10**30 short.
                kw = {"app": "small"} if path in {COMPLETIONS, CHAT} else {}
                if takes(value):
                    case = ok(path, body, **kw)
                else:
                    case = bad(path, body, param=name, **kw)
                yield pytest.param(
                    case, name, id=f"{SHORT[path]}-{name}-{kind}".replace(".", "_")
                )


@pytest.mark.parametrize(("case", "name"), list(field_cases()))
def test_wrong_value_for_field(apps: dict[str, Flask], case: Case, name: str) -> None:
    client = apps[case.app].test_client()
    reply = in_process(client, case)
    check(case, reply)
    if case.status == 400:
        error = reply.json()["error"]
        assert names(error["param"], name), error
        assert re.split(r"[.\[]", name)[0] in error["message"], error


def request_fields(model: type[BaseModel]) -> set[str]:
    return {f.alias or n for n, f in model.model_fields.items()}


@pytest.mark.parametrize(
    ("path", "model"),
    [
        (COMPLETIONS, schemas.CompletionRequest),
        (CHAT, schemas.ChatCompletionRequest),
        (EMBEDDINGS, schemas.EmbeddingRequest),
        (TOKENIZE, schemas.TokenizeRequest),
        (DETOKENIZE, schemas.DetokenizeRequest),
    ],
)
def test_table_covers_every_field(path: str, model: type[BaseModel]) -> None:
    """A field added to a request model must be added to the table too."""
    fields = request_fields(model)
    if path == CHAT:
        fields |= {f"messages[0].{n}" for n in request_fields(schemas.Message)}
    assert set(FIELDS[path]) == fields


# Where this server's answer differs from what OpenAI's request schema allows,
# and why: (route, field) -> (the wrong kinds, the reason).
NULL_IS_DEFAULT = "OpenAI takes null as the default; refused, as llama-cpp-python does"
NULL_IS_ABSENT = "OpenAI's schema wants a value; here null means the field is absent"
DIFFERS: dict[tuple[str, str], tuple[set[str], str]] = {
    **{
        (path, name): ({"null"}, NULL_IS_DEFAULT)
        for path in (COMPLETIONS, CHAT)
        for name in (
            "temperature",
            "top_p",
            "presence_penalty",
            "frequency_penalty",
            "n",
            "stream",
        )
    },
    (COMPLETIONS, "prompt"): ({"null"}, NULL_IS_DEFAULT),
    (COMPLETIONS, "echo"): ({"null"}, NULL_IS_DEFAULT),
    (COMPLETIONS, "best_of"): ({"null"}, NULL_IS_DEFAULT),
    (CHAT, "logprobs"): ({"null"}, NULL_IS_DEFAULT),
    **{
        (path, name): ({"null"}, NULL_IS_ABSENT)
        for path in (COMPLETIONS, CHAT, EMBEDDINGS)
        for name in ("model", "user")
    },
    **{
        (CHAT, name): ({"null"}, NULL_IS_ABSENT)
        for name in (
            "response_format",
            "tools",
            "tool_choice",
            "functions",
            "function_call",
            "messages[0].name",
        )
    },
    (COMPLETIONS, "seed"): (
        {"negative", "huge"},
        "llama.cpp's seeds are 32-bit, unsigned; OpenAI's schema sets no bounds",
    ),
    (CHAT, "seed"): ({"negative"}, "llama.cpp's seeds are unsigned"),
    (CHAT, "max_tokens"): ({"negative"}, "OpenAI's chat schema sets no minimum"),
    (CHAT, "max_completion_tokens"): (
        {"negative"},
        "OpenAI's chat schema sets no minimum (its completions schema does: 0)",
    ),
    **{
        (path, "logit_bias"): (
            {"object"},
            "keys must be token ids; OpenAI's schema does not describe the keys",
        )
        for path in (COMPLETIONS, CHAT)
    },
}


def openai_property(path: str, name: str) -> tuple[str, str] | None:
    """OpenAI's request schema and property for *name* on *path*, if it has one."""
    schema = {
        COMPLETIONS: "CreateCompletionRequest",
        CHAT: "CreateChatCompletionRequest",
        EMBEDDINGS: "CreateEmbeddingRequest",
    }.get(path)
    if name.startswith("messages[0]."):
        schema, name = "ChatCompletionRequestUserMessage", name.split(".")[1]
    if schema is None or not openai_schema.has_property(schema, name):
        return None
    return schema, name


def openai_cases() -> Iterator[Any]:
    for path, fields in FIELDS.items():
        for name, takes in fields.items():
            found = openai_property(path, name)
            if found is not None:
                yield pytest.param(
                    path, name, takes, *found, id=f"{SHORT[path]}-{name}"
                )


@pytest.mark.parametrize(
    ("path", "name", "takes", "schema", "prop"), list(openai_cases())
)
def test_table_agrees_with_openai(
    path: str, name: str, takes: Check, schema: str, prop: str
) -> None:
    kinds, _ = DIFFERS.get((path, name), (set(), ""))
    differs = {
        kind
        for kind, value in WRONG.items()
        if takes(value) != openai_schema.property_accepts(schema, prop, value)
    }
    assert differs == kinds


# Bodies that are not a JSON object


def with_raw_text(path: str, raw: bytes) -> bytes:
    """The route's valid body, with *raw* bytes as its text."""
    body = json.loads(json.dumps(VALID[path]))
    if path == CHAT:
        body["messages"][0]["content"] = "@@"
    elif path == DETOKENIZE:
        body["model"] = "@@"
    else:
        body["prompt" if path == COMPLETIONS else "input"] = "@@"
    return json.dumps(body).encode().replace(b"@@", raw)


BAD_UTF8 = {
    "invalid-utf8": b"\xff\xfe",
    "bad-continuation": b"\xc3\x28",
    "overlong-utf8": b"\xc0\xaf",
    # A surrogate encoded in UTF-8: invalid, yet json.loads(bytes) decodes
    # with "surrogatepass" and lets it in.
    "utf8-surrogate": b"\xed\xa0\x80",
    "latin1": "café".encode("latin-1"),
}


def body_cases() -> Iterator[Any]:
    junk: dict[str, tuple[bytes, str | None]] = {
        "empty": (b"", "application/json"),
        "truncated": (b'{"input": "Hi"', "application/json"),
        "single-quotes": (b"{'input': 'Hi'}", "application/json"),
        "bare-word": (b"nul", "application/json"),
        "nul-byte": (b"\x00", "application/json"),
        "root-list": (b"[]", "application/json"),
        "root-list-of-body": (b"[{}]", "application/json"),
        "root-string": (b'"Hi"', "application/json"),
        "root-number": (b"42", "application/json"),
        "root-null": (b"null", "application/json"),
        "root-true": (b"true", "application/json"),
        "nested-arrays-10000": (b"[" * 10000 + b"]" * 10000, "application/json"),
        "nested-objects-10000": (
            b'{"a":' * 10000 + b"1" + b"}" * 10000,
            "application/json",
        ),
        "form-urlencoded": (b"input=Hi&prompt=Hi", "application/x-www-form-urlencoded"),
        "multipart": (
            b"--b\r\nContent-Disposition: form-data; name=input\r\n\r\nHi\r\n--b--\r\n",
            "multipart/form-data; boundary=b",
        ),
        "text-plain-junk": (b"Hi", "text/plain"),
        "no-content-type-junk": (b"Hi", None),
    }
    for path in POST_ROUTES:
        for kind, (data, content_type) in junk.items():
            case = bad(path, data, None, content_type=content_type, code="invalid_json")
            yield pytest.param(case, id=f"{SHORT[path]}-{kind}")
        for kind, raw in BAD_UTF8.items():
            # Not UTF-8: not JSON. A lone surrogate is JSON, but not text.
            code = None if kind == "utf8-surrogate" else "invalid_json"
            case = bad(path, with_raw_text(path, raw), None, code=code)
            yield pytest.param(case, id=f"{SHORT[path]}-{kind}")
        # A valid JSON body is JSON whatever the label says; both are fine.
        valid = json.dumps(VALID[path]).encode()
        for content_type in ["text/plain", "application/x-www-form-urlencoded", None]:
            label = content_type or "none"
            case = ok(path, valid, content_type=content_type)
            yield pytest.param(case, id=f"{SHORT[path]}-valid-json-as-{label}")
        utf16 = json.dumps(VALID[path]).encode("utf-16")  # JSON may be UTF-16
        yield pytest.param(ok(path, utf16), id=f"{SHORT[path]}-utf16-with-bom")
        nested = b'{"x": ' + b"[" * 10000 + b"]" * 10000 + b"}"
        yield pytest.param(
            bad(path, nested[:-1] + b", " + valid[1:], None, code="invalid_json"),
            id=f"{SHORT[path]}-valid-body-with-nested-10000",
        )
        key = next(iter(VALID[path]))
        duplicate = f'{{"{key}": 12345, {json.dumps(VALID[path])[1:]}'.encode()
        # The last value wins, as in most JSON parsers.
        yield pytest.param(ok(path, duplicate), id=f"{SHORT[path]}-duplicate-key")
        yield pytest.param(
            bad(path, b"x" * (8 * MiB + 1), param=None, status=413),
            id=f"{SHORT[path]}-over-8MiB",
        )
        yield pytest.param(
            Case(path, method="GET", status=405), id=f"{SHORT[path]}-GET"
        )
        for field_name in VALID[path]:
            if field_name == "max_tokens":
                continue
            body = {k: v for k, v in VALID[path].items() if k != field_name}
            # A completion's prompt defaults to "", so dropping it is fine.
            if path == COMPLETIONS:
                case = ok(path, body)
            else:
                case = bad(path, body, field_name)
            yield pytest.param(case, id=f"{SHORT[path]}-missing-{field_name}")


@pytest.mark.parametrize("case", list(body_cases()))
def test_malformed_body(apps: dict[str, Flask], case: Case) -> None:
    run_in_process(apps, case)


# Named cases: the inputs that hurt servers like this one

BIG_WORDS = ("lorem ipsum dolor sit amet " * 40_000)[:MiB]  # 1 MB, tokenizes fast


def named_cases() -> Iterator[Any]:
    c, ch = VALID[COMPLETIONS], VALID[CHAT]

    def completion(**kw: Any) -> dict[str, Any]:
        return {**c, **kw}

    def chat(**kw: Any) -> dict[str, Any]:
        return {**ch, **kw}

    def user(content: Any, **kw: Any) -> dict[str, Any]:
        return {**ch, "messages": [{"role": "user", "content": content, **kw}]}

    # Numbers out of range, and JSON's non-standard number literals.
    for name, value in [("temperature", "1e308"), ("temperature", "-1")]:
        raw = f'{{"prompt": "Hi", "max_tokens": 4, "{name}": {value}}}'.encode()
        yield f"{name}-{value}", bad(COMPLETIONS, raw, name)
    for literal in ["NaN", "Infinity", "-Infinity"]:
        for name in ["temperature", "top_p", "min_p", "presence_penalty"]:
            raw = f'{{"prompt": "Hi", "max_tokens": 4, "{name}": {literal}}}'.encode()
            yield f"{name}-{literal}", bad(COMPLETIONS, raw, name)
        for name in ["repeat_penalty", "mirostat_tau", "mirostat_eta"]:
            raw = f'{{"prompt": "Hi", "max_tokens": 4, "{name}": {literal}}}'.encode()
            yield f"{name}-{literal}", bad(COMPLETIONS, raw, name)
        raw = f'{{"prompt": "Hi", "max_tokens": {literal}}}'.encode()
        yield f"max_tokens-{literal}", bad(COMPLETIONS, raw, "max_tokens")
        raw = f'{{"prompt": "Hi", "logit_bias": {{"5": {literal}}}}}'.encode()
        yield f"logit_bias-value-{literal}", bad(COMPLETIONS, raw, "logit_bias")
        raw = f'{{"input": "Hi", "x": {literal}}}'.encode()
        yield f"unknown-field-{literal}", ok(TOKENIZE, raw)
    for name in ["max_tokens", "seed", "top_k", "logprobs", "mirostat_mode", "n"]:
        for value in [10**30, -(10**30), 2**63, 2**64]:
            body = completion(**{name: value})
            if name in {"max_tokens", "top_k"} and value > 0:  # no upper bound
                yield f"{name}-{value}", ok(COMPLETIONS, body, app="small")
            else:
                yield f"{name}-{value}", bad(COMPLETIONS, body, name)
    huge_digits = b'{"prompt": "Hi", "max_tokens": ' + b"9" * 5000 + b"}"
    yield "max_tokens-5000-digits", bad(COMPLETIONS, huge_digits, None)
    yield "max_tokens-1e400", bad(COMPLETIONS, b'{"max_tokens": 1e400}', "max_tokens")
    for name in ["max_tokens", "max_completion_tokens", "top_logprobs", "seed"]:
        yield (
            f"chat-{name}-huge",
            (
                ok(CHAT, chat(**{name: 10**30}), app="small")
                if name in {"max_tokens", "max_completion_tokens"}
                else bad(CHAT, chat(**{name: 10**30}), name)
            ),
        )

    # Token ids outside the 260-token vocabulary.
    def bad_token(path: str, body: dict[str, Any], param: str) -> Case:
        return bad(path, body, param, code="invalid_token_id")

    for token in [-1, -(2**31), N_VOCAB, 2**31, 2**63, 2**64]:
        yield (
            f"prompt-token-{token}",
            bad_token(COMPLETIONS, completion(prompt=[token]), "prompt"),
        )
        bias = completion(logit_bias={str(token): 1})
        yield f"logit_bias-token-{token}", bad_token(COMPLETIONS, bias, "logit_bias")
        yield (
            f"detokenize-{token}",
            bad_token(DETOKENIZE, {"tokens": [5, token]}, "tokens"),
        )
        yield (
            f"embeddings-token-{token}",
            bad_token(EMBEDDINGS, {"input": [token]}, "input"),
        )
        yield (
            f"embeddings-tokens-{token}",
            bad_token(EMBEDDINGS, {"input": [[5], [token]]}, "input"),
        )
    # llama.cpp throws std::out_of_range on a negative id, which aborts the
    # process; llama-cpp-python's own server dies on this one.
    yield (
        "detokenize-negative-first",
        bad_token(DETOKENIZE, {"tokens": [-5]}, "tokens"),
    )
    yield "detokenize-float-token", bad(DETOKENIZE, {"tokens": [5.5]}, "tokens")
    yield "detokenize-integral-float", bad(DETOKENIZE, {"tokens": [5.0]}, "tokens")
    yield "detokenize-bool-token", bad(DETOKENIZE, {"tokens": [True]}, "tokens")
    yield "detokenize-string-token", bad(DETOKENIZE, {"tokens": ["5"]}, "tokens")
    yield "detokenize-special", ok(DETOKENIZE, {"tokens": [0, 1, 2, 3]})
    yield "detokenize-empty", ok(DETOKENIZE, {"tokens": []})
    yield "detokenize-lone-lead-byte", ok(DETOKENIZE, {"tokens": [4 + 0xE2]})

    # logit_bias keys that only look like numbers.
    for key in ["²", "--5", "+5", " 5", "5 ", "0x10", "1e2", "5.0", "", "-"]:
        yield (
            f"logit_bias-key-{key!r}",
            bad(COMPLETIONS, completion(logit_bias={key: 1}), "logit_bias"),
        )
    yield (
        "logit_bias-key-5000-digits",
        bad(COMPLETIONS, completion(logit_bias={"9" * 5000: 1}), "logit_bias"),
    )
    yield (
        "logit_bias-every-token",
        ok(COMPLETIONS, completion(logit_bias={str(i): -0.5 for i in range(N_VOCAB)})),
    )

    # Token prompts llama-cpp-python trips over.
    yield "prompt-empty-token-list", bad(COMPLETIONS, completion(prompt=[]), "prompt")
    yield (
        "prompt-empty-token-list-stream",
        bad(COMPLETIONS, completion(prompt=[], stream=True), "prompt"),
    )
    yield (
        "prompt-tokens-echo",
        bad(COMPLETIONS, completion(prompt=[5, 6], echo=True), "echo"),
    )
    yield (
        "prompt-empty-echo-logprobs",
        ok(COMPLETIONS, completion(prompt="", echo=True, logprobs=3)),
    )
    yield (
        "prompt-bos-echo-logprobs",
        bad(COMPLETIONS, completion(prompt=[1], echo=True, logprobs=0), "echo"),
    )
    yield (
        "prompt-list-of-two-strings",
        bad(COMPLETIONS, completion(prompt=["a", "b"]), "prompt"),
    )
    yield "prompt-mixed-list", bad(COMPLETIONS, completion(prompt=["a", 5]), "prompt")
    yield (
        "prompt-nested-token-lists",
        bad(COMPLETIONS, completion(prompt=[[5, 6]]), "prompt"),
    )
    yield "suffix", ok(COMPLETIONS, completion(suffix="tail"))

    # Unknown roles and malformed messages.
    for role in ["robot", "", "USER", "System", None, 5]:
        body = {**ch, "messages": [{"role": role, "content": "Hi"}]}
        yield f"role-{role!r}", bad(CHAT, body, "messages[0].role")
    yield "message-no-role", bad(CHAT, {**ch, "messages": [{"content": "Hi"}]}, None)
    yield "message-not-object", bad(CHAT, {**ch, "messages": ["Hi"]}, None)
    yield "messages-empty", bad(CHAT, {**ch, "messages": []}, "messages")
    yield "messages-object", bad(CHAT, {**ch, "messages": {"role": "user"}}, None)
    # As OpenAI: user, system, developer and tool messages need content;
    # assistant messages may carry tool calls instead.
    yield "content-null", bad(CHAT, user(None), "messages[0].content")
    for role in ["user", "system", "developer", "tool"]:
        body = {**ch, "messages": [{"role": role}]}
        yield f"{role}-without-content", bad(CHAT, body, "messages[0].content")
    yield (
        "assistant-without-content",
        ok(CHAT, {**ch, "messages": [{"role": "assistant"}]}),
    )
    yield (
        "content-image-part",
        bad(CHAT, user([{"type": "image_url", "image_url": {"url": "x"}}]), None),
    )
    yield "content-text-parts", ok(CHAT, user([{"type": "text", "text": "Hi"}] * 3))
    yield (
        "tool-message-alone",
        ok(CHAT, {**ch, "messages": [{"role": "tool", "content": "x"}]}),
    )
    yield (
        "tool-call-bad-arguments",
        ok(
            CHAT,
            {
                **ch,
                "messages": [
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {"id": "1", "function": {"name": "f", "arguments": "{"}}
                        ],
                    }
                ],
            },
        ),
    )
    yield (
        "10000-messages",
        bad(CHAT, {**ch, "messages": [ch["messages"][0]] * 10000}, "messages"),
    )

    # Lone surrogates: valid JSON escapes, but no UTF-8 can carry them.
    for name, case in [
        ("tokenize", bad(TOKENIZE, {"input": "\ud800"}, "input")),
        ("count", bad(COUNT, {"input": "a\udfffb"}, "input")),
        ("prompt", bad(COMPLETIONS, completion(prompt="\ud800"), "prompt")),
        ("chat", bad(CHAT, user("\udbff"), None)),
        ("stop", bad(COMPLETIONS, completion(stop=["\ud800"]), "stop")),
        ("embeddings", bad(EMBEDDINGS, {"input": "\ud800"}, "input")),
        ("grammar", bad(COMPLETIONS, completion(grammar='root ::= "\ud800"'), None)),
    ]:
        yield f"lone-surrogate-{name}", case
    yield "surrogate-pair-escape", ok(TOKENIZE, {"input": "\ud83d\ude00"})

    # Huge prompts: 1 MB is past any context; over 8 MiB is past the limit.
    too_long = "context_length_exceeded"
    yield (
        "prompt-1MB",
        bad(COMPLETIONS, completion(prompt=BIG_WORDS), "prompt", code=too_long),
    )
    yield "chat-1MB", bad(CHAT, user(BIG_WORDS), "messages", code=too_long)
    yield "tokenize-1MB", ok(COUNT, {"input": BIG_WORDS})
    yield (
        "embeddings-1MB",
        bad(EMBEDDINGS, {"input": BIG_WORDS}, "input", code=too_long),
    )
    yield (
        "prompt-tokens-past-context",
        bad(COMPLETIONS, completion(prompt=[5] * 2000), "prompt", code=too_long),
    )
    yield (
        "max_tokens-past-context",
        ok(COMPLETIONS, completion(max_tokens=10**6), app="small"),
    )
    yield (
        "max_tokens-0-runs-to-context",
        ok(COMPLETIONS, completion(max_tokens=0), app="small"),
    )

    # Streaming requests are checked before the status line goes out.
    yield (
        "stream-temperature-5",
        bad(COMPLETIONS, completion(stream=True, temperature=5), "temperature"),
    )
    yield (
        "stream-bad-grammar",
        bad(COMPLETIONS, completion(stream=True, grammar="root ::= foo"), "grammar"),
    )
    yield (
        "stream-prompt-past-context",
        bad(
            COMPLETIONS,
            completion(stream=True, prompt=[5] * 5000),
            "prompt",
            code=too_long,
        ),
    )
    yield (
        "stream-token-out-of-range",
        bad(COMPLETIONS, completion(stream=True, logit_bias={"260": 1}), "logit_bias"),
    )
    yield (
        "chat-stream-unknown-tool",
        bad(
            CHAT,
            chat(
                stream=True,
                tools=[{"type": "function", "function": {"name": "f"}}],
                tool_choice={"type": "function", "function": {"name": "g"}},
            ),
            "tool_choice",
        ),
    )
    yield (
        "chat-stream-bad-role",
        bad(
            CHAT,
            {**ch, "stream": True, "messages": [{"role": "x", "content": "Hi"}]},
            "messages[0].role",
        ),
    )

    # Grammars that are not GBNF, or that llama.cpp cannot use.
    for name, grammar in [
        ("undefined-rule", "root ::= foo"),
        ("no-root", 'foo ::= "x"'),
        ("unclosed-class", 'root ::= ["x"'),
        ("unclosed-string", 'root ::= "x'),
        ("left-recursion", 'root ::= root "x"'),
        ("garbage", "::= ::= ::="),
        ("bad-escape", 'root ::= "\\q"'),
        ("huge-repetition", 'root ::= x{100000000}\nx ::= "a"'),
        ("bad-utf8-escape", 'root ::= "\\xZZ"'),
    ]:
        yield (
            f"grammar-{name}",
            bad(COMPLETIONS, completion(grammar=grammar), "grammar"),
        )
    yield "grammar-empty-string", ok(COMPLETIONS, completion(grammar=""))
    # llama.cpp reads the grammar as a C string: it ends at the NUL.
    yield "grammar-raw-nul", ok(COMPLETIONS, completion(grammar='root ::= "a"\x00'))
    yield "grammar-chat-undefined", bad(CHAT, chat(grammar="root ::= foo"), "grammar")

    # response_format and tools with schemas that are not schemas.
    def fmt(value: Any) -> dict[str, Any]:
        return chat(response_format=value)

    yield (
        "response_format-bogus-type",
        bad(CHAT, fmt({"type": "bogus"}), "response_format"),
    )
    yield "response_format-string", bad(CHAT, fmt("json"), "response_format")
    yield "response_format-json_schema-empty", ok(CHAT, fmt({"type": "json_schema"}))
    yield (
        "response_format-schema-not-object",
        bad(CHAT, fmt({"type": "json_schema", "json_schema": {"schema": "x"}}), None),
    )
    for name, schema in [
        ("bogus-type", {"type": "bogus"}),
        ("dangling-ref", {"$ref": "#/nope"}),
        ("remote-ref", {"$ref": "http://127.0.0.1:1/schema.json"}),
        ("bad-pattern", {"type": "string", "pattern": "(((("}),
        ("empty-enum", {"enum": []}),
        ("type-list", {"type": ["string", 5]}),
        # These two the grammar converter takes (one is unsatisfiable, and
        # llama.cpp's grammar ignores the bounds): served.
        ("huge-minimum", {"type": "integer", "minimum": 1e308}),
        ("min-over-max", {"type": "string", "minLength": 5, "maxLength": 1}),
        ("properties-list", {"type": "object", "properties": [1, 2]}),
        ("nested-900", json.loads('{"items":' * 900 + "{}" + "}" * 900)),
    ]:
        served = name in {"huge-minimum", "min-over-max"}
        body = fmt({"type": "json_schema", "json_schema": {"schema": schema}})
        yield (
            f"schema-{name}",
            ok(CHAT, body) if served else bad(CHAT, body, "response_format"),
        )
        tool = {"type": "function", "function": {"name": "f", "parameters": schema}}
        forced = {"type": "function", "function": {"name": "f"}}
        body = chat(tools=[tool], tool_choice=forced)
        yield (
            f"tool-schema-{name}",
            ok(CHAT, body) if served else bad(CHAT, body, "tools"),
        )
    yield "tools-not-list", bad(CHAT, chat(tools={"type": "function"}), "tools")
    yield "tool-without-function", bad(CHAT, chat(tools=[{"type": "function"}]), None)
    yield (
        "tool-without-name",
        bad(CHAT, chat(tools=[{"type": "function", "function": {}}]), None),
    )
    yield (
        "tool_choice-unknown-tool",
        bad(
            CHAT,
            chat(
                tools=[{"type": "function", "function": {"name": "f"}}],
                tool_choice={"type": "function", "function": {"name": "g"}},
            ),
            "tool_choice",
        ),
    )
    yield (
        "tool_choice-without-tools",
        bad(
            CHAT,
            chat(tool_choice={"type": "function", "function": {"name": "g"}}),
            None,
        ),
    )
    yield "tool_choice-bogus-string", bad(CHAT, chat(tool_choice="always"), None)
    yield (
        "tool-forced-without-parameters",
        ok(
            CHAT,
            chat(
                tools=[{"type": "function", "function": {"name": "f"}}],
                tool_choice={"type": "function", "function": {"name": "f"}},
            ),
        ),
    )
    yield (
        "function_call-unknown-function",
        bad(
            CHAT,
            chat(functions=[{"name": "f"}], function_call={"name": "g"}),
            "function_call",
        ),
    )
    yield (
        "function_call-without-parameters",
        ok(CHAT, chat(functions=[{"name": "f"}], function_call={"name": "f"})),
    )
    yield (
        "function_call-bogus-schema",
        bad(
            CHAT,
            chat(
                functions=[{"name": "f", "parameters": {"type": "bogus"}}],
                function_call={"name": "f"},
            ),
            "functions",
        ),
    )

    # Stop lists.
    yield "stop-empty-string", ok(COMPLETIONS, completion(stop=""))
    yield "stop-empty-strings", ok(COMPLETIONS, completion(stop=["", ""]))
    yield "stop-1000-empty", ok(COMPLETIONS, completion(stop=[""] * 1000))
    yield (
        "stop-1000-distinct",
        ok(COMPLETIONS, completion(stop=[f"zz{i}" for i in range(1000)])),
    )
    yield (
        "stop-1000-stream",
        ok(COMPLETIONS, completion(stop=[f"zz{i}" for i in range(1000)], stream=True)),
    )
    yield "stop-number", bad(COMPLETIONS, completion(stop=[5]), "stop")
    yield "stop-huge-string", ok(COMPLETIONS, completion(stop=["x" * 100_000]))
    yield "chat-stop-1000-empty", ok(CHAT, chat(stop=[""] * 1000))

    # Heartbeat intervals a timer cannot take.
    for value in ["Infinity", "1e308", "NaN", "-Infinity", "1e-320"]:
        raw = (
            '{"prompt": "Hi", "max_tokens": 4, "stream": true, '
            f'"sse_ping_interval": {value}}}'
        ).encode()
        if value == "1e-320":  # raised to LLAMA_MIN_PING_INTERVAL
            yield f"sse_ping_interval-{value}", ok(COMPLETIONS, raw)
        else:
            yield (
                f"sse_ping_interval-{value}",
                bad(COMPLETIONS, raw, "sse_ping_interval"),
            )

    # Models that do not exist (one model serves any name) and odd streams.
    yield "model-naming-nothing", ok(COMPLETIONS, completion(model="no-such-model"))
    yield "model-empty", ok(CHAT, chat(model=""))
    yield (
        "stream_options-without-stream",
        ok(CHAT, chat(stream_options={"include_usage": True})),
    )
    yield (
        "stream-logprobs",
        ok(COMPLETIONS, completion(stream=True, logprobs=5, echo=True)),
    )
    yield (
        "chat-stream-logprobs",
        ok(CHAT, chat(stream=True, logprobs=True, top_logprobs=20)),
    )

    # Embeddings inputs llama-cpp-python cannot embed.
    for name, value in [
        ("empty-string", ""),
        ("list-with-empty-string", [""]),
        ("token-list", [5, 6]),
        ("token-lists", [[5, 6], [7]]),
        ("special-tokens", [[0, 1, 2]]),
        ("100-strings", ["Hi"] * 100),
    ]:
        yield f"embeddings-{name}", ok(EMBEDDINGS, {"input": value})
    for name, value in [("empty-list", []), ("empty-token-list", [[]])]:
        yield f"embeddings-{name}", bad(EMBEDDINGS, {"input": value}, "input")
    # Served today (cut to the context); a context_length_exceeded 400 would
    # be right too.
    yield "embeddings-tokens-past-context", post(EMBEDDINGS, {"input": [[5] * 1000]})
    # "base64" is served (tests/test_api.py); other encodings are refused.
    yield (
        "embeddings-int8",
        bad(EMBEDDINGS, {"input": "Hi", "encoding_format": "int8"}, "encoding_format"),
    )
    yield (
        "embeddings-on-generation-model",
        bad(EMBEDDINGS, {"input": "Hi"}, "model", app="default"),
    )

    # A lone UTF-8 lead byte, forced: llama-cpp-python keeps sampling past
    # max_tokens while the text ends in an incomplete character.
    lead = {str(4 + 0xE2): 100}
    yield (
        "logit_bias-forces-lead-byte",
        ok(COMPLETIONS, completion(max_tokens=4, logit_bias=lead), app="small"),
    )
    yield (
        "logit_bias-forces-lead-byte-stream",
        ok(
            COMPLETIONS,
            completion(max_tokens=4, logit_bias=lead, stream=True),
            app="small",
        ),
    )
    yield (
        "chat-logit_bias-forces-lead-byte",
        ok(CHAT, chat(max_tokens=4, logit_bias=lead), app="small"),
    )


NAMED = [pytest.param(case, id=name) for name, case in named_cases()]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "Hi", "max_tokens": "3"}, "max_tokens"),
        ({"prompt": "Hi", "max_tokens": True}, "max_tokens"),
        ({"prompt": "Hi", "stream": 0}, "stream"),
        ({"prompt": "Hi", "temperature": "0.5"}, "temperature"),
        ({"prompt": "Hi", "echo": "true"}, "echo"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ],
)
def test_issue_examples_are_refused_as_openai_does(
    apps: dict[str, Flask], body: dict[str, Any], param: str
) -> None:
    """The cases issue 7 names, with OpenAI's param and wording."""
    path = CHAT if "messages" in body else COMPLETIONS
    reply = in_process(apps["default"].test_client(), bad(path, body, param))
    assert reply.status == 400, reply.body
    error = reply.json()["error"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    if param == "messages[0].content":
        assert error["message"].startswith(
            "Missing required parameter: 'messages[0].content'."
        )


def test_integers_are_numbers(apps: dict[str, Flask]) -> None:
    """JSON has no integer/float split: 1 is a valid temperature."""
    body = {"prompt": "Hi", "max_tokens": 2, "temperature": 1, "top_p": 1}
    reply = in_process(apps["default"].test_client(), ok(COMPLETIONS, body))
    assert reply.status == 200, reply.body


@pytest.mark.parametrize("case", NAMED)
def test_named(apps: dict[str, Flask], case: Case) -> None:
    run_in_process(apps, case)


# GET routes and methods


def get_cases() -> Iterator[Any]:
    for path in GET_ROUTES:
        yield pytest.param(Case(path, method="GET", status=200), id=f"GET-{path}")
        yield pytest.param(Case(path, method="HEAD", status=200), id=f"HEAD-{path}")
        for method in ["POST", "PUT", "DELETE", "PATCH"]:
            yield pytest.param(
                Case(path, b"{}", method=method, status=405), id=f"{method}-{path}"
            )
        # Under gunicorn's 4094-byte request line, which gunicorn answers itself.
        yield pytest.param(
            Case(path + "?x=%ff%00&x=" + "y" * 3000, method="GET", status=200),
            id=f"GET-{path}-junk-query",
        )
    for name, path in [
        ("unknown", "/v1/models/no-such-model"),
        ("nul", "/v1/models/%00"),
        ("bad-percent", "/v1/models/%ff%fe"),
        ("traversal", "/v1/models/..%2F..%2Fetc%2Fpasswd"),
        ("long", "/v1/models/" + "m" * 8000),
        ("unicode", "/v1/models/%F0%9F%98%80"),
    ]:
        yield pytest.param(Case(path, method="GET", status=404), id=f"model-{name}")
    # The chat playground (LLAMA_PLAYGROUND, on by default).
    yield pytest.param(Case("/", method="GET", status=200), id="route-root")
    for name, path in [
        ("v1", "/v1"),
        ("nope", "/v1/nope"),
        ("completions-slash", "/v1/completions/"),
        ("double-slash", "//v1//models"),
    ]:
        yield pytest.param(
            Case(path, method="GET", status=(404, 405, 308)), id=f"route-{name}"
        )


@pytest.mark.parametrize("case", list(get_cases()))
def test_get_routes(apps: dict[str, Flask], case: Case) -> None:
    run_in_process(apps, case)


# Live gunicorn gevent servers


def live(server: LiveServer, case: Case, timeout: float = TIMEOUT) -> Reply:
    """Send *case* over HTTP; the whole answer must arrive within *timeout*.

    A deadline on the whole body, not on each read: heartbeats keep a stream
    that never ends busy enough for any read timeout.
    """
    deadline = time.monotonic() + timeout
    body = bytearray()
    try:
        with httpx.stream(
            case.method,
            server.url + case.path,
            content=case.data(),
            headers=case.all_headers(),
            timeout=timeout,
        ) as response:
            for chunk in response.iter_raw():
                body += chunk
                if time.monotonic() > deadline:
                    break
    except httpx.TimeoutException:
        pass
    except httpx.TransportError as exc:
        pytest.fail(f"connection dropped ({exc!r}): did the worker crash? {case.path}")
    if time.monotonic() > deadline:
        pytest.fail(f"no whole answer within {timeout:g} s: {str(case)[:300]}")
    return Reply(
        response.status_code,
        response.headers.get("content-type", ""),
        bytes(body),
        "live",
    )


def workers_booted(server: LiveServer) -> int:
    return server.log.read_text(errors="replace").count("Booting worker")


def assert_alive(server: LiveServer, booted: int) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(server.url + "/health", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the server is dead"
        time.sleep(0.2)
    assert workers_booted(server) == booted, (
        "a worker died and was restarted:\n" + server.log.read_text()[-2000:]
    )


LIVE_IDS = {
    # bodies
    "completions-empty",
    "chat-invalid-utf8",
    "tokenize-nested-arrays-10000",
    "chat-nested-objects-10000",
    "detokenize-root-list",
    "completions-multipart",
    "count-utf16-with-bom",
    "chat-over-8MiB",
    "embeddings-over-8MiB",
    # fields
    "temperature-NaN",
    "prompt-token--1",
    "detokenize--1",
    "detokenize-negative-first",
    "detokenize-9223372036854775808",
    "logit_bias-key-'²'",
    "logit_bias-key-5000-digits",
    "prompt-empty-token-list",
    "prompt-empty-token-list-stream",
    "lone-surrogate-tokenize",
    "lone-surrogate-chat",
    "prompt-1MB",
    "grammar-undefined-rule",
    "grammar-left-recursion",
    "tool_choice-unknown-tool",
    "function_call-without-parameters",
    "stop-1000-stream",
    "sse_ping_interval-Infinity",
    "sse_ping_interval-NaN",
    "sse_ping_interval-1e-320",
    "chat-stream-logprobs",
    "model-naming-nothing",
    "stream-bad-grammar",
    "stream-prompt-past-context",
    "chat-stream-unknown-tool",
    # GET routes
    "model-nul",
    "model-traversal",
    "route-double-slash",
    "GET-/v1/models-junk-query",
    "DELETE-/health",
}
LIVE = [p for p in [*body_cases(), *NAMED, *get_cases()] if p.id in LIVE_IDS]


def test_live_selection_is_complete() -> None:
    found = {p.id for p in [*body_cases(), *NAMED, *get_cases()]}
    assert found >= LIVE_IDS, LIVE_IDS - found


@pytest.mark.parametrize("case", LIVE)
def test_live(server: LiveServer, case: Case) -> None:
    booted = workers_booted(server)
    check(case, live(server, case))
    assert_alive(server, booted)


def test_live_chunked_body_over_limit(server: LiveServer) -> None:
    """No Content-Length to check up front: the limit must hold while reading.

    The first 8 MiB are a valid body; what follows must not be ignored.
    """
    booted = workers_booted(server)
    head = b'{"input": "Hi"}'

    def chunks() -> Iterator[bytes]:
        yield head
        yield b" " * (8 * MiB - len(head))
        yield b"past the limit, and not JSON" * 1000

    response = httpx.post(
        server.url + TOKENIZE,
        content=chunks(),
        headers={"Content-Type": "application/json"},
        timeout=TIMEOUT,
    )
    case = Case(TOKENIZE, status=413)
    check(
        case,
        Reply(
            response.status_code,
            response.headers.get("content-type", ""),
            response.content,
            "live",
        ),
    )
    assert_alive(server, booted)


# Inputs that kill the process: a server of their own


@pytest.fixture(scope="module")
def victim(start_server: Callable[..., LiveServer]) -> LiveServer:
    return start_server(
        LLAMA_N_CTX="512", LLAMA_PING_INTERVAL="0.2", LLAMA_N_THREADS="1"
    )


KILLERS = [
    # A grammar that can match U+0000: llama.cpp's grammar treats code point
    # 0 as the end of a token's text, accepts any token there, then throws
    # "Unexpected empty grammar stack" through C -- std::terminate, SIGABRT.
    pytest.param(
        bad(COMPLETIONS, {**VALID[COMPLETIONS], "grammar": 'root ::= "\\x00"'}, None),
        id="grammar-matching-nul",
    ),
    pytest.param(
        bad(
            COMPLETIONS,
            {**VALID[COMPLETIONS], "grammar": 'root ::= [\\x00] "a"', "stream": True},
            None,
        ),
        id="grammar-matching-nul-stream",
    ),
    pytest.param(
        bad(
            CHAT,
            {
                **VALID[CHAT],
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"schema": {"enum": ["\u0000"]}},
                },
            },
            None,
        ),
        id="schema-enum-nul",
    ),
    pytest.param(
        bad(
            CHAT,
            {
                **VALID[CHAT],
                "response_format": {
                    "type": "json_object",
                    "schema": {"type": "string", "pattern": "^\\u0000$"},
                },
            },
            None,
        ),
        id="schema-pattern-nul",
    ),
]


# llama-cpp-python turns a forced function's parameters into a grammar of its
# own, which the server does not check as it checks tool_choice's.
for name, schema in [("invalid-grammar", {"enum": []}), ("enum-nul", {"enum": ["\0"]})]:
    KILLERS.append(
        pytest.param(
            bad(
                CHAT,
                {
                    **VALID[CHAT],
                    "functions": [{"name": "f", "parameters": schema}],
                    "function_call": {"name": "f"},
                },
                None,
            ),
            id=f"function_call-{name}",
        )
    )


@pytest.mark.parametrize("case", KILLERS)
def test_process_killers(victim: LiveServer, case: Case) -> None:
    booted = workers_booted(victim)
    try:
        check(case, live(victim, case))
    finally:
        assert_alive(victim, booted)


def test_long_word_is_refused_fast(victim: LiveServer) -> None:
    """200 kB without a space: far past any context, so a quick 400.

    llama.cpp's tokenizer is quadratic in the length of a word (100 kB of
    "a" take 2 s, 200 kB 8 s, 1 MB minutes; 1 MB of words, 0.2 s), and the
    prompt is tokenized before its length is checked, outside the model
    queue, in a thread that runs on after the client has given up.
    """
    booted = workers_booted(victim)
    case = bad(COMPLETIONS, {"prompt": "a" * 200_000, "max_tokens": 1}, "prompt")
    check(case, live(victim, case, timeout=3))
    assert_alive(victim, booted)
