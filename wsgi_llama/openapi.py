"""The OpenAPI document describing this server's API (served at /openapi.json)."""

from __future__ import annotations

from typing import Any


def document(server_url: str = "") -> dict[str, Any]:
    raise NotImplementedError
