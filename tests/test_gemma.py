"""End to end on a real model: Gemma 3 270M behind ``gunicorn -k gevent``.

What a new user would try first: the official ``openai`` client against
``/v1/completions``, ``/v1/chat/completions`` and ``/v1/models``, streamed and
not, every response checked against OpenAI's own schemas; and heartbeats
(``: ping``) on a long prompt, which come while the prompt is processed, stop
once tokens flow, and change nothing in the text. And in process, what
Gemma's sliding-window cache does to sequences that share their cells.

Gemma 3 270M is a base model whose GGUF has no chat template, so chat goes
through llama-cpp-python's fallback format: the tests check the shape of chat
answers, not their content.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from conftest import LiveServer
from openai_schema import validate
from test_engine import together

from wsgi_llama import create_app

pytestmark = pytest.mark.gemma

MODEL_ID = "gemma-3-270m-q4_k_m"  # the GGUF file's stem
N_CTX = 2048  # the server's default (wsgi_llama.config.model_defaults)
PROMPT = "The three most important inventions of the nineteenth century were"
TOPICS = ["rivers", "bridges", "libraries", "gardens", "railways", "lighthouses"]


def long_prompt(chapters: int = 30) -> str:
    """About 1,700 Gemma tokens of plain prose: seconds of prompt processing."""
    return "".join(
        f"Chapter {i + 1}: {topic}. People have written about {topic} for "
        f"centuries, describing how {topic} shaped the towns around them, who "
        f"built and kept them, and what travellers noticed when they first "
        f"arrived. This chapter collects those notes and compares them with "
        f"what we know today about {topic}.\n"
        for i, topic in zip(range(chapters), itertools.cycle(TOPICS), strict=False)
    )


def dump(obj: Any) -> dict[str, Any]:
    return obj.model_dump(mode="json", exclude_unset=True)


class Tap(httpx.SyncByteStream):
    """A response body passed through unchanged, each read kept with its time."""

    def __init__(self, inner: httpx.SyncByteStream, reads: list) -> None:
        self._inner = inner
        self._reads = reads

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._inner:
            self._reads.append((time.monotonic(), chunk))
            yield chunk

    def close(self) -> None:
        self._inner.close()


class TapTransport(httpx.HTTPTransport):
    """Lets a test see the raw bytes the ``openai`` client parsed."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[tuple[float, bytes]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        assert isinstance(response.stream, httpx.SyncByteStream)
        response.stream = Tap(response.stream, self.reads)
        return response


def tapped_client(server: LiveServer) -> tuple[openai.OpenAI, TapTransport]:
    tap = TapTransport()
    client = openai.OpenAI(
        base_url=server.url + "/v1",
        api_key="unused",
        http_client=httpx.Client(transport=tap, timeout=300),
        max_retries=0,
    )
    return client, tap


def timed_frames(reads: list[tuple[float, bytes]]) -> list[tuple[float, bytes]]:
    """The SSE frames of a body, each with the time its last byte arrived."""
    frames, buffer = [], b""
    for when, chunk in reads:
        buffer += chunk
        *complete, buffer = buffer.split(b"\n\n")
        frames.extend((when, frame) for frame in complete)
    assert buffer == b"", buffer[-80:]
    return frames


@pytest.fixture(scope="module")
def gemma_server(
    start_server: Callable[..., LiveServer], gemma_model: Path
) -> LiveServer:
    """Gemma with the default context (LLAMA_N_CTX unset) and 1 s heartbeats.

    One llama.cpp thread, not the default of every core: with every core, any
    other busy process (a parallel test run) stalls llama.cpp's threads at
    each step, and this file took 3 minutes instead of 20 s on 2 cores.
    """
    return start_server(
        LLAMA_MODEL=str(gemma_model),
        LLAMA_N_CTX="",
        LLAMA_N_THREADS="1",
        LLAMA_PING_INTERVAL="1",
    )


@pytest.fixture(scope="module")
def quiet_gemma_server(
    start_server: Callable[..., LiveServer], gemma_model: Path
) -> LiveServer:
    """The same, with heartbeats off."""
    return start_server(
        LLAMA_MODEL=str(gemma_model),
        LLAMA_N_CTX="",
        LLAMA_N_THREADS="1",
        LLAMA_PING_INTERVAL="0",
    )


@pytest.fixture(scope="module")
def gemma(gemma_server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=gemma_server.url + "/v1", api_key="unused", max_retries=0
    )


def test_models_lists_gemma(gemma: openai.OpenAI) -> None:
    page = gemma.models.list()
    assert [m.id for m in page.data] == [MODEL_ID]
    validate(dump(page), "ListModelsResponse")
    model = gemma.models.retrieve(MODEL_ID)
    assert model.id == MODEL_ID
    validate(dump(model), "Model")


def test_completion(gemma: openai.OpenAI) -> None:
    result = gemma.completions.create(
        model=MODEL_ID, prompt=PROMPT, max_tokens=16, temperature=0
    )
    validate(dump(result), "CreateCompletionResponse")
    assert result.model == MODEL_ID
    assert result.choices[0].text.strip()
    assert result.choices[0].finish_reason in ("length", "stop")
    assert result.usage is not None
    assert 0 < result.usage.completion_tokens <= 16
    assert result.usage.prompt_tokens > 5


def test_streamed_completion_matches_unstreamed(gemma: openai.OpenAI) -> None:
    body: dict[str, Any] = {
        "model": MODEL_ID,
        "prompt": PROMPT,
        "max_tokens": 16,
        "temperature": 0,
    }
    whole = gemma.completions.create(**body)
    chunks = list(gemma.completions.create(**body, stream=True))
    assert len(chunks) > 1
    # The real API too sends finish_reason null until the last chunk, which
    # the schema (shared with non-streamed responses) does not allow.
    for chunk in chunks[:-1]:
        assert chunk.choices[0].finish_reason is None
        assert chunk.id == chunks[0].id
    validate(dump(chunks[-1]), "CreateCompletionResponse")
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text


def test_chat_completion_streamed_and_not(gemma: openai.OpenAI) -> None:
    # Without a system message this base model ends the fallback chat format's
    # turn at once (empty content); with one, it says something.
    body: dict[str, Any] = {
        "model": MODEL_ID,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Tell me a story about a cat."},
        ],
        "max_tokens": 12,
        "temperature": 0,
    }
    chat = gemma.chat.completions.create(**body)
    validate(dump(chat), "CreateChatCompletionResponse")
    assert chat.model == MODEL_ID
    message = chat.choices[0].message
    assert message.role == "assistant" and message.content
    assert chat.choices[0].finish_reason in ("length", "stop")
    assert chat.usage is not None
    assert 0 < chat.usage.completion_tokens <= 12

    chunks = list(
        gemma.chat.completions.create(
            **body, stream=True, stream_options={"include_usage": True}
        )
    )
    for chunk in chunks:
        validate(dump(chunk), "CreateChatCompletionStreamResponse")
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == chat.choices[0].finish_reason
    assert chunks[-1].choices == []
    assert chunks[-1].usage == chat.usage
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == message.content


def test_context_is_2048_tokens(gemma: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        gemma.completions.create(model=MODEL_ID, prompt=long_prompt(40), max_tokens=1)
    error = caught.value.response.json()
    validate(error, "ErrorResponse")
    assert error["error"]["code"] == "context_length_exceeded"
    assert f"context is {N_CTX} tokens" in error["error"]["message"]


def stream_long_prompt(
    server: LiveServer,
) -> tuple[str, float, list[tuple[float, bytes]]]:
    """Stream 32 tokens after the long prompt, at temperature 0, with ``openai``.

    Returns the text, the time the request was sent, and the raw reads of the
    response body with the time each arrived.
    """
    client, tap = tapped_client(server)
    # Leave the same KV cache behind on every server (only the BOS token is
    # shared with the long prompt), so the batches and so the text match.
    client.completions.create(model=MODEL_ID, prompt="Hi", max_tokens=1)
    tap.reads.clear()
    sent = time.monotonic()
    chunks = list(
        client.completions.create(
            model=MODEL_ID,
            prompt=long_prompt(),
            max_tokens=32,
            temperature=0,
            stream=True,
        )
    )
    validate(dump(chunks[-1]), "CreateCompletionResponse")
    return "".join(c.choices[0].text for c in chunks), sent, tap.reads


def test_long_prompt_heartbeats_only_before_the_first_token(
    gemma_server: LiveServer, quiet_gemma_server: LiveServer
) -> None:
    count = httpx.post(
        gemma_server.url + "/extras/tokenize/count",
        json={"input": long_prompt()},
        timeout=30,
    ).json()["count"]
    assert 1500 <= count <= 1800 < N_CTX

    text, sent, reads = stream_long_prompt(gemma_server)
    timed = timed_frames(reads)
    kinds = [frame[:6] for _, frame in timed]
    first_data = kinds.index(b"data: ")
    first_token_after = timed[first_data][0] - sent
    assert first_token_after > 1.0, "prompt processing shorter than the interval"
    # Heartbeats while the prompt is processed: the first at once, with the
    # headers, then one per second of silence...
    pings = [when for when, _ in timed[:first_data]]
    assert kinds[:first_data] == [b": ping"] * len(pings), kinds
    assert pings[0] - sent < 0.5, pings[0] - sent
    assert 2 <= len(pings) <= first_token_after + 1.5
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert min(gaps) > 0.8, gaps
    # ... and none between tokens: a heartbeat only ever follows a second of
    # silence, which tokens tens of milliseconds apart never leave. (On a
    # machine so loaded that one token takes over a second, one may come.)
    for (before, _), (when, frame) in itertools.pairwise(timed[first_data:]):
        if frame == b": ping":
            assert when - before > 0.8, f"heartbeat {when - before:.2f} s after data"
    assert timed[-1][1] == b"data: [DONE]"
    assert text.strip()

    # Heartbeats off: not one comment line, and the same text.
    quiet_text, _, quiet_reads = stream_long_prompt(quiet_gemma_server)
    raw = b"".join(chunk for _, chunk in quiet_reads)
    assert raw.startswith(b"data: {") and raw.endswith(b"data: [DONE]\n\n")
    assert not any(line.startswith(b":") for line in raw.split(b"\n"))
    assert quiet_text == text


def test_questions_on_one_document_read_the_shared_cells_as_their_own(
    gemma_model: Path,
) -> None:
    # Gemma's KV cache has sliding-window layers beside the global ones. Four
    # questions after the same document, at once: three take its cells from
    # the first, and each reads what it reads alone. Without the document's
    # cells, three of the four answered ":" instead of " 1" here.
    app = create_app(
        {"LLAMA_MODEL": str(gemma_model), "LLAMA_PARALLEL": 4, "LLAMA_N_THREADS": 1}
    )
    app.testing = True
    (model,) = app.extensions["wsgi_llama"].pool.models.values()
    engine = model.engine
    document = long_prompt(6)
    bodies = [
        {
            "prompt": f"{document}\nQuestion: Which chapter is about {topic}?\n"
            "Answer: Chapter",
            "max_tokens": 2,
            "temperature": 0,
        }
        for topic in TOPICS[1:5]
    ]

    def answer(body: dict[str, Any]) -> str:
        response = app.test_client().post("/v1/completions", json=body)
        assert response.status_code == 200, response.get_data(as_text=True)
        return response.json["choices"][0]["text"]  # type: ignore[index]

    alone = []
    for body in bodies:
        engine._clear_memory()
        alone.append(answer(body))
    engine._clear_memory()
    shared = engine.stats["shared"]
    answers = together(*[lambda b=b: answer(b) for b in bodies])
    assert answers == alone
    assert engine.stats["shared"] - shared >= 3 * 300
