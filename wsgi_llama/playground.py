"""The chat playground: one page, its script and its style, shipped in the package.

``GET /`` under the API's mount serves the page. The page and its two files
need no API key: the page asks for the key and sends it with each API call.
Every URL in the page is relative, so it works under a blueprint prefix and
behind ``SCRIPT_NAME``. ``LLAMA_PLAYGROUND=0`` turns all of it into 404s.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from flask import Blueprint, Response, abort, jsonify, redirect, request, send_file

FILES = Path(__file__).with_name("playground")
ASSETS = {"app.js": "text/javascript", "style.css": "text/css"}

#: The playground's endpoints: for people, so not in /openapi.json.
ENDPOINTS = ("playground", "playground_asset", "playground_info")
#: Those served without an API key (info.json lists the models: it needs one).
OPEN_ENDPOINTS = ("playground", "playground_asset")

#: Nothing but this origin's own files and API; no inline code, no frames.
CSP = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "connect-src 'self'",
        "img-src 'self' data:",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)


def register(bp: Blueprint, server: Callable[[], Any]) -> None:
    """Add the playground's routes to *bp*; *server* gives the app's Server."""

    def enabled() -> None:
        if not server().settings.playground:
            abort(404)

    def page() -> Response:
        enabled()
        if request.environ.get("PATH_INFO", "") == "":
            # At ".../mount" without the slash, relative URLs would miss the mount.
            return redirect(request.script_root + "/", 308)
        response = Response((FILES / "index.html").read_bytes(), mimetype="text/html")
        response.headers["Cache-Control"] = "no-cache"
        return _harden(response)

    def asset(name: str) -> Response:
        enabled()
        if name not in ASSETS:
            abort(404)
        response = send_file(FILES / name, mimetype=ASSETS[name], max_age=0)
        return _harden(response)

    def info() -> Response:
        """What /v1/models does not say: which models have a chat template."""
        enabled()
        models = server().pool.models.values()
        return jsonify(
            {
                "models": {
                    m.alias: {"chat_template": has_chat_template(m), "n_ctx": m.n_ctx}
                    for m in models
                },
                "ping_interval": server().settings.ping_interval,
            }
        )

    bp.add_url_rule("/", "playground", page)
    bp.add_url_rule("/playground/info.json", "playground_info", info)
    bp.add_url_rule("/playground/<name>", "playground_asset", asset)


def has_chat_template(model: Any) -> bool:
    """Whether chat requests get the model's own format (Gemma 3 270M: no)."""
    metadata = model.llama.metadata or {}
    return bool(
        metadata.get("tokenizer.chat_template") or model.options.get("chat_format")
    )


def _harden(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response
