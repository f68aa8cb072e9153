"""``gunicorn -k gevent wsgi_llama:app`` in a subprocess, as users run it.

Shared by the test suite (tests/conftest.py) and the benchmark scripts.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def gunicorn_command(bind: str, *args: str, app: str = "wsgi_llama:app") -> list[str]:
    """The command users run: ``gunicorn -k gevent -b BIND ... wsgi_llama:app``."""
    return [
        sys.executable,
        "-m",
        "gunicorn",
        "-k",
        "gevent",
        "-b",
        bind,
        *args,
        app,
    ]


class LiveServer:
    """A gunicorn server on a free port, logging to *log*; ready once built.

    *app* is the WSGI application to serve; *health* a path answering 200.
    """

    def __init__(
        self,
        env: dict[str, str],
        log: Path,
        *args: str,
        app: str = "wsgi_llama:app",
        health: str = "/health",
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                gunicorn_command(f"127.0.0.1:{self.port}", *args, app=app),
                env={**os.environ, **env},
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )
        self._wait_ready(health)

    def _wait_ready(self, health: str) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gunicorn exited:\n{self.log.read_text()}")
            try:
                if httpx.get(self.url + health, timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"gunicorn did not start:\n{self.log.read_text()}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(35)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
