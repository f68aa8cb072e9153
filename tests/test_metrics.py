"""/metrics: Prometheus exposition, in-process and across real gunicorn workers.

The live tests read the multiprocess files gunicorn's workers write, so they
need Linux (the directory is named after the master's pid and start time).
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import LiveServer
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families

from wsgi_llama import ConfigError
from wsgi_llama.metrics import REFRESH

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from disconnects import children, drop, read_until, send

Start = Callable[..., LiveServer]
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc"
)


def parse(text: str) -> Samples:
    """Every sample of an exposition, by name and sorted labels."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def scrape(client: FlaskClient, **headers: str) -> Samples:
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.data
    assert response.content_type.startswith("text/plain; version=0.0.4")
    return parse(response.text)


def scrape_live(live: LiveServer) -> Samples:
    response = httpx.get(live.url + "/metrics", timeout=30)
    assert response.status_code == 200, response.text
    return parse(response.text)


COMPLETIONS = "/v1/completions"
TOKENS = "wsgi_llama_completion_tokens_total"
PROMPT = "wsgi_llama_prompt_tokens_total"
REQUESTS = "wsgi_llama_requests_total"
FIRST = "wsgi_llama_time_to_first_token_seconds"
DURATION = "wsgi_llama_request_duration_seconds"
PINGS = "wsgi_llama_heartbeats_total"
GONE = "wsgi_llama_client_disconnects_total"


@pytest.fixture(scope="module")
def metered(make_app: Callable[..., Flask]) -> Flask:
    return make_app()


# --- in-process -----------------------------------------------------------------


def test_requests_are_counted_by_route_and_status(metered: Flask) -> None:
    client = metered.test_client()
    before = scrape(client)
    for _ in range(3):
        client.get("/v1/models").close()
    client.get("/v1/models/nope").close()
    client.post(COMPLETIONS, data=b"{").close()
    after = scrape(client)

    def delta(route: str, status: str) -> float:
        labels = {"route": route, "status": status}
        return value(after, REQUESTS, **labels) - value(before, REQUESTS, **labels)

    assert delta("/v1/models", "200") == 3
    assert delta("/v1/models/<path:model_id>", "404") == 1
    assert delta(COMPLETIONS, "400") == 1
    assert delta("/metrics", "200") == 1  # the first scrape
    # The duration histogram observes each response once it is closed.
    count = f"{DURATION}_count"
    assert value(after, count, route="/v1/models") - value(
        before, count, route="/v1/models"
    ) == pytest.approx(3)


def test_whole_completion_adds_its_usage(metered: Flask) -> None:
    client = metered.test_client()
    before = scrape(client)
    response = client.post(COMPLETIONS, json={"prompt": "Hello", "max_tokens": 7})
    usage = response.get_json()["usage"]
    after = scrape(client)
    assert value(after, TOKENS, model="tiny") - value(before, TOKENS, model="tiny") == 7
    assert (
        value(after, PROMPT, model="tiny") - value(before, PROMPT, model="tiny")
        == usage["prompt_tokens"]
        > 0
    )


def test_stream_adds_tokens_first_token_and_duration(metered: Flask) -> None:
    client = metered.test_client()
    before = scrape(client)
    started = time.perf_counter()
    with client.post(
        "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 9,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    ) as response:
        body = response.get_data()
    took = time.perf_counter() - started
    assert body.endswith(b"data: [DONE]\n\n")
    (usage,) = [
        json.loads(frame[len(b"data: ") :])["usage"]
        for frame in body.split(b"\n\n")
        if frame.startswith(b'data: {"id"') and b'"usage":{' in frame
    ]
    after = scrape(client)
    tiny = {"model": "tiny"}
    assert value(after, TOKENS, **tiny) - value(before, TOKENS, **tiny) == 9
    prompt = value(after, PROMPT, **tiny) - value(before, PROMPT, **tiny)
    assert prompt == usage["prompt_tokens"] > 0
    assert value(after, f"{FIRST}_count", **tiny) - value(
        before, f"{FIRST}_count", **tiny
    ) == pytest.approx(1)
    first = value(after, f"{FIRST}_sum", **tiny) - value(before, f"{FIRST}_sum", **tiny)
    route = {"route": "/v1/chat/completions"}
    duration = value(after, f"{DURATION}_sum", **route) - value(
        before, f"{DURATION}_sum", **route
    )
    assert 0 < first < duration <= took
    assert value(after, GONE, **route) == value(before, GONE, **route)


def test_queue_gauges_are_present_from_the_start(metered: Flask) -> None:
    samples = scrape(metered.test_client())
    assert value(samples, "wsgi_llama_queue_depth", model="tiny") == 0
    assert value(samples, "wsgi_llama_active_generations", model="tiny") == 0
    assert ("wsgi_llama_queue_depth", (("model", "tiny"),)) in samples


def test_prompt_cache_gauge_counts_what_it_holds(
    make_app: Callable[..., Flask],
) -> None:
    app = make_app(LLAMA_PARALLEL=2, LLAMA_N_CTX=2048)
    client = app.test_client()
    assert value(scrape(client), "wsgi_llama_prompt_cache_bytes", model="tiny") == 0
    body = {"prompt": "Held for a while. " * 8, "max_tokens": 2}
    client.post("/v1/completions", json=body)
    # A long prompt moves the idle one to the cache.
    client.post("/v1/completions", json={"prompt": "Next. " * 40, "max_tokens": 2})
    (model,) = app.extensions["wsgi_llama"].pool.models.values()
    held = model.engine.cache.size
    assert held > 0
    assert value(scrape(client), "wsgi_llama_prompt_cache_bytes", model="tiny") == held


ENGINE = (
    "batched_generations",
    "unbatched_generations",
    "engine_steps",
    "engine_step_tokens",
    "engine_step_sequences",
    "engine_decode_seconds",
    "prompt_reused_tokens",
    "prompt_shared_tokens",
)


def engine_gains(before: Samples, after: Samples) -> dict[str, float]:
    """What each engine counter gained between two scrapes, by short name."""
    return {
        name: value(after, f"wsgi_llama_{name}_total", model="tiny")
        - value(before, f"wsgi_llama_{name}_total", model="tiny")
        for name in ENGINE
    }


def test_engine_counts_its_steps(metered: Flask) -> None:
    client = metered.test_client()
    before = scrape(client)
    started = time.perf_counter()
    body = {"prompt": "Steps, counted one by one", "max_tokens": 7}
    usage = client.post(COMPLETIONS, json=body).get_json()["usage"]
    took = time.perf_counter() - started
    gained = engine_gains(before, scrape(client))
    assert usage["completion_tokens"] == 7
    # Alone: one step for the prompt (and the first token), one per token after.
    assert gained["engine_steps"] == gained["engine_step_sequences"] == 7
    # Every prompt token is evaluated or reused once; every token but the last
    # is fed back.
    assert (
        gained["engine_step_tokens"] + gained["prompt_reused_tokens"]
        == usage["prompt_tokens"] + 6
    )
    assert 0 < gained["engine_decode_seconds"] < took
    assert gained["batched_generations"] == 1
    assert gained["unbatched_generations"] == 0


def test_engine_steps_carry_several_sequences(metered: Flask) -> None:
    client = metered.test_client()
    before = scrape(client)
    barrier = threading.Barrier(3)
    usages: list[dict[str, int]] = []

    def generate(i: int) -> None:
        barrier.wait()
        body = {"prompt": f"Side by side, number {i}", "max_tokens": 300}
        usages.append(
            metered.test_client().post(COMPLETIONS, json=body).get_json()["usage"]
        )

    threads = [threading.Thread(target=generate, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    gained = engine_gains(before, scrape(client))
    assert len(usages) == 3
    assert gained["batched_generations"] == 3
    # Three generations of 300 tokens in fewer steps than one after another.
    assert gained["engine_step_sequences"] > gained["engine_steps"]
    assert gained["engine_steps"] < sum(u["completion_tokens"] for u in usages)
    assert gained["engine_step_tokens"] + gained["prompt_reused_tokens"] == sum(
        u["prompt_tokens"] + u["completion_tokens"] - 1 for u in usages
    )


def test_unbatched_generations_are_counted(metered: Flask) -> None:
    client = metered.test_client()
    before = scrape(client)
    body = {"prompt": "Say it back", "max_tokens": 3, "echo": True}
    response = client.post(COMPLETIONS, json=body)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.get_json()["choices"][0]["text"].startswith("Say it back")
    gained = engine_gains(before, scrape(client))
    assert gained["unbatched_generations"] == 1
    assert gained["batched_generations"] == gained["engine_steps"] == 0


def test_exposition_names_follow_prometheus_conventions(metered: Flask) -> None:
    text = metered.test_client().get("/metrics").text
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE))
    # Without multiprocess mode, prometheus_client adds a *_created gauge
    # beside each counter and histogram (their start times).
    assert {k: v for k, v in types.items() if not k.endswith("_created")} == {
        "wsgi_llama_requests_total": "counter",
        "wsgi_llama_request_duration_seconds": "histogram",
        "wsgi_llama_time_to_first_token_seconds": "histogram",
        "wsgi_llama_prompt_tokens_total": "counter",
        "wsgi_llama_completion_tokens_total": "counter",
        "wsgi_llama_queue_depth": "gauge",
        "wsgi_llama_active_generations": "gauge",
        "wsgi_llama_prompt_cache_bytes": "gauge",
        "wsgi_llama_heartbeats_total": "counter",
        "wsgi_llama_client_disconnects_total": "counter",
        "wsgi_llama_batched_generations_total": "counter",
        "wsgi_llama_unbatched_generations_total": "counter",
        "wsgi_llama_engine_steps_total": "counter",
        "wsgi_llama_engine_step_tokens_total": "counter",
        "wsgi_llama_engine_step_sequences_total": "counter",
        "wsgi_llama_engine_decode_seconds_total": "counter",
        "wsgi_llama_prompt_reused_tokens_total": "counter",
        "wsgi_llama_prompt_shared_tokens_total": "counter",
        "wsgi_llama_engine_aborted_steps_total": "counter",
    }


def test_openmetrics_when_asked(metered: Flask) -> None:
    response = metered.test_client().get(
        "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert response.content_type.startswith("application/openmetrics-text")
    assert response.text.endswith("# EOF\n")


def test_each_app_counts_its_own(make_app: Callable[..., Flask]) -> None:
    one, two = make_app().test_client(), make_app().test_client()
    for _ in range(2):
        one.get("/health")
    labels = {"route": "/health", "status": "200"}
    assert value(scrape(one), REQUESTS, **labels) == 2
    assert value(scrape(two), REQUESTS, **labels) == 0


def test_metrics_need_the_api_key(make_app: Callable[..., Flask]) -> None:
    client = make_app(LLAMA_API_KEY="sesame").test_client()
    assert client.get("/metrics").status_code == 401
    wrong = client.get("/metrics", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert wrong.get_json()["error"]["code"] == "invalid_api_key"
    samples = scrape(client, Authorization="Bearer sesame")
    assert value(samples, REQUESTS, route="/metrics", status="401") == 2


def test_metrics_can_be_public(make_app: Callable[..., Flask]) -> None:
    client = make_app(LLAMA_API_KEY="sesame", LLAMA_METRICS_AUTH="0").test_client()
    scrape(client)
    assert client.get("/v1/models").status_code == 401  # only /metrics is open


def test_metrics_can_be_turned_off(make_app: Callable[..., Flask]) -> None:
    client = make_app(LLAMA_METRICS="0").test_client()
    response = client.get("/metrics")
    assert response.status_code == 404
    assert response.get_json()["error"]["code"] == "not_found"
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize("key", ["LLAMA_METRICS", "LLAMA_METRICS_AUTH"])
def test_invalid_switch_stops_startup(make_app: Callable[..., Flask], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        make_app(**{key: "maybe"})


def test_mounted_metrics(tiny_model: Path) -> None:
    from wsgi_llama import create_blueprint

    app = Flask("mounted")
    app.config.update(LLAMA_MODEL=str(tiny_model), LLAMA_N_CTX=256)
    app.register_blueprint(create_blueprint(url_prefix="/llm"))
    client = app.test_client()
    client.get("/llm/health")
    client.get("/elsewhere")  # not the API's: not counted
    samples = parse(client.get("/llm/metrics").text)
    assert value(samples, REQUESTS, route="/llm/health", status="200") == 1
    assert not any("elsewhere" in str(labels) for _, labels in samples)


# --- live gunicorn ----------------------------------------------------------------


def metrics_dir(live: LiveServer) -> Path:
    """The directory the workers of *live* chose by themselves."""
    pid = live.process.pid
    stat = Path(f"/proc/{pid}/stat").read_text()
    start = stat[stat.rindex(")") + 2 :].split()[19]
    return Path(tempfile.gettempdir()) / f"wsgi-llama-metrics-{pid}-{start}"


def booted(directory: Path, workers: list[int]) -> None:
    """Wait until every worker has loaded the app (and written its gauges)."""
    deadline = time.monotonic() + 60
    for pid in workers:
        while not (directory / f"gauge_livesum_{pid}.db").exists():
            assert time.monotonic() < deadline, f"worker {pid} did not boot"
            time.sleep(0.1)


@pytest.fixture(scope="module")
def two_workers(start_server: Start) -> LiveServer:
    # No PROMETHEUS_MULTIPROC_DIR: the workers choose a directory themselves.
    assert not os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    return start_server("--workers", "2", LLAMA_N_THREADS="1")


@linux_only
def test_two_workers_add_up(two_workers: LiveServer) -> None:
    directory = metrics_dir(two_workers)
    workers = children(two_workers.process.pid)
    assert len(workers) == 2
    booted(directory, workers)
    before = scrape_live(two_workers)
    made = 0
    # Until both workers have counted some (a worker's counter file appears
    # with its first count), within a bound.
    while made < 200:
        with httpx.Client(base_url=two_workers.url, timeout=60) as client:
            response = client.post(COMPLETIONS, json={"prompt": "Hi", "max_tokens": 3})
        assert response.status_code == 200, response.text
        made += 1
        counted = {p for p in workers if (directory / f"counter_{p}.db").exists()}
        if made >= 10 and counted == set(workers):
            break
    assert counted == set(workers), f"one worker served all {made} requests"
    time.sleep(2 * REFRESH)  # the engines' counters reach the files each second
    after = scrape_live(two_workers)
    route = {"route": COMPLETIONS, "status": "200"}
    assert value(after, REQUESTS, **route) - value(before, REQUESTS, **route) == made
    tiny = {"model": "tiny"}
    assert value(after, TOKENS, **tiny) - value(before, TOKENS, **tiny) == 3 * made
    gained = engine_gains(before, after)
    assert gained["batched_generations"] == made
    assert gained["engine_steps"] == 3 * made  # one after another: 3 steps each
    # Every scrape counts too, whichever worker answered it.
    scrapes = {"route": "/metrics", "status": "200"}
    assert value(after, REQUESTS, **scrapes) - value(before, REQUESTS, **scrapes) == 1


@linux_only
def test_gauges_are_current_whichever_worker_is_scraped(
    two_workers: LiveServer,
) -> None:
    holder = Holder(two_workers, tokens=4000)
    time.sleep(2 * REFRESH)  # the holder's worker has refreshed its gauges
    try:
        # Each scrape reaches either worker; all see the one generation.
        for _ in range(10):
            samples = scrape_live(two_workers)
            assert value(samples, "wsgi_llama_active_generations", model="tiny") == 1
    finally:
        holder.drop()
    deadline = time.monotonic() + 30
    active = "wsgi_llama_active_generations"
    while value(scrape_live(two_workers), active, model="tiny"):
        assert time.monotonic() < deadline, "the generation did not end"
        time.sleep(0.1)


@linux_only
def test_a_dead_workers_counts_stay_and_its_gauges_go(
    two_workers: LiveServer,
) -> None:
    directory = metrics_dir(two_workers)
    before = scrape_live(two_workers)
    victim = children(two_workers.process.pid)[0]
    booted(directory, [victim])
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        workers = children(two_workers.process.pid)
        if victim not in workers and len(workers) == 2:
            break
        time.sleep(0.2)
    else:
        pytest.fail("gunicorn did not replace the killed worker")
    after = scrape_live(two_workers)
    assert not (directory / f"gauge_livesum_{victim}.db").exists()
    route = {"route": COMPLETIONS, "status": "200"}
    assert value(after, REQUESTS, **route) == value(before, REQUESTS, **route)
    assert value(after, "wsgi_llama_active_generations", model="tiny") == 0


@pytest.fixture(scope="module")
def one_worker(start_server: Start) -> LiveServer:
    """Heartbeats every 0.05 s; one worker, so a second request queues."""
    return start_server(
        LLAMA_N_THREADS="1",
        LLAMA_PING_INTERVAL="0.05",
        LLAMA_MIN_PING_INTERVAL="0.05",
        LLAMA_PARALLEL="1",  # one request at a time, with or without the engine
    )


class Holder:
    """A long stream that holds the model, counting the heartbeats it gets."""

    def __init__(self, live: LiveServer, tokens: int = 2000) -> None:
        self.pings = 0
        self.generating = threading.Event()
        self.dropped = threading.Event()
        # A suffix keeps it off the batching engine: it holds the whole model.
        body = {"prompt": "hold", "max_tokens": tokens, "stream": True, "suffix": ""}
        self.thread = threading.Thread(target=self._run, args=(live, body))
        self.thread.start()
        assert self.generating.wait(60)

    def _run(self, live: LiveServer, body: dict[str, Any]) -> None:
        with httpx.stream(
            "POST", live.url + COMPLETIONS, json=body, timeout=300
        ) as response:
            for line in response.iter_lines():
                self.pings += line == ": ping"
                if line.startswith("data: {"):
                    self.generating.set()
                if self.dropped.is_set():
                    break
        self.generating.set()

    def drop(self) -> None:
        """Leave (at the next line received) and wait for it."""
        self.dropped.set()
        self.thread.join(300)

    def join(self) -> int:
        self.thread.join(300)
        return self.pings


def test_heartbeats_are_counted(one_worker: LiveServer) -> None:
    before = scrape_live(one_worker)
    holder = Holder(one_worker)
    with httpx.stream(
        "POST",
        one_worker.url + COMPLETIONS,
        json={"prompt": "Hi", "max_tokens": 5, "stream": True},
        timeout=120,
    ) as response:
        pings = sum(line == ": ping" for line in response.iter_lines())
    pings += holder.join()
    after = scrape_live(one_worker)
    assert pings >= 3  # it waited behind the holder for a second or more
    route = {"route": COMPLETIONS}
    assert value(after, PINGS, **route) - value(before, PINGS, **route) == pings
    tiny = {"model": "tiny"}
    first = f"{FIRST}_sum"
    # The queued stream's first token came after its wait.
    assert value(after, first, **tiny) - value(before, first, **tiny) > 0.5


def wait_for(live: LiveServer, name: str, target: float, **labels: str) -> float:
    deadline = time.monotonic() + 30
    while True:
        got = value(scrape_live(live), name, **labels)
        if got >= target or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def test_queue_depth_and_active_generations(one_worker: LiveServer) -> None:
    holder = Holder(one_worker)
    waiting = send(one_worker.port, COMPLETIONS, {"prompt": "Hi", "stream": True})
    read_until(waiting, b": ping")
    samples = scrape_live(one_worker)
    assert value(samples, "wsgi_llama_queue_depth", model="tiny") == 1
    assert value(samples, "wsgi_llama_active_generations", model="tiny") == 1
    drop(waiting)
    holder.join()
    samples = scrape_live(one_worker)
    assert value(samples, "wsgi_llama_queue_depth", model="tiny") == 0
    assert value(samples, "wsgi_llama_active_generations", model="tiny") == 0


@pytest.mark.parametrize("heartbeats", [True, False], ids=["pings", "silent"])
def test_disconnects_are_counted(one_worker: LiveServer, heartbeats: bool) -> None:
    route = {"route": COMPLETIONS}
    before = value(scrape_live(one_worker), GONE, **route)
    holder = Holder(one_worker)
    body: dict[str, Any] = {"prompt": "Hi", "max_tokens": 5, "stream": True}
    if not heartbeats:
        body["sse_ping_interval"] = 0
    sock = send(one_worker.port, COMPLETIONS, body)
    read_until(sock, b": ping" if heartbeats else b"\r\n\r\n")
    drop(sock)
    assert wait_for(one_worker, GONE, before + 1, **route) == before + 1
    holder.join()
    assert value(scrape_live(one_worker), GONE, **route) == before + 1


def test_dropped_whole_request_is_a_disconnect(one_worker: LiveServer) -> None:
    route = {"route": COMPLETIONS}
    before = scrape_live(one_worker)
    holder = Holder(one_worker)
    sock = send(one_worker.port, COMPLETIONS, {"prompt": "Hi", "max_tokens": 5})
    time.sleep(0.5)  # queued behind the holder
    drop(sock)
    target = value(before, GONE, **route) + 1
    assert wait_for(one_worker, GONE, target, **route) == target
    holder.join()
    after = scrape_live(one_worker)
    gone = {"route": COMPLETIONS, "status": "499"}
    assert value(after, REQUESTS, **gone) - value(before, REQUESTS, **gone) == 1


@linux_only
def test_config_file_hooks_make_and_remove_the_directory(
    start_server: Start, tmp_path: Path
) -> None:
    live = start_server(
        "-c",
        "deploy/gunicorn.conf.py",
        "--workers",
        "2",
        LLAMA_N_THREADS="1",
        TMPDIR=str(tmp_path),
    )
    workers = children(live.process.pid)
    (directory,) = tmp_path.glob("wsgi-llama-metrics-*")
    booted(directory, workers)
    httpx.get(live.url + "/health")
    assert value(scrape_live(live), REQUESTS, route="/health", status="200") >= 1
    os.kill(workers[0], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while (directory / f"gauge_livesum_{workers[0]}.db").exists():
        assert time.monotonic() < deadline, "child_exit did not mark the worker dead"
        time.sleep(0.1)
    live.stop()
    assert not directory.exists()


def test_mounts_share_the_apps_metrics(tiny_model: Path) -> None:
    from wsgi_llama import create_blueprint

    app = Flask("two-mounts")
    app.config.update(LLAMA_MODEL=str(tiny_model), LLAMA_N_CTX=256)
    app.register_blueprint(create_blueprint(name="one"), url_prefix="/one")
    app.register_blueprint(
        create_blueprint({"LLAMA_METRICS": "0"}, name="two"), url_prefix="/two"
    )
    client = app.test_client()
    client.get("/one/health")
    client.get("/two/health")  # this mount has metrics off: not counted
    assert client.get("/two/metrics").status_code == 404
    samples = parse(client.get("/one/metrics").text)
    assert value(samples, REQUESTS, route="/one/health", status="200") == 1
    assert value(samples, REQUESTS, route="/two/health", status="200") == 0
