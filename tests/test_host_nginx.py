"""nginx in front of two gunicorn backends (deploy/nginx.conf), for real.

Debian's nginx with the deploy file's upstream and location, ports replaced;
the backends are ``gunicorn -k gevent wsgi_llama:app`` configured by
environment variables, as deploy/wsgi-llama@.service starts them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import REPO, LiveServer
from hosts.client import Stream, hold, post, stream, timed
from hosts.packages import need
from hosts.servers import DEPLOY, Nginx, deploy_file, free_port, public_dir
from live_server import gunicorn_command  # conftest puts benchmarks/ on the path

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="Debian packages"
)

Start = Callable[..., LiveServer]
PING_INTERVAL = 0.2
# The test's proxy_read_timeout: ten heartbeat intervals (a loaded machine
# can delay one heartbeat by a few intervals).
READ_TIMEOUT = 2


def site(upstream: str, listen: int, backends: tuple[int, int], read: str) -> str:
    """deploy/nginx.conf on loopback ports, its upstream named *upstream*."""
    return deploy_file(
        "nginx.conf",
        {
            "upstream wsgi_llama {": f"upstream {upstream} {{",
            "proxy_pass http://wsgi_llama;": f"proxy_pass http://{upstream};",
            "listen 80;": f"listen 127.0.0.1:{listen};",
            "server 127.0.0.1:8001": f"server 127.0.0.1:{backends[0]}",
            "server 127.0.0.1:8002": f"server 127.0.0.1:{backends[1]}",
            "proxy_read_timeout 600s;": f"proxy_read_timeout {read};",
        },
    )


def bad_backend(tiny_model: Path) -> tuple[int, subprocess.CompletedProcess[str]]:
    """gunicorn with a bad setting: it exits with status 3, its port closed."""
    port = free_port()
    result = subprocess.run(
        gunicorn_command(f"127.0.0.1:{port}"),
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("LLAMA_")},
            "LLAMA_MODEL": str(tiny_model),
            "LLAMA_PING_INTERVAL": "soon",
        },
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return port, result


@pytest.fixture(scope="module")
def backends(start_server: Start) -> tuple[LiveServer, LiveServer]:
    settings = {
        "LLAMA_PING_INTERVAL": str(PING_INTERVAL),
        "LLAMA_MIN_PING_INTERVAL": "0.05",
        "LLAMA_N_THREADS": "1",
    }
    # With deploy/gunicorn.conf.py, as deploy/wsgi-llama@.service runs them
    # (its -b on the command line wins over the file's BIND).
    conf = ("-c", str(DEPLOY / "gunicorn.conf.py"))
    return (
        start_server(*conf, LLAMA_MODEL_ALIAS="backend-a", **settings),
        start_server(*conf, LLAMA_MODEL_ALIAS="backend-b", **settings),
    )


@pytest.fixture(scope="module")
def bad(tiny_model: Path) -> tuple[int, subprocess.CompletedProcess[str]]:
    return bad_backend(tiny_model)


@pytest.fixture(scope="module")
def nginx(
    backends: tuple[LiveServer, LiveServer],
    bad: tuple[int, subprocess.CompletedProcess[str]],
) -> Iterator[Nginx]:
    need("nginx")
    a, b = backends
    ports = [free_port(), free_port(), free_port()]
    http = "\n".join(
        [
            # The deploy file as it is (but on loopback ports).
            site("wsgi_llama", ports[0], (a.port, b.port), "600s"),
            # One backend dead from a bad setting: nginx uses the other.
            site("with_dead", ports[1], (bad[0], b.port), "600s"),
            # Both entries one backend, and a short read timeout, to show
            # that heartbeats are what keeps a waiting stream open.
            site("one", ports[2], (a.port, a.port), f"{READ_TIMEOUT * 1000:.0f}ms"),
        ]
    )
    with public_dir("wsgi-llama-nginx-") as root:
        server = Nginx(root, http, ports)
        try:
            for index in range(3):
                server.wait_ready(index=index)
            yield server
        finally:
            server.stop()


def model_of(got: Stream) -> str:
    return got.events[0][1]["model"]


def test_stream_through_nginx_heartbeat_first_then_tokens(nginx: Nginx) -> None:
    got = stream(nginx.url(), {"prompt": "xy" * 1500, "max_tokens": 300})
    got.check_framing()
    assert got.headers["content-type"].startswith("text/event-stream")
    assert got.frames[0][1] == b": ping"
    assert got.frames[0][0] < got.events[0][0]
    # Tokens as produced, not in one piece at the end.
    assert got.events[0][0] < got.events[-1][0]
    assert len(got.text) == 300
    print(
        f"nginx: headers after {got.headers_at:.3f} s, first token "
        f"{got.events[0][0]:.3f} s, [DONE] {got.frames[-1][0]:.3f} s"
    )


def test_settings_from_the_environment_and_both_backends_serve(
    nginx: Nginx,
) -> None:
    seen = set()
    for _ in range(4):
        response = httpx.get(nginx.url() + "/v1/models", timeout=30)
        seen.update(m["id"] for m in response.json()["data"])
    assert seen == {"backend-a", "backend-b"}


def test_two_concurrent_streams_go_to_two_backends(nginx: Nginx) -> None:
    holder, held = hold(nginx.url(), suffix="")
    other = stream(nginx.url(), {"prompt": "other", "max_tokens": 100})
    holder.join(120)
    (first,) = held
    first.check_framing()
    other.check_framing()
    # least_conn: the busy backend's neighbour took the second.
    assert {model_of(first), model_of(other)} == {"backend-a", "backend-b"}
    # So the second did not wait for the first.
    assert other.started + other.frames[-1][0] < first.started + first.frames[-1][0]


def test_a_backend_down_from_a_bad_setting_leaves_the_other_serving(
    nginx: Nginx, bad: tuple[int, subprocess.CompletedProcess[str]]
) -> None:
    _, result = bad
    assert result.returncode == 3, result.stderr[-2000:]
    assert "LLAMA_PING_INTERVAL" in result.stderr
    for _ in range(4):
        response = post(nginx.url(1), {"prompt": "x", "max_tokens": 3})
        assert response.status_code == 200, response.text
        assert response.json()["model"] == "backend-b"


def test_a_client_that_goes_away_frees_its_backend(
    nginx: Nginx, backends: tuple[LiveServer, LiveServer]
) -> None:
    dropped = stream(
        nginx.url(),
        {"prompt": "leave", "max_tokens": 4000},
        stop=lambda s: len(s.events) >= 200,
    )
    assert not dropped.done
    times = [at for at, _ in dropped.events]
    remaining = (times[-1] - times[0]) / 199 * 3800
    by_alias = {"backend-a": backends[0], "backend-b": backends[1]}
    backend = by_alias[model_of(dropped)]
    took = timed(backend.url, {"prompt": "next", "max_tokens": 10})
    assert took < remaining / 2, (took, remaining)


def test_heartbeats_keep_a_waiting_stream_past_the_read_timeout(
    nginx: Nginx, backends: tuple[LiveServer, LiveServer]
) -> None:
    # The model is busy for longer than nginx's proxy_read_timeout: a waiting
    # stream with heartbeats survives, one without them is cut.
    release = threading.Event()
    with ThreadPoolExecutor(2) as pool:
        holder, _ = hold(backends[0].url, 4000, release, suffix="")
        kept = pool.submit(stream, nginx.url(2), {"prompt": "a", "max_tokens": 5})
        silent = pool.submit(
            stream,
            nginx.url(2),
            {"prompt": "b", "max_tokens": 5, "sse_ping_interval": 0},
        )
        silent_stream = silent.result()
        release.set()  # the holder leaves once the silent stream is cut
        kept_stream = kept.result()
        holder.join(120)
    kept_stream.check_framing()
    waited = kept_stream.events[0][0]
    assert waited > READ_TIMEOUT, "the model was not busy long enough"
    assert silent_stream.cut and not silent_stream.done, silent_stream.frames
    log = (nginx.root / "error.log").read_text()
    assert "upstream timed out" in log, log[-2000:]
