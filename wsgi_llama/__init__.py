"""wsgi-llama: an OpenAI-compatible llama.cpp server for WSGI.

``wsgi_llama:app`` is the ready application, configured from ``LLAMA_*``
environment variables. It is built on first access, so importing the package
to embed the API loads no model; if its settings are invalid, it prints why
and exits with status 3. :func:`create_app` raises :class:`ConfigError`.
For mod_wsgi and Passenger, :func:`make_application` takes its settings from
the first request's environ (``SetEnv``) and answers a bad one with a 503.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from .api import create_blueprint
from .config import ConfigError
from .factory import WsgiLlama, create_app
from .hosting import make_application

__all__ = [
    "ConfigError",
    "WsgiLlama",
    "app",
    "create_app",
    "create_blueprint",
    "make_application",
]


def __getattr__(name: str) -> Any:
    if name == "app":
        try:
            app = create_app()
        except ConfigError as exc:
            # For WSGI servers: one line that says what to set, not a traceback;
            # 3 is gunicorn's "worker failed to boot", which stops the master.
            # One write: several workers may fail at once.
            sys.stderr.flush()
            os.write(2, f"wsgi-llama: {exc}\n".encode())
            raise SystemExit(3) from None
        globals()["app"] = app
        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
