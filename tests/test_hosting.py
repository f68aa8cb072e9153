"""``wsgi_llama.hosting.make_application``: settings the mod_wsgi/Passenger way.

The real servers are exercised by the deploy tests; here the WSGI callable is
driven as they drive it, with settings in an environment file, in
``os.environ`` and in the request's WSGI environ (where ``SetEnv`` puts them).
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from openai_schema import validate
from werkzeug.test import Client

from wsgi_llama import ConfigError, hosting
from wsgi_llama.config import read_env_file


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("LLAMA_MODEL", "LLAMA_MODEL_ALIAS", "LLAMA_PING_INTERVAL"):
        monkeypatch.delenv(key, raising=False)


def env_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "wsgi-llama.env"
    path.write_text(text)
    return path


def alias(app: Callable[..., Any], **environ: Any) -> str:
    response = Client(app).get("/v1/models", environ_base=environ)
    assert response.status_code == 200, response.get_data()
    return response.json["data"][0]["id"]


def test_env_file_syntax(tmp_path: Path, tiny_model: Path) -> None:
    (tmp_path / "models").mkdir()
    path = env_file(
        tmp_path,
        "# wsgi-llama settings\n\n"
        "LLAMA_MODEL=models/tiny.gguf\n"
        "export LLAMA_MODEL_ALIAS = 'my model'\n"
        'LLAMA_API_KEY="a=b#c"\n'
        "LLAMA_N_CTX=\n"
        "PYTHONPATH=/elsewhere\n",
    )
    assert read_env_file(path) == {
        "LLAMA_MODEL": str(tmp_path / "models/tiny.gguf"),  # beside the file
        "LLAMA_MODEL_ALIAS": "my model",
        "LLAMA_API_KEY": "a=b#c",
    }


@pytest.mark.parametrize(
    ("text", "key"),
    [("LLAMA_PING_INTERVALL=1\n", "LLAMA_PING_INTERVALL"), ("LLAMA_MODEL\n", ":1")],
)
def test_env_file_mistakes_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        read_env_file(env_file(tmp_path, text))
    assert key in caught.value.key


def test_settings_are_layered(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = env_file(tmp_path, f"LLAMA_MODEL={tiny_model}\nLLAMA_MODEL_ALIAS=file\n")
    assert alias(hosting.make_application(path)) == "file"
    monkeypatch.setenv("LLAMA_MODEL_ALIAS", "environment")
    assert alias(hosting.make_application(path)) == "environment"
    # SetEnv: in the WSGI environ of the first request, above everything.
    app = hosting.make_application(path)
    assert alias(app, LLAMA_MODEL_ALIAS="setenv") == "setenv"
    # Read once: later requests' environ changes nothing.
    assert alias(app, LLAMA_MODEL_ALIAS="later") == "setenv"


def test_app_is_built_on_the_first_request_only_once(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[Flask] = []
    real = hosting.create_app

    def counting(config: dict[str, Any]) -> Flask:
        built.append(real(config))
        return built[-1]

    monkeypatch.setattr(hosting, "create_app", counting)
    app = hosting.make_application()
    assert built == []  # nothing loads at import time
    environ = {"LLAMA_MODEL": str(tiny_model), "LLAMA_MODEL_ALIAS": "threads"}
    results: list[str] = []
    threads = [
        threading.Thread(target=lambda: results.append(alias(app, **environ)))
        for _ in range(6)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == ["threads"] * 6
    assert len(built) == 1


def test_bad_setting_answers_json_503_and_logs_once(tiny_model: Path) -> None:
    app = hosting.make_application()
    log = io.StringIO()
    environ = {"LLAMA_MODEL": str(tiny_model), "LLAMA_PING_INTERVAL": "often"}
    for path in ("/v1/models", "/v1/completions", "/anything", "/health"):
        response = Client(app).post(path, environ_base=environ, errors_stream=log)
        assert response.status_code == 503
        assert response.content_type == "application/json"
        error = response.json["error"]
        validate(response.json, "ErrorResponse")
        assert error["param"] == "LLAMA_PING_INTERVAL"
        assert error["code"] == "invalid_configuration"
        assert "'often'" in error["message"] and "restart" in error["message"]
    assert log.getvalue().count("LLAMA_PING_INTERVAL") == 1
    assert log.getvalue().startswith("wsgi-llama: LLAMA_PING_INTERVAL:")


def test_missing_env_file_is_a_configuration_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.env"
    app = hosting.make_application(missing)
    response = Client(app).get("/health", errors_stream=io.StringIO())
    assert response.status_code == 503
    assert response.json["error"]["param"] == str(missing)
    assert "cannot read" in response.json["error"]["message"]


def test_missing_model_names_the_key(tmp_path: Path) -> None:
    app = hosting.make_application()
    environ = {"LLAMA_MODEL": str(tmp_path / "gone.gguf")}
    response = Client(app).get(
        "/v1/models", environ_base=environ, errors_stream=io.StringIO()
    )
    assert response.status_code == 503
    assert response.json["error"]["param"] == "LLAMA_MODEL"
    assert "does not exist" in response.json["error"]["message"]
