"""Streaming and heartbeats through real gunicorn gevent workers and llama.cpp."""

from __future__ import annotations

import itertools
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest
from conftest import LiveServer
from disconnects import drop, send
from openai_schema import validate

LONG = 2000  # tokens: about 3 s of generation on the tiny model


def frames(raw: bytes) -> list[bytes]:
    """The SSE frames of a body that frames with "\\n\\n" (as this server does)."""
    assert raw.endswith(b"\n\n"), raw[-80:]
    return raw[:-2].split(b"\n\n")


def stream(server: LiveServer, path: str, body: dict[str, Any]) -> list[bytes]:
    with httpx.stream(
        "POST", server.url + path, json={**body, "stream": True}, timeout=60
    ) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return frames(response.read())


def check_framing(got: list[bytes]) -> tuple[list[dict[str, Any]], list[int]]:
    """Every frame is a ping or one JSON data event, ending with [DONE].

    Returns the events and the positions of the pings among the frames.
    """
    assert got[-1] == b"data: [DONE]"
    events, pings = [], []
    for i, frame in enumerate(got[:-1]):
        if frame == b": ping":
            pings.append(i)
        else:
            assert frame.startswith(b"data: {") and b"\n" not in frame, frame
            events.append(json.loads(frame[len(b"data: ") :]))
    return events, pings


def hold_model(
    server: LiveServer, tokens: int = LONG, **extra: Any
) -> threading.Thread:
    """Keep the model busy with a long stream; return once it is generating.

    A ``suffix`` makes it a request the batching engine does not take: it
    holds the whole model, so others queue behind it whatever LLAMA_PARALLEL
    is.
    """
    started = threading.Event()

    def run() -> None:
        body = {
            "prompt": "hold",
            "max_tokens": tokens,
            "stream": True,
            "suffix": "",
            **extra,
        }
        with httpx.stream(
            "POST", server.url + "/v1/completions", json=body, timeout=300
        ) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    started.set()
        started.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(60)
    return thread


def test_openai_client_streams_completions(server: LiveServer) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    chunks = list(
        client.completions.create(
            model="gpt-3.5-turbo-instruct", prompt="Once", max_tokens=20, stream=True
        )
    )
    text = "".join(c.choices[0].text for c in chunks)
    assert len(text) == 20  # the tiny model's tokens are single ASCII bytes
    assert chunks[-1].choices[0].finish_reason == "length"
    for chunk in chunks[:-1]:
        assert chunk.choices[0].finish_reason is None
    validate(
        chunks[-1].model_dump(mode="json", exclude_unset=True),
        "CreateCompletionResponse",
    )


def test_openai_client_streams_chat(server: LiveServer) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    chunks = list(
        client.chat.completions.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text) == 12
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 12
    for chunk in chunks:
        validate(
            chunk.model_dump(mode="json", exclude_unset=True),
            "CreateChatCompletionStreamResponse",
        )


def test_openai_client_without_streaming(server: LiveServer) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    chat = client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "Hi"}], max_tokens=5
    )
    assert len(chat.choices[0].message.content or "") == 5
    assert chat.usage is not None and chat.usage.completion_tokens == 5
    validate(
        chat.model_dump(mode="json", exclude_unset=True), "CreateChatCompletionResponse"
    )
    text = client.completions.create(model="any", prompt="Hi", max_tokens=5)
    assert len(text.choices[0].text) == 5
    validate(
        text.model_dump(mode="json", exclude_unset=True), "CreateCompletionResponse"
    )


def queued_behind_holder(
    server: LiveServer, body: dict[str, Any], pings: int, **hold: Any
) -> tuple[list[tuple[float, bytes]], float]:
    """Stream *body* while another stream holds the model, for as long as it
    takes *body*'s stream to get *pings* heartbeats; then drop the holder.

    Returns *body*'s frames with their arrival times, and the release time:
    the queued request cannot have run before it, however fast the machine.
    """
    holder = send(
        server.port,
        "/v1/completions",
        # A suffix: not batched, it holds the whole model (see hold_model).
        {"prompt": "hold", "max_tokens": 100_000, "stream": True, "suffix": "", **hold},
    )
    holder.settimeout(120)
    seen = b""
    while b"data: {" not in seen:  # generating
        chunk = holder.recv(65536)
        assert chunk, seen
        seen += chunk
    got: list[tuple[float, bytes]] = []
    done = threading.Event()

    def run() -> None:
        raw = b""
        with httpx.stream(
            "POST", server.url + "/v1/completions", json=body, timeout=120
        ) as response:
            for chunk in response.iter_raw():
                raw += chunk
                *whole, raw = raw.split(b"\n\n")
                got.extend((time.monotonic(), frame) for frame in whole)
        done.set()

    client = threading.Thread(target=run, daemon=True)
    client.start()
    deadline = time.monotonic() + 60
    while sum(f == b": ping" for _, f in got) < pings:
        assert time.monotonic() < deadline and not done.is_set(), got
        time.sleep(0.01)
    released = time.monotonic()
    drop(holder)
    client.join(120)
    assert done.is_set()
    return got, released


def test_queued_stream_gets_heartbeats_then_events(server: LiveServer) -> None:
    body = {"prompt": "Hi", "max_tokens": 30, "stream": True}
    timed, released = queued_behind_holder(server, body, pings=5)
    events, pings = check_framing([frame for _, frame in timed])
    # It really waited: no event before the holder let go of the model, and
    # 5 heartbeats (0.2 s apart) while it waited.
    first_event = next(t for t, f in timed if f.startswith(b"data: {"))
    assert first_event > released
    assert len([t for t, f in timed if f == b": ping" and t < released]) >= 5
    # They came first. (A ping between tokens is right too, when a busy
    # machine makes a token take longer than the interval.)
    assert pings[:5] == list(range(5)), pings
    assert "".join(e["choices"][0]["text"] for e in events).__len__() == 30


def test_heartbeats_are_timed_by_silence(server: LiveServer) -> None:
    body = {"prompt": "Hi", "max_tokens": 5, "stream": True}
    timed, released = queued_behind_holder(server, body, pings=7)
    # The first ping goes out at once (it carries the headers); the others
    # after 0.2 s of silence each, while the stream waits its turn.
    arrivals = [t for t, f in timed if f == b": ping" and t < released][1:]
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert len(gaps) >= 5, timed
    # The median: two pings read in one chunk (a busy machine) make one gap 0.
    assert 0.1 < sorted(gaps)[len(gaps) // 2] < 0.4, gaps


def test_request_can_turn_heartbeats_off(server: LiveServer) -> None:
    holder = hold_model(server)
    with httpx.stream(
        "POST",
        server.url + "/v1/completions",
        json={"prompt": "Hi", "max_tokens": 5, "stream": True, "sse_ping_interval": -1},
        timeout=60,
    ) as response:
        raw = response.read()
    holder.join()
    assert b":" not in b"".join(line[:1] for line in raw.split(b"\n"))
    check_framing(frames(raw))


def test_interval_zero_sends_no_comment_byte(quiet_server: LiveServer) -> None:
    holder = hold_model(quiet_server)
    started = time.monotonic()
    with httpx.stream(
        "POST",
        quiet_server.url + "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 5,
            "stream": True,
        },
        timeout=60,
    ) as response:
        # The headers come at once, though the model is busy for seconds.
        assert time.monotonic() - started < 1.0
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-accel-buffering"] == "no"
        raw = response.read()
    waited = time.monotonic() - started
    holder.join()
    assert waited > 1.0  # it really was queued
    assert not any(line.startswith(b":") for line in raw.split(b"\n"))
    check_framing(frames(raw))


def test_same_text_with_heartbeats_and_without(
    server: LiveServer, quiet_server: LiveServer
) -> None:
    body = {
        "messages": [{"role": "user", "content": "Tell me"}],
        "max_tokens": 40,
        "temperature": 0,
    }
    texts = []
    for live in (server, quiet_server):
        holder = hold_model(live, 1000)
        events, _ = check_framing(stream(live, "/v1/chat/completions", body))
        holder.join()
        texts.append(
            "".join(e["choices"][0]["delta"].get("content", "") for e in events)
        )
    assert len(texts[0]) == 40
    assert texts[0] == texts[1]


def test_staggered_concurrent_streams_all_complete(server: LiveServer) -> None:
    def one(i: int) -> list[dict[str, Any]]:
        time.sleep(0.1 * i)
        body = {"prompt": f"Stream {i}", "max_tokens": 300, "seed": i}
        events, _ = check_framing(stream(server, "/v1/completions", body))
        return events

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(one, range(6)))
    for events in results:
        assert len({e["id"] for e in events}) == 1  # no other stream's data
        assert len("".join(e["choices"][0]["text"] for e in events)) == 300
        assert events[-1]["choices"][0]["finish_reason"] == "length"


def abandon(server: LiveServer, tokens: int, **extra: Any) -> None:
    """Start a stream, read until its first token, then drop the connection."""
    body = json.dumps(
        {"prompt": "x", "max_tokens": tokens, "stream": True, **extra}
    ).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
        + b"Content-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    received = b""
    while b"data: {" not in received:
        received += sock.recv(65536)
    sock.close()


def test_abandoned_streams_do_not_delay_the_next_request(server: LiveServer) -> None:
    # Each abandoned stream would hold the model for ~12 s if it ran on.
    for _ in range(3):
        abandon(server, 4000)
    started = time.monotonic()
    response = httpx.post(
        server.url + "/v1/completions",
        json={"prompt": "Next", "max_tokens": 10},
        timeout=60,
    )
    assert response.status_code == 200
    assert time.monotonic() - started < 5.0


def test_hub_stays_free_during_generation(start_server: Any) -> None:
    # With --timeout 2, a blocked hub would miss gunicorn's heartbeat and the
    # worker would be killed mid-request.
    # Long enough to outlast the timeout several times on a fast machine.
    live = start_server("--timeout", "2", LLAMA_N_CTX="16384")
    result: dict[str, Any] = {}

    def generate() -> None:
        response = httpx.post(
            live.url + "/v1/completions",
            json={"prompt": "long", "max_tokens": 16000},
            timeout=300,
        )
        result["status"] = response.status_code
        result["body"] = response.json()

    thread = threading.Thread(target=generate)
    thread.start()
    time.sleep(0.5)
    latencies = []
    while thread.is_alive():
        started = time.monotonic()
        assert httpx.get(live.url + "/health", timeout=10).status_code == 200
        latencies.append(time.monotonic() - started)
        time.sleep(0.2)
    thread.join()
    assert result["status"] == 200, result
    assert result["body"]["usage"]["completion_tokens"] == 16000
    # At least 6 s of generation (three times the timeout), answered throughout.
    assert len(latencies) >= 25 and max(latencies) < 1.0, latencies
    assert "WORKER TIMEOUT" not in live.log.read_text()


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_context_length_exceeded(server: LiveServer, path: str) -> None:
    long_text = "word " * 1000  # 5000 byte tokens > 4096
    body: dict[str, Any] = (
        {"prompt": long_text}
        if path == "/v1/completions"
        else {"messages": [{"role": "user", "content": long_text}]}
    )
    for streaming in (False, True):
        response = httpx.post(
            server.url + path, json={**body, "stream": streaming}, timeout=60
        )
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "context_length_exceeded"
        validate(response.json(), "ErrorResponse")
