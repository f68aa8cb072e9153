"""The entry point for servers that hand settings over per request: mod_wsgi, Passenger.

Apache's ``SetEnv`` and ``mod_wsgi-express --setenv`` put variables in each
request's WSGI environ, not in ``os.environ``, so an app built at import would
never see them. :func:`make_application` builds the app on the first request
instead, from (lowest first) the defaults, an environment file beside the
entry file, ``os.environ`` (Passenger's ``passenger_env_var``) and that first
request's environ. A bad setting does not kill the process (mod_wsgi would
answer HTML 500s forever, Passenger "could not be started"): every request
gets a JSON 503 naming the key, and the reason is logged once.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import traceback
from collections.abc import Callable, Iterable
from typing import Any

from .config import ConfigError, from_environ, read_env_file
from .errors import APIError
from .factory import create_app

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

RESTART = "Fix the setting, then restart the application (settings are read once)."


def make_application(config_file: str | os.PathLike[str] | None = None) -> WSGIApp:
    """A WSGI application that configures itself on its first request.

    :param config_file: an environment file of ``LLAMA_KEY=value`` lines
        (``#`` comments, optional quotes); one named but missing is a
        configuration error like any other bad setting.
    """
    return _DeferredApp(config_file)


def hosted_settings(
    config_file: str | os.PathLike[str] | None, environ: dict[str, Any]
) -> dict[str, Any]:
    """The ``LLAMA_*`` keys, layered: file < ``os.environ`` < WSGI environ."""
    settings: dict[str, Any] = {}
    if config_file is not None:
        settings.update(read_env_file(config_file))
    settings.update(from_environ())
    settings.update(
        from_environ({k: v for k, v in environ.items() if isinstance(v, str)})
    )
    return settings


class _DeferredApp:
    def __init__(self, config_file: str | os.PathLike[str] | None) -> None:
        self.config_file = config_file
        self._app: WSGIApp | None = None
        self._lock = threading.Lock()

    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        app = self._app
        if app is None:
            with self._lock:  # threaded servers: one build, the rest wait for it
                if self._app is None:
                    self._app = self._build(environ)
                app = self._app
        return app(environ, start_response)

    def _build(self, environ: dict[str, Any]) -> WSGIApp:
        try:
            return create_app(hosted_settings(self.config_file, environ))
        except ConfigError as exc:
            _log(environ, f"wsgi-llama: {exc}. {RESTART}")
            error = APIError(
                f"wsgi-llama is not configured: {exc}. {RESTART}",
                503,
                param=exc.key,
                code="invalid_configuration",
            )
        except Exception:
            _log(environ, "wsgi-llama failed to start:\n" + traceback.format_exc())
            error = APIError(
                "wsgi-llama failed to start; the reason is in the server's error "
                "log. Restart the application once it is fixed.",
                503,
                code="startup_failed",
            )
        return _unavailable(error)


def _log(environ: dict[str, Any], message: str) -> None:
    """Write to the server's error log (mod_wsgi: Apache's; Passenger: its log)."""
    stream = environ.get("wsgi.errors") or sys.stderr
    try:
        stream.write(message.rstrip("\n") + "\n")
        stream.flush()
    except (OSError, ValueError):
        pass


def _unavailable(error: APIError) -> WSGIApp:
    body = json.dumps(error.body()).encode()
    headers = [
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(body))),
        ("Cache-Control", "no-store"),
    ]

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        start_response("503 Service Unavailable", headers)
        return [b"" if environ.get("REQUEST_METHOD") == "HEAD" else body]

    return app
