"""The blueprint mounted twice in a host Flask app, each mount with its settings.

``tests/hostapp.py``: ``/a`` with 0.2 s heartbeats and an API key, ``/b``
with heartbeats off and another alias, both on the same model file.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import LiveServer
from flask import Flask
from flask.testing import FlaskClient
from hostapp import create_host
from openai_schema import validate
from test_streaming import check_framing, frames, hold_model

from wsgi_llama import ConfigError, WsgiLlama, create_blueprint

KEY_A = {"Authorization": "Bearer key-a"}


@pytest.fixture(scope="module")
def host(tiny_model: Path) -> Flask:
    app = create_host(str(tiny_model))
    app.testing = True
    return app


@pytest.fixture()
def client(host: Flask) -> FlaskClient:
    return host.test_client()


def test_two_mounts_share_one_loaded_model(host: Flask) -> None:
    mounts = host.extensions["wsgi_llama"]
    assert sorted(mounts) == ["a", "b"]
    model_a = mounts["a"].pool.get(None)
    model_b = mounts["b"].pool.get(None)
    assert len(mounts.models) == 1
    assert model_a.llama is model_b.llama
    assert model_a.queue is model_b.queue  # one context: one request at a time
    assert mounts.models.users(model_a) == 2
    assert (model_a.alias, model_b.alias) == ("tiny", "tiny-b")


@pytest.mark.parametrize("sizes", [(0, 8), (8, 0), (2, 8)])
def test_mounts_sharing_a_model_share_the_largest_prompt_cache(
    tiny_model: Path, sizes: tuple[int, int]
) -> None:
    host = Flask("host")
    host.config["LLAMA_MODEL"] = str(tiny_model)
    for name, size in zip("ab", sizes, strict=True):
        mount = create_blueprint({"LLAMA_PROMPT_CACHE_MB": size}, name=name)
        host.register_blueprint(mount, url_prefix=f"/{name}")
    mounts = host.extensions["wsgi_llama"]
    engine = mounts["a"].pool.get(None).engine
    assert engine is mounts["b"].pool.get(None).engine
    assert engine.cache is not None and engine.cache.capacity == 8 << 20


def test_each_mount_has_its_own_settings(host: Flask, client: FlaskClient) -> None:
    mounts = host.extensions["wsgi_llama"]
    assert mounts["a"].settings.ping_interval == 0.2
    assert mounts["b"].settings.ping_interval == 0
    assert mounts["a"].settings.api_keys == ("key-a",)
    assert mounts["b"].settings.api_keys == ()

    assert client.get("/a/v1/models").status_code == 401
    listed = client.get("/a/v1/models", headers=KEY_A).json["data"]
    assert [m["id"] for m in listed] == ["tiny"]
    assert [m["id"] for m in client.get("/b/v1/models").json["data"]] == ["tiny-b"]
    # The app's keys hold where a mount says nothing: both read LLAMA_N_CTX.
    assert (
        client.post("/b/v1/completions", json={"prompt": "Hi", "max_tokens": 3}).json[
            "model"
        ]
        == "tiny-b"
    )


def test_single_mount_still_reads_as_one_server(make_app: Callable[..., Flask]) -> None:
    mounts = make_app().extensions["wsgi_llama"]
    assert mounts.settings is mounts["wsgi_llama"].settings
    assert mounts.pool is mounts["wsgi_llama"].pool


def test_unknown_route_under_a_mount_is_openai_shaped(client: FlaskClient) -> None:
    for path in ("/a/v1/nothing", "/b/v1/nothing", "/b/nothing/at/all"):
        response = client.get(path)
        assert response.status_code == 404, path
        assert response.content_type == "application/json"
        validate(response.json, "ErrorResponse")
        assert response.json["error"]["code"] == "not_found"


def test_wrong_method_under_a_mount_is_405_with_allow(client: FlaskClient) -> None:
    for path, allowed in (
        ("/b/v1/completions", {"POST", "OPTIONS"}),
        ("/b/v1/models", {"GET", "HEAD", "OPTIONS"}),
        ("/a/v1/chat/completions", {"POST", "OPTIONS"}),
    ):
        response = client.delete(path)
        assert response.status_code == 405, path
        assert set(response.headers["Allow"].split(", ")) == allowed
        validate(response.json, "ErrorResponse")
        assert response.json["error"]["code"] == "method_not_allowed"
    assert client.get("/b/v1/completions").status_code == 405


def test_host_routes_and_pages_are_untouched(client: FlaskClient) -> None:
    assert client.get("/").get_data() == b"host page"
    outside = client.get("/v1/models")
    assert outside.status_code == 404
    assert outside.get_data() == b"<h1>host 404</h1>"
    assert client.post("/").status_code == 405
    assert "application/json" not in client.post("/").content_type


def test_same_blueprint_registered_twice_under_two_names(tiny_model: Path) -> None:
    host = Flask("host")
    host.config.update(LLAMA_MODEL=str(tiny_model), LLAMA_N_CTX=512)
    bp = create_blueprint({"LLAMA_MAX_TOKENS": 2})
    host.register_blueprint(bp, url_prefix="/one")
    host.register_blueprint(bp, url_prefix="/two", name="two")
    client = host.test_client()
    for prefix in ("/one", "/two"):
        body = {"prompt": "Hi", "max_tokens": 50}
        text = client.post(f"{prefix}/v1/completions", json=body).json
        assert len(text["choices"][0]["text"]) == 2
    assert len(host.extensions["wsgi_llama"].models) == 1


def test_different_options_load_another_copy(tiny_model: Path) -> None:
    host = Flask("host")
    host.config["LLAMA_MODEL"] = str(tiny_model)
    host.register_blueprint(create_blueprint({"LLAMA_N_CTX": 256}, name="small"))
    host.register_blueprint(
        create_blueprint({"LLAMA_N_CTX": 512}, name="big"), url_prefix="/big"
    )
    mounts = host.extensions["wsgi_llama"]
    assert len(mounts.models) == 2
    assert mounts["small"].pool.get(None).n_ctx == 256
    assert mounts["big"].pool.get(None).n_ctx == 512


def test_another_parallel_loads_another_copy(tiny_model: Path) -> None:
    """LLAMA_PARALLEL shapes the context: a mount never runs on another's engine."""
    host = Flask("host")
    host.config.update(LLAMA_MODEL=str(tiny_model), LLAMA_N_CTX=512)
    host.register_blueprint(create_blueprint({"LLAMA_PARALLEL": 1}, name="one"))
    host.register_blueprint(
        create_blueprint({"LLAMA_PARALLEL": 3}, name="three"), url_prefix="/three"
    )
    mounts = host.extensions["wsgi_llama"]
    assert len(mounts.models) == 2
    assert mounts["one"].pool.get(None).engine is None
    assert mounts["three"].pool.get(None).engine.n_parallel == 3


def test_mounts_sharing_an_engine_keep_their_queue_timeouts(tiny_model: Path) -> None:
    host = Flask("host")
    host.config.update(LLAMA_MODEL=str(tiny_model), LLAMA_N_CTX=8192, LLAMA_PARALLEL=2)
    host.register_blueprint(
        create_blueprint({"LLAMA_QUEUE_TIMEOUT": 0.3}, name="quick"),
        url_prefix="/quick",
    )
    host.register_blueprint(
        create_blueprint({"LLAMA_QUEUE_TIMEOUT": 60}, name="patient"),
        url_prefix="/patient",
    )
    assert len(host.extensions["wsgi_llama"].models) == 1
    engine = host.extensions["wsgi_llama"]["quick"].pool.get(None).engine

    def post(prefix: str, max_tokens: int) -> tuple[int, Any, float]:
        started = time.monotonic()
        response = host.test_client().post(
            prefix + "/v1/completions",
            json={"prompt": f"Hold {prefix}", "max_tokens": max_tokens},
        )
        return response.status_code, response.json, time.monotonic() - started

    with ThreadPoolExecutor(4) as pool:
        holders = [pool.submit(post, "/patient", 3000) for _ in range(2)]
        while engine.running < 2:
            time.sleep(0.005)
        quick = pool.submit(post, "/quick", 5)
        patient = pool.submit(post, "/patient", 5)
        status, body, waited = quick.result()
        assert status == 503, body
        assert body["error"]["code"] == "queue_timeout"
        assert not patient.done()  # both slots still busy: it waits on
        assert 0.3 <= waited < 5
        assert patient.result()[0] == 200
        assert all(h.result()[0] == 200 for h in holders)


def test_extension_with_init_app(tiny_model: Path) -> None:
    compat = WsgiLlama(name="compat", url_prefix="/compat", LLAMA_PING_INTERVAL=0)
    host = Flask("host")
    host.config.update(LLAMA_MODEL=str(tiny_model), LLAMA_N_CTX=512)
    WsgiLlama(host, url_prefix="/v1-api")
    compat.init_app(host)
    mounts = host.extensions["wsgi_llama"]
    assert mounts["compat"].settings.ping_interval == 0
    assert mounts["wsgi_llama"].settings.ping_interval == 15
    assert len(mounts.models) == 1
    client = host.test_client()
    assert client.get("/compat/v1/models").status_code == 200
    assert client.get("/v1-api/nothing").json["error"]["code"] == "not_found"


def test_bad_mount_setting_names_the_key(tiny_model: Path) -> None:
    for config, key in (
        ({"LLAMA_PING_INTERVAL": "often"}, "LLAMA_PING_INTERVAL"),
        ({"LLAMA_PING_INTERVALS": 1}, "LLAMA_PING_INTERVALS"),
    ):
        host = Flask("host")
        host.config["LLAMA_MODEL"] = str(tiny_model)
        with pytest.raises(ConfigError) as caught:
            host.register_blueprint(create_blueprint(config))
        assert caught.value.key == key


# Live: the host app under gunicorn's gevent worker


@pytest.fixture(scope="module")
def live_host(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: Path
) -> Iterator[LiveServer]:
    log = tmp_path_factory.mktemp("hostapp") / "server.log"
    server = LiveServer(
        {"LLAMA_MODEL": str(tiny_model)},
        log,
        app="tests.hostapp:create_host()",
        health="/b/health",
    )
    yield server
    server.stop()


class Mount:
    """A mount's base URL, for helpers that take a server."""

    def __init__(self, url: str) -> None:
        self.url = url


def test_live_mounts_stream_with_their_own_heartbeats(live_host: LiveServer) -> None:
    for name, pinging in (("a", True), ("b", False)):
        holder = hold_model(Mount(f"{live_host.url}/b"))
        with httpx.stream(
            "POST",
            f"{live_host.url}/{name}/v1/completions",
            json={"prompt": "Hi", "max_tokens": 5, "stream": True},
            headers=KEY_A,
            timeout=60,
        ) as response:
            assert response.status_code == 200
            raw = response.read()
        holder.join()
        events, pings = check_framing(frames(raw))
        assert "".join(e["choices"][0]["text"] for e in events).__len__() == 5
        if pinging:
            # The first at once with the headers, then every 0.2 s while the
            # other mount's request holds the shared model.
            assert pings[:2] == [0, 1], pings
        else:
            assert b": ping" not in raw and pings == []


def test_live_host_pages_and_mount_errors(live_host: LiveServer) -> None:
    assert httpx.get(live_host.url + "/").text == "host page"
    outside = httpx.get(live_host.url + "/nowhere")
    assert (outside.status_code, outside.text) == (404, "<h1>host 404</h1>")
    inside = httpx.get(live_host.url + "/b/nowhere")
    assert inside.status_code == 404
    validate(inside.json(), "ErrorResponse")
    wrong = httpx.get(live_host.url + "/b/v1/completions")
    assert wrong.status_code == 405 and "POST" in wrong.headers["allow"]
    assert httpx.get(live_host.url + "/a/v1/models").status_code == 401


def test_live_headers_and_first_heartbeat_go_out_at_once(live_host: LiveServer) -> None:
    """mod_wsgi and Passenger send headers with the first non-empty chunk only."""
    holder = hold_model(Mount(f"{live_host.url}/b"))
    body = {"prompt": "Hi", "max_tokens": 5, "stream": True, "sse_ping_interval": 30}
    with httpx.stream(
        "POST",
        f"{live_host.url}/a/v1/completions",
        json=body,
        headers=KEY_A,
        timeout=120,
    ) as response:
        chunks = response.iter_raw()
        first = next(chunks)
        # Still queued behind the holder, 30 s before a timed heartbeat.
        assert holder.is_alive()
        assert first == b": ping\n\n"
        rest = b"".join(chunks)
    holder.join()
    assert rest.endswith(b"data: [DONE]\n\n") and b": ping" not in rest
