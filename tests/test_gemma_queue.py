"""Queueing, concurrency and disconnects on Gemma 3 270M under gunicorn gevent."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import LiveServer
from test_streaming import (
    abandon,
    check_framing,
    frames,
    hold_model,
    queued_behind_holder,
)

pytestmark = pytest.mark.gemma

NO_END = {"1": -100, "106": -100}  # Gemma's <eos> and <end_of_turn>
PROMPT = "Write a long story about a lighthouse keeper and the sea."


@pytest.fixture(scope="module")
def gemma_server(
    start_server: Callable[..., LiveServer], gemma_model: Path
) -> LiveServer:
    # One request at a time: these tests are about the FIFO queue in front of
    # it (tests/test_engine.py covers several sequences at once).
    return start_server(
        LLAMA_MODEL=str(gemma_model),
        LLAMA_N_CTX="2048",
        LLAMA_PING_INTERVAL="1",
        LLAMA_PARALLEL="1",
    )


def stream(live: LiveServer, body: dict[str, Any]) -> list[bytes]:
    with httpx.stream(
        "POST",
        live.url + "/v1/completions",
        json={"prompt": PROMPT, **body, "stream": True},
        timeout=300,
    ) as response:
        assert response.status_code == 200
        return frames(response.read())


def text_of(events: list[dict[str, Any]]) -> str:
    return "".join(e["choices"][0]["text"] for e in events)


def test_six_staggered_streams_run_to_full_length(gemma_server: LiveServer) -> None:
    def one(i: int) -> tuple[list[dict[str, Any]], list[int]]:
        time.sleep(0.3 * i)
        body = {"max_tokens": 48, "seed": i, "logit_bias": NO_END}
        return check_framing(stream(gemma_server, body))

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(one, range(6)))
    queued_with_pings = 0
    for events, pings in results:
        assert len({e["id"] for e in events}) == 1
        assert events[-1]["choices"][0]["finish_reason"] == "length"
        assert text_of(events)
        queued_with_pings += bool(pings)
    # Six streams of ~1 s each, serialised: the later ones waited with pings.
    assert queued_with_pings >= 3


def hold(live: LiveServer, tokens: int) -> threading.Thread:
    return hold_model(live, tokens, prompt=PROMPT, logit_bias=NO_END)


def test_queued_stream_gets_heartbeats_while_it_waits(gemma_server: LiveServer) -> None:
    body = {"prompt": PROMPT, "max_tokens": 8, "stream": True}
    timed, released = queued_behind_holder(
        gemma_server, body, pings=3, prompt=PROMPT, logit_bias=NO_END
    )
    events, pings = check_framing([frame for _, frame in timed])
    assert events
    # It waited its turn (no event before the holder let go of the model),
    # with pings (1 s apart) all along. (A ping between tokens is right too,
    # if a busy machine makes one take over a second.)
    first_event = next(t for t, f in timed if f.startswith(b"data: {"))
    assert first_event > released
    assert pings[:3] == [0, 1, 2], pings


def test_interval_zero_is_silent_while_queued(gemma_server: LiveServer) -> None:
    holder = hold(gemma_server, 200)
    with httpx.stream(
        "POST",
        gemma_server.url + "/v1/completions",
        json={
            "prompt": PROMPT,
            "max_tokens": 8,
            "stream": True,
            "sse_ping_interval": 0,
        },
        timeout=300,
    ) as response:
        raw = response.read()
    holder.join()
    assert not any(line.startswith(b":") for line in raw.split(b"\n"))
    check_framing(frames(raw))


def test_abandoned_streams_do_not_delay_the_next(gemma_server: LiveServer) -> None:
    # Each would hold the model for ~25 s (1500 tokens) if it ran on.
    for _ in range(3):
        abandon(gemma_server, 1500, logit_bias=NO_END)
    started = time.monotonic()
    response = httpx.post(
        gemma_server.url + "/v1/completions",
        json={"prompt": PROMPT, "max_tokens": 8},
        timeout=300,
    )
    assert response.status_code == 200
    assert time.monotonic() - started < 10
