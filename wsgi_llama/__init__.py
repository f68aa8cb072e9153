"""wsgi-llama: an OpenAI-compatible llama.cpp server for WSGI.

``wsgi_llama:app`` is the ready application, configured from ``LLAMA_*``
environment variables. It is built on first access, so importing the package
to embed the API loads no model.
"""

from __future__ import annotations

from typing import Any

from .api import create_blueprint
from .config import ConfigError
from .factory import create_app

__all__ = ["ConfigError", "app", "create_app", "create_blueprint"]


def __getattr__(name: str) -> Any:
    if name == "app":
        app = create_app()
        globals()["app"] = app
        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
