"""Requests through a host, with the time each SSE frame arrived."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

PING = b": ping"
DONE = b"data: [DONE]"


@dataclass
class Stream:
    """A streamed response: its frames and when each arrived (seconds after
    the request was sent); ``frames`` stops short if the client dropped it."""

    status: int
    headers: httpx.Headers
    started: float  # time.monotonic() when the request was sent
    headers_at: float
    frames: list[tuple[float, bytes]] = field(default_factory=list)
    body: bytes = b""
    cut: bool = False  # closed by the server before the body's end

    @property
    def done(self) -> bool:
        return bool(self.frames) and self.frames[-1][1] == DONE

    @property
    def pings(self) -> list[float]:
        return [at for at, frame in self.frames if frame == PING]

    @property
    def events(self) -> list[tuple[float, dict[str, Any]]]:
        return [
            (at, json.loads(frame[len(b"data: ") :]))
            for at, frame in self.frames
            if frame.startswith(b"data: {")
        ]

    @property
    def text(self) -> str:
        return "".join(
            event["choices"][0].get("text", "")
            for _, event in self.events
            if event.get("choices")
        )

    def check_framing(self) -> None:
        """Every frame is a ping or one data event; the last is [DONE]."""
        assert self.done, self.frames[-3:]
        for _, frame in self.frames[:-1]:
            assert frame == PING or (
                frame.startswith(b"data: {") and b"\n" not in frame
            ), frame


def stream(
    url: str,
    body: dict[str, Any],
    *,
    path: str = "/v1/completions",
    headers: dict[str, str] | None = None,
    stop: Callable[[Stream], bool] | None = None,
    timeout: float = 120,
) -> Stream:
    """POST a streaming request and read it to the end, or until *stop* says
    so (then the connection is closed: the client went away)."""
    started = time.monotonic()
    with (
        httpx.Client(timeout=timeout) as client,
        client.stream(
            "POST", url + path, json={**body, "stream": True}, headers=headers
        ) as response,
    ):
        result = Stream(
            response.status_code,
            response.headers,
            started,
            time.monotonic() - started,
        )
        buffer = b""
        try:
            for chunk in response.iter_raw():
                result.body += chunk
                buffer += chunk
                while b"\n\n" in buffer:
                    frame, buffer = buffer.split(b"\n\n", 1)
                    result.frames.append((time.monotonic() - started, frame))
                    if stop is not None and stop(result):
                        return result
        except httpx.RemoteProtocolError:  # the server cut the stream
            result.cut = True
    return result


def post(
    url: str, body: dict[str, Any], path: str = "/v1/completions", **kwargs: Any
) -> httpx.Response:
    return httpx.post(
        url + path, json=body, timeout=kwargs.pop("timeout", 120), **kwargs
    )


def timed(url: str, body: dict[str, Any], path: str = "/v1/completions") -> float:
    """Seconds a non-streaming request takes; it must succeed."""
    started = time.monotonic()
    response = post(url, body, path)
    assert response.status_code == 200, response.text
    return time.monotonic() - started


def check_openai_error(
    response: httpx.Response, status: int, param: str | None
) -> None:
    """A JSON error in OpenAI's shape whose ``param`` is *param*."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}, error
    assert error["param"] == param, error
    if param is not None:
        assert param in error["message"], error


def hold(
    url: str,
    tokens: int = 1000,
    release: threading.Event | None = None,
    path: str = "/v1/completions",
    **extra: Any,
) -> tuple[threading.Thread, list[Stream]]:
    """A long stream in a thread; returns once its first token has arrived.

    Its client leaves (freeing its room) once *release* is set. *extra* goes
    into the body: ``suffix=""`` keeps it off the batching engine, so it holds
    the whole model and others wait behind it whatever LLAMA_PARALLEL is.
    """
    started = threading.Event()
    result: list[Stream] = []

    def first_token(got: Stream) -> bool:
        if got.events:
            started.set()
        return release is not None and release.is_set()

    def run() -> None:
        body = {"prompt": "hold", "max_tokens": tokens, **extra}
        try:
            result.append(stream(url, body, path=path, stop=first_token))
        finally:
            started.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(120)
    return thread, result
