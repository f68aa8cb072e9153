"""wsgi-llama under real Apache + Phusion Passenger (deploy/apache-passenger.conf).

Debian's apache2 and libapache2-mod-passenger, the system Python's venv, the
deploy file with paths and ports replaced, ``passenger_wsgi.py`` in the app
root, and a second app whose setting is bad. Passenger gives each process one
request at a time, so concurrency means processes (model copies).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from hosts.client import check_openai_error, hold, post, stream, timed
from hosts.fixtures import app_venv, public, public_model  # noqa: F401
from hosts.packages import need
from hosts.servers import DEPLOY, Apache, deploy_file, free_port, publish, write_public

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="Debian packages"
)

PING_INTERVAL = 0.3

SERVER = """\
PassengerRoot /usr/lib/ruby/vendor_ruby/phusion_passenger/locations.ini
PassengerDefaultRuby /usr/bin/ruby
PassengerInstanceRegistryDir {root}/registry
PassengerDataBufferDir {root}/buffers
PassengerLogFile {root}/passenger.log
# Each app at most two processes, whatever the pool allows the server.
PassengerMaxInstancesPerApp 2
"""

BAD_APP = """\
<VirtualHost 127.0.0.1:{port}>
    DocumentRoot {app}/public
    PassengerAppRoot {app}
    PassengerAppType wsgi
    PassengerStartupFile passenger_wsgi.py
    PassengerPython {venv}/bin/python
    PassengerUser www-data
    PassengerGroup www-data
    PassengerFriendlyErrorPages off
    SetEnv LLAMA_MODEL {model}
    SetEnv LLAMA_PING_INTERVAL soon
    <Directory {app}/public>
        Require all granted
    </Directory>
</VirtualHost>
"""


def make_app_root(path: Path, env: str = "") -> Path:
    publish(DEPLOY / "passenger_wsgi.py", path / "passenger_wsgi.py")
    (path / "public").mkdir(mode=0o755, parents=True, exist_ok=True)
    if env:
        write_public(path / "wsgi-llama.env", env)
    return path


@pytest.fixture(scope="module")
def passenger(
    app_venv: Path,  # noqa: F811
    public: Path,  # noqa: F811
    public_model: Path,  # noqa: F811
) -> Iterator[Apache]:
    need("apache2", "libapache2-mod-passenger")
    app = make_app_root(
        public / "app", "LLAMA_MODEL_ALIAS=from-file\nLLAMA_N_CTX=4096\n"
    )
    bad = make_app_root(public / "bad")
    root = public / "apache"
    for sub in ("registry", "buffers"):
        (root / sub).mkdir(mode=0o755, parents=True)
    ports = [free_port(), free_port()]
    site = deploy_file(
        "apache-passenger.conf",
        {
            "*:80": f"127.0.0.1:{ports[0]}",
            "/srv/wsgi-llama/venv": str(app_venv),
            "/srv/wsgi-llama/app": str(app),
            "/srv/wsgi-llama/models/gemma-3-270m-q4_k_m.gguf": str(public_model),
            # Room for both apps: two processes of this one, one of the other.
            "PassengerMaxPoolSize 2": "PassengerMaxPoolSize 3",
            "http://llm.example.com/health": f"http://127.0.0.1:{ports[0]}/health",
            "SetEnv LLAMA_PING_INTERVAL 15": (
                f"SetEnv LLAMA_PING_INTERVAL {PING_INTERVAL}\n"
                "    SetEnv LLAMA_MODEL_ALIAS from-setenv"
            ),
        },
    )
    body = (
        SERVER.format(root=root)
        + site
        + BAD_APP.format(port=ports[1], app=bad, venv=app_venv, model=public_model)
    )
    server = Apache(root, ["passenger"], body, ports)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def test_settings_come_from_setenv_over_the_env_file(passenger: Apache) -> None:
    models = httpx.get(passenger.url() + "/v1/models", timeout=30).json()["data"]
    assert [m["id"] for m in models] == ["from-setenv"]
    # LLAMA_N_CTX=4096 from the env file (the default, 2048, would refuse it).
    response = post(passenger.url(), {"prompt": "ab" * 1200, "max_tokens": 2})
    assert response.status_code == 200, response.text


def test_heartbeat_goes_out_at_once_then_tokens_as_produced(
    passenger: Apache,
) -> None:
    got = stream(passenger.url(), {"prompt": "xy" * 1500, "max_tokens": 300})
    got.check_framing()
    assert got.headers["content-type"].startswith("text/event-stream")
    assert got.frames[0][1] == b": ping"
    assert got.frames[0][0] < got.events[0][0]
    assert got.events[0][0] < got.events[-1][0]
    assert len(got.text) == 300
    print(
        f"Passenger: headers after {got.headers_at:.3f} s, first token "
        f"{got.events[0][0]:.3f} s, [DONE] {got.frames[-1][0]:.3f} s, "
        f"{len(got.pings)} pings"
    )
    quiet = stream(
        passenger.url(),
        # Another prompt: the same one would come from llama.cpp's cache.
        {"prompt": "zw" * 1500, "max_tokens": 300, "sse_ping_interval": 0},
    )
    quiet.check_framing()
    assert quiet.pings == []
    print(
        f"Passenger, heartbeats off: headers after {quiet.headers_at:.3f} s, "
        f"first token {quiet.events[0][0]:.3f} s"
    )


def test_two_concurrent_requests_both_complete(passenger: Apache) -> None:
    with ThreadPoolExecutor(2) as pool:
        streamed = pool.submit(
            stream, passenger.url(), {"prompt": "a", "max_tokens": 300}
        )
        whole = pool.submit(post, passenger.url(), {"prompt": "b", "max_tokens": 300})
        got, response = streamed.result(), whole.result()
    got.check_framing()
    assert len(got.text) == 300
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 300


def test_a_client_that_goes_away_frees_its_process(passenger: Apache) -> None:
    # Both processes busy: one holds a long stream, the other's client leaves.
    holder, _ = hold(passenger.url(), 1000)
    dropped = stream(
        passenger.url(),
        {"prompt": "leave", "max_tokens": 3000},
        stop=lambda s: len(s.events) >= 200,
    )
    assert not dropped.done
    times = [at for at, _ in dropped.events]
    remaining = (times[-1] - times[0]) / 199 * 2800
    took = timed(passenger.url(), {"prompt": "next", "max_tokens": 10})
    holder.join(120)
    assert took < remaining / 2, (took, remaining)


def test_a_bad_setting_answers_json_503_naming_the_key(passenger: Apache) -> None:
    bad = passenger.url(1)
    for _ in range(2):
        check_openai_error(
            httpx.get(bad + "/health", timeout=60), 503, "LLAMA_PING_INTERVAL"
        )
        check_openai_error(
            post(bad, {"prompt": "x", "max_tokens": 1}), 503, "LLAMA_PING_INTERVAL"
        )
    log = (passenger.root / "passenger.log").read_text()
    assert log.count("LLAMA_PING_INTERVAL") == 1, log[-3000:]
