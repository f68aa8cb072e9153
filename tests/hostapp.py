"""A host Flask app with two wsgi-llama mounts, as a user's app would embed it.

``/a`` sends heartbeats every 0.2 s and needs an API key; ``/b`` sends none
and calls the same model file by another name. The model path comes from
``LLAMA_MODEL``. Served by ``tests/test_mounts.py`` under ``gunicorn -k gevent
"tests.hostapp:create_host()"``.
"""

from __future__ import annotations

import os

from flask import Flask

from wsgi_llama import create_blueprint


def create_host(model: str | None = None) -> Flask:
    host = Flask("host")
    host.config["LLAMA_MODEL"] = model or os.environ["LLAMA_MODEL"]
    host.config["LLAMA_N_CTX"] = 1024
    host.config["LLAMA_N_THREADS"] = 1
    host.config["LLAMA_MIN_PING_INTERVAL"] = 0.05

    @host.get("/")
    def index() -> str:
        return "host page"

    @host.errorhandler(404)
    def not_found(_: Exception) -> tuple[str, int]:
        return "<h1>host 404</h1>", 404

    host.register_blueprint(
        create_blueprint(
            {"LLAMA_PING_INTERVAL": 0.2, "LLAMA_API_KEY": "key-a"}, name="a"
        ),
        url_prefix="/a",
    )
    host.register_blueprint(
        create_blueprint(
            {"LLAMA_PING_INTERVAL": 0, "LLAMA_MODEL_ALIAS": "tiny-b"}, name="b"
        ),
        url_prefix="/b",
    )
    return host
