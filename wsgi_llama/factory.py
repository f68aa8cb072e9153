"""The application factory."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from flask import Flask

from . import errors
from .api import create_blueprint
from .config import DEFAULTS, from_environ


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build the standalone server.

    :param config: ``LLAMA_*`` keys (see README.rst); when None, they are read
        from environment variables of the same names.
    :raises ConfigError: a setting is invalid; the message names the key.
    """
    app = Flask("wsgi_llama")
    app.config.from_mapping(DEFAULTS)
    app.config.from_mapping(from_environ() if config is None else config)
    app.json.sort_keys = False  # type: ignore[attr-defined]
    # Unknown routes and methods get OpenAI-shaped errors too.
    errors.register(app)
    app.register_blueprint(create_blueprint())
    if not logging.getLogger("wsgi_llama").handlers:
        logging.getLogger("wsgi_llama").setLevel(logging.INFO)
    return app


class WsgiLlama:
    """The API as a Flask extension, for apps built with ``init_app``.

    ``WsgiLlama(app, url_prefix="/llm", LLAMA_PING_INTERVAL=0)`` is
    ``app.register_blueprint(create_blueprint({...}, url_prefix="/llm"))``;
    several instances are several mounts, each with its own ``name``.
    """

    def __init__(
        self,
        app: Flask | None = None,
        *,
        name: str = "wsgi_llama",
        url_prefix: str | None = None,
        **config: Any,
    ) -> None:
        self.blueprint = create_blueprint(config, name, url_prefix)
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Mount the API on *app*; this loads its models (ConfigError if bad)."""
        app.register_blueprint(self.blueprint)
