"""SIGTERM mid-stream under ``gunicorn -k gevent``: what systemd and Kubernetes send.

gunicorn stops accepting, lets running requests go on for ``--graceful-timeout``
seconds, then kills the worker. A stream that finishes in time ends as usual;
one that would not ends shortly before the kill with one ``data: {"error":
...}`` event and a properly closed response, never with a half-written frame.
"""

from __future__ import annotations

import json
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import LiveServer
from openai_schema import validate

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="POSIX signals"
)

ONE_THREAD = {"LLAMA_N_THREADS": "1"}


def start(tmp_path: Path, tiny_model: Path, *args: str) -> LiveServer:
    env = {"LLAMA_MODEL": str(tiny_model), "LLAMA_N_CTX": "8192", **ONE_THREAD}
    return LiveServer(env, tmp_path / "server.log", *args)


def open_stream(server: LiveServer, body: dict[str, Any]) -> socket.socket:
    payload = json.dumps({**body, "stream": True}).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: test\r\n"
        b"Content-Type: application/json\r\n"
        + f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    return sock


def read_until(sock: socket.socket, marker: bytes, timeout: float = 60) -> bytes:
    sock.settimeout(timeout)
    received = b""
    while marker not in received:
        chunk = sock.recv(65536)
        if not chunk:
            break
        received += chunk
    return received


def read_to_close(sock: socket.socket, received: bytes, timeout: float = 120) -> bytes:
    sock.settimeout(timeout)
    while chunk := sock.recv(65536):
        received += chunk
    sock.close()
    return received


def unchunk(raw: bytes) -> tuple[bytes, bool]:
    """The body of a chunked response, and whether its last chunk came."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert b"transfer-encoding: chunked" in head.lower(), head
    body = b""
    while rest:
        size, sep, rest = rest.partition(b"\r\n")
        if not sep:
            break
        n = int(size, 16)
        if n == 0:
            return body, True
        if len(rest) < n + 2:
            body += rest[:n]  # cut inside a chunk
            break
        body += rest[:n]
        rest = rest[n + 2 :]
    return body, False


def events(body: bytes) -> list[bytes]:
    """The SSE frames of *body*, each whole: no frame may be cut short."""
    assert body.endswith(b"\n\n"), f"half-written frame: {body[-120:]!r}"
    frames = body[:-2].split(b"\n\n")
    for frame in frames:
        assert frame == b": ping" or frame.startswith(b"data: "), frame[:120]
        if frame.startswith(b"data: {"):
            json.loads(frame[len(b"data: ") :])
    return frames


def test_short_stream_finishes_after_sigterm(tmp_path: Path, tiny_model: Path) -> None:
    # Well within the timeout, even on a loaded machine (~1 s when idle).
    server = start(tmp_path, tiny_model, "--graceful-timeout", "60")
    try:
        sock = open_stream(server, {"prompt": "Hi", "max_tokens": 600})
        received = read_until(sock, b"data: {")
        assert b"[DONE]" not in received
        server.process.send_signal(signal.SIGTERM)
        raw = read_to_close(sock, received)
        body, complete = unchunk(raw)
        assert complete, raw[-200:]
        frames = events(body)
        assert frames[-1] == b"data: [DONE]"
        text = "".join(
            json.loads(f[len(b"data: ") :])["choices"][0]["text"]
            for f in frames
            if f.startswith(b"data: {")
        )
        assert len(text) == 600
        assert server.process.wait(60) == 0
        assert "Worker exiting" in server.log.read_text()
    finally:
        server.stop()


@pytest.mark.parametrize("path", ["engine", "whole-model"])
def test_long_stream_ends_with_an_error_event_before_the_kill(
    tmp_path: Path, tiny_model: Path, path: str
) -> None:
    """On the batching engine, and on the path that holds the whole model.

    Beside the long stream, a second one: with the engine it runs beside the
    first; behind a whole-model request it waits in the queue, heartbeats off.
    """
    graceful = 3.0
    server = start(tmp_path, tiny_model, "--graceful-timeout", str(int(graceful)))
    try:
        # Runs to the end of the 8192-token context: far longer than 3 s. A
        # suffix keeps a request off the engine: it holds the whole model.
        first: dict[str, Any] = {"prompt": "Hi", "max_tokens": 8000}
        if path == "whole-model":
            first["suffix"] = ""
        sock = open_stream(server, first)
        received = read_until(sock, b"data: {")
        second = open_stream(
            server, {"prompt": "Q", "max_tokens": 8000, "sse_ping_interval": 0}
        )
        second_head = read_until(second, b"\r\n\r\n")
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        raw = read_to_close(sock, received)
        closed = time.monotonic() - signalled
        for got in (raw, read_to_close(second, second_head)):
            body, complete = unchunk(got)
            frames = events(body)
            assert complete, (closed, frames[-2:])
            error = json.loads(frames[-1][len(b"data: ") :])
            validate(error, "ErrorResponse")
            assert error["error"]["code"] == "server_shutting_down"
        if path == "whole-model":
            assert len(frames) == 1  # the queued one: nothing but the error
        assert server.process.wait(30) == 0
        log = server.log.read_text()
        # The worker exited by itself, before gunicorn's kill.
        assert "Worker exiting" in log, log[-2000:]
        print(f"stream ended {closed:.2f} s after SIGTERM (graceful {graceful} s)")
    finally:
        server.stop()
