"""Hostile requests and API keys on Gemma 3 270M, as a new user would try them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import LiveServer
from openai_schema import validate

pytestmark = pytest.mark.gemma

KEY = "sk-local-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}

# (path, body or raw bytes, expected status). Several of these kill
# llama-cpp-python's own server: negative or huge token ids, bad grammars.
HOSTILE: list[tuple[str, Any, int]] = [
    ("/extras/detokenize", {"tokens": [-1]}, 400),
    ("/extras/detokenize", {"tokens": [2**40]}, 400),
    ("/v1/completions", {"prompt": [1, -5], "max_tokens": 2}, 400),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"999999999": 5}}, 400),
    ("/v1/completions", {"prompt": "x", "grammar": "root ::= ("}, 400),
    ("/v1/completions", {"prompt": "x", "grammar": 'root ::= "\\x00"'}, 400),
    (
        "/v1/chat/completions",
        {
            **CHAT,
            "response_format": {
                "type": "json_object",
                "schema": {"type": "string", "minLength": 10**9},
            },
        },
        400,
    ),
    (
        "/v1/chat/completions",
        {**CHAT, "messages": [{"role": "bot", "content": "x"}]},
        400,
    ),
    ("/v1/chat/completions", {**CHAT, "temperature": "hot"}, 400),
    ("/v1/completions", {"prompt": "word " * 5000, "max_tokens": 1}, 400),
    ("/v1/completions", {"prompt": "a" * 300_000, "max_tokens": 1}, 400),
    ("/v1/completions", b'{"prompt": "unterminated', 400),
    ("/v1/completions", b"[1, 2, 3]", 400),
    ("/v1/completions", b'{"prompt": "\\ud800"}', 400),
    ("/v1/completions", b"\xff\xfe\x00", 400),
    ("/v1/completions", b"[" * 10000 + b"]" * 10000, 400),
    ("/v1/embeddings", {"input": "x"}, 400),  # not loaded for embeddings
]


@pytest.fixture(scope="module")
def locked(start_server: Callable[..., LiveServer], gemma_model: Path) -> LiveServer:
    return start_server(LLAMA_MODEL=str(gemma_model), LLAMA_API_KEY=KEY)


def post(live: LiveServer, path: str, body: Any, **headers: str) -> httpx.Response:
    raw = body if isinstance(body, bytes) else None
    return httpx.post(
        live.url + path,
        json=None if raw is not None else body,
        content=raw,
        headers={"Content-Type": "application/json", **headers},
        timeout=120,
    )


# The generation requests again, streamed: the errors must come before the stream.
CASES = HOSTILE + [
    (path, {**body, "stream": True}, status)
    for path, body, status in HOSTILE
    if isinstance(body, dict) and path.startswith("/v1/c")
]


@pytest.mark.parametrize(("path", "body", "status"), CASES)
def test_hostile_requests_get_clean_4xx(
    locked: LiveServer, path: str, body: Any, status: int
) -> None:
    response = post(locked, path, body, **AUTH)
    assert response.status_code == status, response.text
    validate(response.json(), "ErrorResponse")
    assert httpx.get(locked.url + "/health", timeout=10).status_code == 200


def test_server_still_serves_after_the_battery(locked: LiveServer) -> None:
    response = post(
        locked, "/v1/completions", {"prompt": "Hello", "max_tokens": 4}, **AUTH
    )
    assert response.status_code == 200
    validate(response.json(), "CreateCompletionResponse")
    assert "WORKER TIMEOUT" not in locked.log.read_text()
    assert "Booting worker" in locked.log.read_text()
    assert locked.log.read_text().count("Booting worker") == 1  # never restarted


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}])
@pytest.mark.parametrize("streaming", [False, True])
def test_api_key_enforced_on_plain_and_streaming(
    locked: LiveServer, headers: dict[str, str], streaming: bool
) -> None:
    for path, body in (
        ("/v1/chat/completions", {**CHAT, "stream": streaming}),
        ("/v1/completions", {"prompt": "Hi", "max_tokens": 2, "stream": streaming}),
    ):
        response = post(locked, path, body, **headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(locked.url + "/v1/models", headers=headers).status_code == 401
    ok = post(locked, "/v1/chat/completions", {**CHAT, "stream": streaming}, **AUTH)
    assert ok.status_code == 200
