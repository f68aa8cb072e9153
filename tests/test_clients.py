"""The client compatibility matrix: real third-party clients against live gunicorn.

Each client runs against a server (default settings, so the batching engine)
with heartbeats every 0.2 s and against one with heartbeats off, while a long
stream holds the whole model: its request waits
in the queue (receiving ``: ping`` frames when they are on, and for streaming
clients the wait lasts until at least two have gone out), then the holder
leaves and the request runs. A client *works* when it returns the whole
completion (12 tokens, ``finish_reason`` "length"), and *fails* when it
raises or returns anything else. Every outcome must equal the one in
tests/clients/matrix.json, from which README.rst's table is generated (see
tests/clients/matrix.py).

The Node clients (``openai`` and ``eventsource-parser``, pinned in
tests/clients/package-lock.json) are installed with ``npm ci`` into
``.cache/clients``; without Node or the npm registry those tests are skipped,
unless ``WSGI_LLAMA_REQUIRE_SERVERS=1``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from conftest import REPO, LiveServer
from httpx_sse import connect_sse
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(REPO / "tests" / "clients"))
sys.path.insert(0, str(REPO / "benchmarks"))
import matrix
from disconnects import drop, read_until, send

Start = Callable[..., LiveServer]
Client = Callable[[str], dict[str, Any]]

MAX_TOKENS = 12
MESSAGES = [{"role": "user", "content": "Hi"}]
CHAT = {"model": "any", "messages": MESSAGES, "max_tokens": MAX_TOKENS}
COMPLETION = {"model": "any", "prompt": "Once", "max_tokens": MAX_TOKENS}
NODE_FILES = ("package.json", "package-lock.json", "client.mjs")
STREAMING = {
    client
    for client in matrix.CLIENTS
    if client.endswith("-stream")
    or client in ("eventsource-parser", "httpx-sse", "naive")
}


def unavailable(reason: str) -> None:
    if os.environ.get("WSGI_LLAMA_REQUIRE_SERVERS") == "1":
        pytest.fail(f"{reason} (WSGI_LLAMA_REQUIRE_SERVERS=1)")
    pytest.skip(reason)


# --- the clients: each takes the server's URL and returns text and finish reason -


def openai_python(asynchronous: bool, chat: bool, stream: bool) -> Client:
    def run(url: str) -> dict[str, Any]:
        if asynchronous:
            return asyncio.run(run_async(url))
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        if chat:
            answer = client.chat.completions.create(**CHAT, stream=stream)
        else:
            answer = client.completions.create(**COMPLETION, stream=stream)
        return collect(answer if stream else [answer], chat, stream)

    async def run_async(url: str) -> dict[str, Any]:
        client = openai.AsyncOpenAI(
            base_url=url + "/v1", api_key="unused", max_retries=0
        )
        if chat:
            answer = await client.chat.completions.create(**CHAT, stream=stream)
        else:
            answer = await client.completions.create(**COMPLETION, stream=stream)
        if not stream:
            return collect([answer], chat, stream)
        return collect([chunk async for chunk in answer], chat, stream)

    return run


def collect(chunks: Any, chat: bool, stream: bool) -> dict[str, Any]:
    text, finish_reason = "", None
    for chunk in chunks:
        for choice in chunk.choices:
            if not chat:
                text += choice.text
            elif stream:
                text += choice.delta.content or ""
            else:
                text += choice.message.content or ""
            finish_reason = choice.finish_reason or finish_reason
    return {"text": text, "finish_reason": finish_reason}


def chat_events(events: Iterator[str]) -> dict[str, Any]:
    """Text and finish reason from the data of chat stream events, up to [DONE]."""
    text, finish_reason = "", None
    for data in events:
        if data == "[DONE]":
            return {"text": text, "finish_reason": finish_reason}
        for choice in json.loads(data)["choices"]:
            text += choice["delta"].get("content") or ""
            finish_reason = choice["finish_reason"] or finish_reason
    raise ValueError("the stream ended without [DONE]")


def httpx_sse(url: str) -> dict[str, Any]:
    with (
        httpx.Client(timeout=120) as client,
        connect_sse(
            client, "POST", url + "/v1/chat/completions", json={**CHAT, "stream": True}
        ) as source,
    ):
        return chat_events(event.data for event in source.iter_sse())


def naive(url: str) -> dict[str, Any]:
    """What a hand-written client often does: every frame is ``data: <json>``."""

    def events() -> Iterator[str]:
        with httpx.stream(
            "POST",
            url + "/v1/chat/completions",
            json={**CHAT, "stream": True},
            timeout=120,
        ) as response:
            buffer = b""
            for chunk in response.iter_bytes():
                buffer += chunk
                while b"\n\n" in buffer:
                    frame, buffer = buffer.split(b"\n\n", 1)
                    yield frame.decode()[len("data: ") :]

    return chat_events(events())


def node_client(directory: Path, kind: str) -> Client:
    def run(url: str) -> dict[str, Any]:
        done = subprocess.run(
            ["node", "client.mjs", url, kind],
            cwd=directory,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if done.returncode != 0:
            raise RuntimeError(done.stderr.strip()[-2000:])
        return json.loads(done.stdout)

    return run


@pytest.fixture(scope="module")
def node_clients() -> Path:
    """The pinned npm packages, installed once into .cache/clients."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        apt = ["apt-get", "install", "-y", "-o", "DPkg::Lock::Timeout=900"]
        subprocess.run(
            [*apt, "nodejs", "npm"],
            capture_output=True,
            timeout=1200,
        )
        if shutil.which("node") is None or shutil.which("npm") is None:
            unavailable("Node and npm are not installed and apt-get could not")
    directory = REPO / ".cache" / "clients"
    directory.mkdir(parents=True, exist_ok=True)
    source = REPO / "tests" / "clients"
    for name in NODE_FILES:
        shutil.copyfile(source / name, directory / name)
    lock = hashlib.sha256((source / "package-lock.json").read_bytes()).hexdigest()
    stamp = directory / "node_modules" / ".installed-lock"
    if not stamp.exists() or stamp.read_text() != lock:
        installed = subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund"],
            cwd=directory,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if installed.returncode != 0:
            unavailable(f"npm ci failed: {installed.stderr.strip()[-500:]}")
        stamp.write_text(lock)
    return directory


def client_for(name: str, request: pytest.FixtureRequest) -> Client:
    if name.startswith("openai-python-"):
        return openai_python(
            asynchronous="-async-" in name,
            chat="-chat" in name,
            stream=name.endswith("-stream"),
        )
    if name == "httpx-sse":
        return httpx_sse
    if name == "naive":
        return naive
    directory = request.getfixturevalue("node_clients")
    kind = name.replace("openai-node-", "openai-")  # client.mjs's names
    return node_client(directory, kind)


# --- the servers, and a long stream that holds the model ------------------------


@pytest.fixture(scope="module")
def servers(start_server: Start) -> Iterator[Callable[[str], LiveServer]]:
    """A server per heartbeat setting, started when first needed."""
    started: dict[str, LiveServer] = {}
    interval = {"on": "0.2", "off": "0"}

    def get(heartbeats: str) -> LiveServer:
        if heartbeats not in started:
            started[heartbeats] = start_server(
                LLAMA_PING_INTERVAL=interval[heartbeats], LLAMA_N_THREADS="1"
            )
        return started[heartbeats]

    yield get
    for live in started.values():
        live.stop()


def scrape(live: LiveServer) -> dict[str, float]:
    """The queue's depth, and the heartbeats sent on every route."""
    text = httpx.get(live.url + "/metrics", timeout=30).text
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in ("wsgi_llama_queue_depth", "wsgi_llama_heartbeats_total"):
                found[sample.name] = found.get(sample.name, 0.0) + sample.value
    return found


def run_queued(live: LiveServer, client: Client, streaming: bool, pings: bool) -> Any:
    """Run *client* while a long stream holds the model; return what it returned.

    The holder leaves once the client's request waits in the queue and, for a
    streaming client with heartbeats on, has been sent two of them.
    """
    before = scrape(live).get("wsgi_llama_heartbeats_total", 0.0)
    # A suffix keeps the holder off the batching engine: it holds the whole
    # model, and the client's request (batched or not) waits behind it.
    holder = send(
        live.port,
        "/v1/completions",
        {"prompt": "hold", "max_tokens": 4000, "stream": True, "suffix": ""},
    )
    read_until(holder, b"data: {")
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(client, live.url)
        deadline = time.monotonic() + 120
        try:
            while True:
                samples = scrape(live)
                sent = samples.get("wsgi_llama_heartbeats_total", 0.0) - before
                if samples.get("wsgi_llama_queue_depth") == 1 and (
                    sent >= 2 or not (streaming and pings)
                ):
                    break
                if answer.done():  # it gave up (raising here) before it waited
                    answer.result()
                    pytest.fail(f"the client's request ran without waiting: {samples}")
                assert time.monotonic() < deadline, "the client's request never queued"
                time.sleep(0.05)
        finally:
            drop(holder)
        return answer.result(timeout=300)


@pytest.fixture(scope="module")
def found() -> Iterator[dict[str, dict[str, str]]]:
    """Outcomes seen; saved to matrix.json with WSGI_LLAMA_UPDATE_MATRIX=1."""
    results: dict[str, dict[str, str]] = {}
    yield results
    if os.environ.get("WSGI_LLAMA_UPDATE_MATRIX") == "1" and results:
        recorded = matrix.load() if matrix.RESULTS.exists() else {}
        for client, outcomes in results.items():
            recorded.setdefault(client, {}).update(outcomes)
        matrix.save(recorded)


@pytest.mark.parametrize("heartbeats", matrix.HEARTBEATS)
@pytest.mark.parametrize("name", list(matrix.CLIENTS))
def test_client(
    name: str,
    heartbeats: str,
    servers: Callable[[str], LiveServer],
    found: dict[str, dict[str, str]],
    request: pytest.FixtureRequest,
) -> None:
    client = client_for(name, request)
    live = servers(heartbeats)
    try:
        got = run_queued(live, client, name in STREAMING, heartbeats == "on")
    except Exception as exc:  # the client gave up: that is the finding
        outcome, detail = "fails", f"{type(exc).__name__}: {exc}"
    else:
        whole = len(got["text"]) == MAX_TOKENS and got["finish_reason"] == "length"
        outcome, detail = ("works" if whole else "fails"), repr(got)
    found.setdefault(name, {})[heartbeats] = outcome
    if os.environ.get("WSGI_LLAMA_UPDATE_MATRIX") == "1":
        return
    expected = matrix.load()[name][heartbeats]
    assert outcome == expected, (
        f"{name} with heartbeats {heartbeats} now {outcome} ({detail}); the matrix "
        "says it " + expected + ": see tests/clients/matrix.py to update it"
    )


def test_naive_client_is_broken_by_heartbeats_only() -> None:
    """The point of the matrix: comments break naive clients, and only them."""
    recorded = matrix.load()
    assert recorded["naive"] == {"on": "fails", "off": "works"}
    assert all(outcomes["off"] == "works" for outcomes in recorded.values()), recorded


def test_readme_table_is_the_matrix() -> None:
    recorded = matrix.load()
    assert set(recorded) == set(matrix.CLIENTS)
    assert all(set(o) == set(matrix.HEARTBEATS) for o in recorded.values())
    readme = matrix.README.read_text(encoding="utf-8")
    assert matrix.readme_table(readme) == matrix.table(recorded), (
        "README.rst's client matrix is stale: run tests/clients/matrix.py --write"
    )
