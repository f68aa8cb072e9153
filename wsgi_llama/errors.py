"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

OpenAI clients read ``error.message`` and map the status to an exception
class, so every failure, from a bad field to an unknown route, uses this shape.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Response, jsonify
from werkzeug.exceptions import HTTPException, default_exceptions

log = logging.getLogger("wsgi_llama")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    503: "server_error",
}


class APIError(Exception):
    """An error a client receives as an OpenAI-shaped body with *status*."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "server_error")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> Response:
        response = jsonify(self.body())
        response.status_code = self.status
        response.headers.update(self.headers)
        return response


def from_http_exception(exc: HTTPException) -> APIError:
    status = exc.code or 500
    headers = dict(exc.get_headers())
    headers.pop("Content-Type", None)
    code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
    return APIError(
        exc.description or exc.name, status, code=code.get(status), headers=headers
    )


def from_exception(exc: BaseException) -> APIError:
    """An unexpected failure: logged in full, reported without internals."""
    log.error("request failed", exc_info=exc)
    return APIError("The server failed to process the request.", 500)


def register(app_or_blueprint: Any) -> None:
    """Send every error raised in *app_or_blueprint*'s views in OpenAI's shape."""
    app_or_blueprint.register_error_handler(APIError, APIError.response)
    http_error = lambda exc: from_http_exception(exc).response()  # noqa: E731
    app_or_blueprint.register_error_handler(HTTPException, http_error)
    # Flask prefers a handler for the status code, even the host app's, to a
    # blueprint's for the class: so one per code, to keep mounts OpenAI-shaped.
    for code in default_exceptions:
        app_or_blueprint.register_error_handler(code, http_error)
    app_or_blueprint.register_error_handler(
        Exception, lambda exc: from_exception(exc).response()
    )
