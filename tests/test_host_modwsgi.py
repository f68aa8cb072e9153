"""wsgi-llama under real Apache mod_wsgi in daemon mode (deploy/apache-mod_wsgi.conf).

Debian's apache2 and libapache2-mod-wsgi-py3, the system Python's venv, the
deploy file's VirtualHost with paths and ports replaced, and beside it a second
VirtualHost of test-only daemon groups: a bad setting, a request timeout short
enough to cut a stream, and a host Flask app with two mounts.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from hosts.client import check_openai_error, hold, post, stream, timed
from hosts.fixtures import app_venv, public, public_model  # noqa: F401
from hosts.packages import need
from hosts.servers import (
    DEPLOY,
    Apache,
    deploy_file,
    free_port,
    publish,
    write_public,
)

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="Debian packages, /proc"
)

PING_INTERVAL = 0.3
API_KEY = "test-key"
# A stream of this many tiny-model tokens lasts seconds (llama-cpp-python
# detokenizes the whole completion at every token, so it slows as it goes).
LONG = 1000

HOST_APP = """\
\"\"\"A host's own Flask app with wsgi-llama mounted twice.\"\"\"

from flask import Flask

from wsgi_llama import create_blueprint

application = Flask("host")
application.config.update(
    LLAMA_MODEL={model!r},
    LLAMA_N_CTX=4096,
    LLAMA_N_THREADS=1,
    LLAMA_MIN_PING_INTERVAL=0.05,
)


@application.get("/")
def index():
    return "host page"


application.register_blueprint(
    create_blueprint({{"LLAMA_PING_INTERVAL": {interval}}}, name="llm"),
    url_prefix="/llm",
)
application.register_blueprint(
    create_blueprint({{"LLAMA_PING_INTERVAL": 0}}, name="compat"),
    url_prefix="/compat",
)
"""

TEST_GROUPS = """\
<VirtualHost 127.0.0.1:{port}>
    WSGIApplicationGroup %{{GLOBAL}}
    WSGIPassAuthorization On
    SetEnv LLAMA_MODEL {model}
    SetEnv LLAMA_N_CTX 4096
    SetEnv LLAMA_N_THREADS 1

    # A setting that cannot be served.
    WSGIDaemonProcess bad user=www-data group=www-data threads=2 \\
        python-home={venv}
    WSGIScriptAlias /bad {app}/wsgi_llama.wsgi process-group=bad
    <Location /bad>
        SetEnv LLAMA_PING_INTERVAL soon
    </Location>

    # mod_wsgi's request-timeout cuts a stream that outlives it (the deploy
    # file's is far longer than a generation).
    WSGIDaemonProcess short user=www-data group=www-data threads=1 \\
        python-home={venv} request-timeout=1 shutdown-timeout=1
    WSGIScriptAlias /short {app}/wsgi_llama.wsgi process-group=short
    <Location /short>
        # Room for a generation far longer than the timeout on a fast machine.
        SetEnv LLAMA_N_CTX 32768
    </Location>

    # An API key, which reaches the app only with WSGIPassAuthorization.
    WSGIDaemonProcess keyed user=www-data group=www-data threads=2 \\
        python-home={venv}
    WSGIScriptAlias /keyed {app}/wsgi_llama.wsgi process-group=keyed
    <Location /keyed>
        SetEnv LLAMA_API_KEY {key}
    </Location>

    # A host Flask app: two mounts, one model.
    WSGIDaemonProcess host user=www-data group=www-data threads=4 \\
        python-home={venv}
    WSGIScriptAlias / {app}/host_app.wsgi process-group=host

    <Directory {app}>
        Require all granted
    </Directory>
</VirtualHost>
"""


@pytest.fixture(scope="module")
def apache(
    app_venv: Path,  # noqa: F811
    public: Path,  # noqa: F811
    public_model: Path,  # noqa: F811
) -> Iterator[Apache]:
    need("apache2", "libapache2-mod-wsgi-py3")
    app = public / "app"
    publish(DEPLOY / "wsgi_llama.wsgi", app / "wsgi_llama.wsgi")
    # The env file beside the entry file: read, and overridden by SetEnv.
    write_public(
        app / "wsgi-llama.env",
        "# test settings\nLLAMA_MODEL_ALIAS=from-file\nLLAMA_N_CTX=4096\n",
    )
    write_public(
        app / "host_app.wsgi",
        HOST_APP.format(model=str(public_model), interval=PING_INTERVAL),
    )
    ports = [free_port(), free_port()]
    site = deploy_file(
        "apache-mod_wsgi.conf",
        {
            "*:80": f"127.0.0.1:{ports[0]}",
            "/srv/wsgi-llama/venv": str(app_venv),
            "/srv/wsgi-llama/app": str(app),
            "/srv/wsgi-llama/models/gemma-3-270m-q4_k_m.gguf": str(public_model),
            "SetEnv LLAMA_N_THREADS 2": "SetEnv LLAMA_N_THREADS 1",
            "SetEnv LLAMA_PING_INTERVAL 15": (
                f"SetEnv LLAMA_PING_INTERVAL {PING_INTERVAL}\n"
                "    SetEnv LLAMA_MODEL_ALIAS from-setenv"
            ),
        },
    )
    tests = TEST_GROUPS.format(
        port=ports[1], venv=app_venv, app=app, key=API_KEY, model=public_model
    )
    server = Apache(public / "apache", ["wsgi"], site + tests, ports)
    try:
        server.wait_ready()
        server.wait_ready("/", index=1)
        yield server
    finally:
        server.stop()


# --- the deploy file's daemon group ------------------------------------------


def test_settings_come_from_setenv_over_the_env_file(apache: Apache) -> None:
    models = httpx.get(apache.url() + "/v1/models", timeout=30).json()["data"]
    assert [m["id"] for m in models] == ["from-setenv"]
    # LLAMA_N_CTX=4096 from the env file (the default, 2048, would refuse it).
    response = post(apache.url(), {"prompt": "ab" * 1200, "max_tokens": 2})
    assert response.status_code == 200, response.text


def test_stream_heartbeat_goes_out_at_once_and_tokens_as_produced(
    apache: Apache,
) -> None:
    holder, held = hold(apache.url(), LONG)
    queued = stream(apache.url(), {"prompt": "queued", "max_tokens": 50})
    holder.join(120)
    (first,) = held
    first.check_framing()
    queued.check_framing()
    # Tokens as produced: the first long before the stream's end.
    assert first.events[0][0] < first.frames[-1][0] / 2, first.frames[:3]
    # Headers and a first heartbeat while the model was still busy with the
    # other stream, not with the first token after it; then one heartbeat
    # per interval of waiting.
    assert queued.frames[0][1] == b": ping"
    assert queued.started + queued.headers_at < first.started + first.frames[-1][0]
    waited = queued.events[0][0] - queued.frames[0][0]
    assert len(queued.pings) >= min(3, waited / PING_INTERVAL - 1), queued.pings
    assert len(queued.text) == 50
    print(
        f"mod_wsgi: headers after {queued.headers_at:.3f} s, first ping "
        f"{queued.frames[0][0]:.3f} s, {len(queued.pings)} pings in {waited:.1f} s"
    )


def test_first_heartbeat_precedes_a_slow_prompt(apache: Apache) -> None:
    got = stream(apache.url(), {"prompt": "xy" * 1500, "max_tokens": 5})
    got.check_framing()
    assert got.frames[0][1] == b": ping"
    assert got.frames[0][0] < got.events[0][0]


def test_two_concurrent_requests_both_complete(apache: Apache) -> None:
    with ThreadPoolExecutor(2) as pool:
        streamed = pool.submit(stream, apache.url(), {"prompt": "a", "max_tokens": 300})
        whole = pool.submit(post, apache.url(), {"prompt": "b", "max_tokens": 300})
        got, response = streamed.result(), whole.result()
    got.check_framing()
    assert len(got.text) == 300
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 300


def test_a_client_that_goes_away_frees_the_model(apache: Apache) -> None:
    dropped = stream(
        apache.url(),
        {"prompt": "leave", "max_tokens": 3000},
        stop=lambda s: len(s.events) >= 200,
    )
    assert not dropped.done
    times = [at for at, _ in dropped.events]
    # Generating the other 2800 tokens at the pace of the first 200 (it only
    # slows down as it goes) would take this long:
    remaining = (times[-1] - times[0]) / 199 * 2800
    took = timed(apache.url(), {"prompt": "next", "max_tokens": 10})
    assert took < remaining / 2, (took, remaining)


def test_a_bad_setting_answers_json_503_naming_the_key(apache: Apache) -> None:
    bad = apache.url(1) + "/bad"
    for _ in range(2):
        check_openai_error(
            httpx.get(bad + "/health", timeout=30), 503, "LLAMA_PING_INTERVAL"
        )
        check_openai_error(
            post(bad, {"prompt": "x", "max_tokens": 1}), 503, "LLAMA_PING_INTERVAL"
        )
    log = (apache.root / "error.log").read_text()
    assert log.count("LLAMA_PING_INTERVAL") == 1, log[-3000:]


def test_the_authorization_header_reaches_the_app(apache: Apache) -> None:
    keyed = apache.url(1) + "/keyed"
    check_openai_error(post(keyed, {"prompt": "x", "max_tokens": 1}), 401, None)
    response = post(
        keyed,
        {"prompt": "x", "max_tokens": 1},
        headers={"Authorization": f"Bearer {API_KEY}"},
    )
    assert response.status_code == 200, response.text


def test_request_timeout_is_what_cuts_a_long_stream(apache: Apache) -> None:
    # Seconds of streaming, however fast the machine: the short group's
    # request-timeout (1 s) fires within a second or two, then its
    # shutdown-timeout (1 s) ends the daemon.
    body = {"prompt": "long", "max_tokens": 30000}
    with ThreadPoolExecutor(2) as pool:
        cut = pool.submit(stream, apache.url(1) + "/short", body)
        # Longer than the short group's cut, however fast the machine.
        kept = pool.submit(stream, apache.url(), {**body, "max_tokens": 2000})
        cut_stream, kept_stream = cut.result(), kept.result()
    kept_stream.check_framing()
    assert len(kept_stream.text) == 2000
    # Cut: before the headers (Apache's 500) or after them (no [DONE]).
    assert cut_stream.status in (200, 500)
    assert not cut_stream.done, cut_stream.frames[-2:]
    log = (apache.root / "error.log").read_text()
    assert "request time limit exceeded, stopping process 'short'" in log
    assert "stopping process 'wsgi-llama'" not in log
    cut_at = cut_stream.frames[-1][0] if cut_stream.frames else cut_stream.headers_at
    print(
        f"request-timeout=1: cut after {cut_at:.1f} s; "
        f"deploy file's: {kept_stream.frames[-1][0]:.1f} s to [DONE]"
    )


# --- a host Flask app with two mounts ----------------------------------------


def test_host_app_keeps_its_routes_and_mounts_have_their_own_heartbeats(
    apache: Apache,
) -> None:
    host = apache.url(1)
    page = httpx.get(host + "/", timeout=30)
    assert page.status_code == 200 and page.text == "host page"
    check_openai_error(httpx.get(host + "/llm/v1/nothing", timeout=30), 404, None)
    assert (
        not httpx.get(host + "/nothing", timeout=30)
        .headers["content-type"]
        .startswith("application/json")
    )
    slow_prompt = {"prompt": "xy" * 1500, "max_tokens": 5}
    pinged = stream(host, slow_prompt, path="/llm/v1/completions")
    pinged.check_framing()
    assert pinged.frames[0][1] == b": ping"
    # Another prompt: the same one would come from llama.cpp's cache.
    quiet = stream(
        host, {**slow_prompt, "prompt": "zw" * 1500}, path="/compat/v1/completions"
    )
    quiet.check_framing()
    assert quiet.pings == []
    print(
        f"mod_wsgi, heartbeats on: headers after {pinged.headers_at:.3f} s, "
        f"first token {pinged.events[0][0]:.3f} s; off: headers after "
        f"{quiet.headers_at:.3f} s, first token {quiet.events[0][0]:.3f} s"
    )


def test_host_app_mounts_share_one_model(apache: Apache) -> None:
    """Two mounts, one model: while a request on one mount holds the whole
    model, a request on the other waits for it (a copy of its own would answer
    at once). Batched requests would not wait, so the holder keeps itself off
    the engine (``suffix``)."""
    host = apache.url(1)
    release = threading.Event()
    holder, _ = hold(host, 4000, release, path="/llm/v1/completions", suffix="")
    with ThreadPoolExecutor(1) as pool:
        body = {"prompt": "b", "max_tokens": 5}
        short = pool.submit(post, host, body, "/compat/v1/completions")
        time.sleep(1.0)
        waited = not short.done()
        release.set()  # the holder's client leaves; the model is free
        response = short.result(timeout=120)
    holder.join(120)
    assert response.status_code == 200, response.text
    assert waited, "the second mount answered while the first held the model"
