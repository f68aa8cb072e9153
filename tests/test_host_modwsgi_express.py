"""deploy/mod_wsgi-express.sh, run for real: Apache and mod_wsgi from PyPI.

The ``mod-wsgi`` package compiles against Debian's apache2-dev and the system
Python's headers, into a venv of the system Python (cached like the app's).
Settings arrive by ``--setenv``; the script's timeouts let long streams live.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hosts.client import post, stream
from hosts.fixtures import public, public_model  # noqa: F401
from hosts.packages import need
from hosts.pythonenv import system_venv
from hosts.servers import DEPLOY, Server, free_port, publish, write_public

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="Debian packages"
)


@pytest.fixture(scope="module")
def express(
    public: Path,  # noqa: F811
    public_model: Path,  # noqa: F811
) -> Iterator[Server]:
    need("apache2", "apache2-dev", "python3-dev")
    venv = system_venv("express", "mod-wsgi")
    app = public / "app"
    publish(DEPLOY / "wsgi_llama.wsgi", app / "wsgi_llama.wsgi")
    port = free_port()
    script = (DEPLOY / "mod_wsgi-express.sh").read_text()
    for old, new in {
        "/srv/wsgi-llama/venv": str(venv),
        "/srv/wsgi-llama/app": str(app),
        "/srv/wsgi-llama/express": str(public / "server-root"),
        "/srv/wsgi-llama/models/gemma-3-270m-q4_k_m.gguf": str(public_model),
        "--port 8000": f"--port {port}",
        "--setenv LLAMA_N_THREADS 2": "--setenv LLAMA_N_THREADS 1",
        "--setenv LLAMA_PING_INTERVAL 15": (
            "--setenv LLAMA_PING_INTERVAL 0.3 --setenv LLAMA_N_CTX 4096 "
            "--setenv LLAMA_MODEL_ALIAS from-setenv"
        ),
    }.items():
        assert old in script, f"{old!r} is no longer in the deploy script"
        script = script.replace(old, new)
    start = write_public(public / "express.sh", script)
    # Started from a directory the daemon's user cannot enter, as from /root:
    # the script must name the daemon's working directory itself.
    private = Path(tempfile.mkdtemp())
    command = ["sh", "-c", f'cd "{private}" && exec sh "{start}"']
    server = Server(public, command, [port])
    server.name = "mod_wsgi-express"
    try:
        server.wait_ready(timeout=120)
        yield server
    finally:
        server.stop()
        private.rmdir()


def test_settings_come_from_setenv(express: Server) -> None:
    models = httpx.get(express.url() + "/v1/models", timeout=30).json()["data"]
    assert [m["id"] for m in models] == ["from-setenv"]
    response = post(express.url(), {"prompt": "ab" * 1200, "max_tokens": 2})
    assert response.status_code == 200, response.text  # LLAMA_N_CTX=4096


def test_stream_heartbeat_first_then_tokens(express: Server) -> None:
    got = stream(express.url(), {"prompt": "xy" * 1500, "max_tokens": 1000})
    got.check_framing()
    assert got.frames[0][1] == b": ping"
    assert got.frames[0][0] < got.events[0][0]
    assert got.events[0][0] < got.events[-1][0]
    assert len(got.text) == 1000
    print(
        f"mod_wsgi-express: headers after {got.headers_at:.3f} s, first token "
        f"{got.events[0][0]:.3f} s, [DONE] {got.frames[-1][0]:.3f} s"
    )
