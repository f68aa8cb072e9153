"""Continuous batching on the tiny model with real llama.cpp.

In-process apps (threads, no gevent) check what each sequence gets while
others run beside it; gunicorn gevent servers check interleaving, heartbeats
and clients that go away.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import llama_cpp
import openai
import pytest
from conftest import LiveServer
from flask import Flask
from openai_schema import validate
from test_streaming import check_framing, frames
from tinymodel import FIRST_BYTE_ID

import wsgi_llama.engine as engine_module
from wsgi_llama.engine import KV_PAD
from wsgi_llama.prompt_cache import common_prefix
from wsgi_llama.threads import Signal

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def batched(make_app: Callable[..., Flask]) -> Flask:
    return make_app(LLAMA_PARALLEL=4, LLAMA_N_CTX=2048)


def engine_of(app: Flask) -> Any:
    (model,) = app.extensions["wsgi_llama"].pool.models.values()
    return model.engine


def post(app: Flask, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = app.test_client().post(path, json=body)
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.json  # type: ignore[return-value]


def together(*calls: Callable[[], Any]) -> list[Any]:
    """Run *calls* at once, each in its own thread; their results in order."""
    barrier = threading.Barrier(len(calls))

    def run(call: Callable[[], Any]) -> Any:
        barrier.wait()
        return call()

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


def text(result: dict[str, Any]) -> str:
    choice = result["choices"][0]
    return choice["text"] if "text" in choice else choice["message"]["content"]


def byte_token(char: str) -> int:
    return FIRST_BYTE_ID + ord(char)


def busy(app: Flask, n: int = 3, tokens: int = 300) -> list[Callable[[], Any]]:
    """Calls that keep *n* other sequences generating."""
    return [
        lambda i=i: post(
            app, COMPLETIONS, {"prompt": f"Other {i}", "max_tokens": tokens}
        )
        for i in range(n)
    ]


# --- in process ------------------------------------------------------------------


def test_greedy_text_alone_and_batched_agree(batched: Flask) -> None:
    prompts = [f"Prompt number {i} says" for i in range(4)]

    def body(p: str) -> dict[str, Any]:
        return {"prompt": p, "max_tokens": 40, "temperature": 0}

    alone = [text(post(batched, COMPLETIONS, body(p))) for p in prompts]
    together_ = together(
        *[lambda p=p: text(post(batched, COMPLETIONS, body(p))) for p in prompts]
    )
    assert together_ == alone
    assert all(len(t) == 40 for t in alone)
    assert len(set(alone)) > 1  # different prompts, different texts


def test_seeds_reproduce_alone_and_batched(batched: Flask) -> None:
    body = {"prompt": "Seeded", "max_tokens": 40, "temperature": 1.0, "seed": 7}
    first = text(post(batched, COMPLETIONS, body))
    second = text(post(batched, COMPLETIONS, body))
    beside = together(lambda: text(post(batched, COMPLETIONS, body)), *busy(batched))
    other = text(post(batched, COMPLETIONS, {**body, "seed": 8}))
    assert first == second == beside[0]
    assert other != first


def test_each_sequence_keeps_its_own_settings(batched: Flask) -> None:
    stop = {"prompt": "Stop", "max_tokens": 200, "temperature": 0}
    unstopped = text(post(batched, COMPLETIONS, stop))
    cut = unstopped[10:12]
    grammar = 'root ::= [abc]+ "." '
    only_x = {str(t): -100 for t in range(FIRST_BYTE_ID, FIRST_BYTE_ID + 256)}
    only_x[str(byte_token("x"))] = 0
    results = together(
        lambda: post(batched, COMPLETIONS, {**stop, "stop": [cut]}),
        lambda: post(
            batched,
            COMPLETIONS,
            {"prompt": "G", "max_tokens": 50, "grammar": grammar},
        ),
        lambda: post(
            batched,
            COMPLETIONS,
            {"prompt": "B", "max_tokens": 20, "logit_bias": only_x},
        ),
        lambda: post(
            batched, COMPLETIONS, {"prompt": "L", "max_tokens": 12, "logprobs": 3}
        ),
        lambda: post(
            batched,
            CHAT,
            {
                "messages": [{"role": "user", "content": "json please"}],
                "max_tokens": 60,
                "response_format": {
                    "type": "json_object",
                    "schema": {
                        "type": "object",
                        "properties": {"a": {"type": "integer"}},
                        "required": ["a"],
                    },
                },
            },
        ),
        *busy(batched, 2),
    )
    stopped, grammared, biased, logprobs, schema = results[:5]
    assert text(stopped) == unstopped[: unstopped.index(cut)]
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert re.fullmatch(r"[abc]+\.?", text(grammared)), text(grammared)
    assert text(biased) == "x" * 20
    lp = logprobs["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == 12
    assert "".join(lp["tokens"]) == text(logprobs)
    assert all(len(top) >= 3 for top in lp["top_logprobs"])
    assert all(v <= 0 for v in lp["token_logprobs"])
    if schema["choices"][0]["finish_reason"] == "stop":
        assert isinstance(json.loads(text(schema))["a"], int)
    else:  # cut by max_tokens: still the schema's beginning
        assert re.match(r'\{\s*"a"\s*:\s*-?\d', text(schema)), text(schema)


def test_streamed_and_whole_agree_with_usage(batched: Flask) -> None:
    body = {"prompt": "Usage", "max_tokens": 25, "temperature": 0}
    whole = post(batched, COMPLETIONS, body)
    response = batched.test_client().post(
        COMPLETIONS,
        json={**body, "stream": True, "stream_options": {"include_usage": True}},
    )
    events, _ = check_framing(frames(response.get_data()))
    assert "".join(e["choices"][0]["text"] for e in events if e["choices"]) == text(
        whole
    )
    assert events[-1]["usage"] == whole["usage"]
    assert whole["usage"]["completion_tokens"] == 25


def test_max_tokens_cap_holds_on_the_engine(make_app: Callable[..., Flask]) -> None:
    app = make_app(LLAMA_PARALLEL=2, LLAMA_MAX_TOKENS=7)
    result = post(app, COMPLETIONS, {"prompt": "Cap", "max_tokens": 100})
    assert result["usage"]["completion_tokens"] == 7
    chat = post(app, CHAT, {"messages": [{"role": "user", "content": "Cap"}]})
    assert chat["usage"]["completion_tokens"] == 7


def test_dropped_stream_frees_its_sequence(batched: Flask) -> None:
    engine = engine_of(batched)
    response = batched.test_client().post(
        COMPLETIONS,
        json={"prompt": "Drop me", "max_tokens": 1500, "stream": True},
        buffered=False,
    )
    chunks = iter(response.response)
    while b"data: {" not in next(chunks):
        pass
    (sequence,) = engine._active
    slot = sequence._slot
    response.close()  # the client went away
    deadline = time.monotonic() + 10
    while engine._active and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not engine._active
    assert sequence.cancelled and sequence.done
    assert sequence.completion_tokens < 1500
    memory = llama_cpp.llama_get_memory(engine._ctx)
    assert llama_cpp.llama_memory_seq_pos_max(memory, slot.id) == -1
    assert slot.tokens == [] and slot.owner is None


def test_next_chat_turn_reuses_the_cached_prefix(batched: Flask) -> None:
    engine = engine_of(batched)
    messages = [{"role": "user", "content": "Tell me something long. " * 20}]
    first = post(batched, CHAT, {"messages": messages, "max_tokens": 20})
    reused = engine.stats["reused"]
    messages += [
        first["choices"][0]["message"],
        {"role": "user", "content": "And then?"},
    ]
    post(batched, CHAT, {"messages": messages, "max_tokens": 5})
    # The whole first turn was in a slot's cache: prompt and answer.
    assert engine.stats["reused"] - reused >= first["usage"]["prompt_tokens"]


def test_a_prompt_whose_cells_went_to_others_comes_back_from_the_prompt_cache(
    make_app: Callable[..., Flask],
) -> None:
    # Two sequences: after two other prompts, the first one's cells have gone
    # to the second of them. A prompt that starts with it must not evaluate
    # it all again, and must read what an engine that kept the cells would.
    cached = make_app(LLAMA_PARALLEL=2, LLAMA_N_CTX=2048)
    kept = make_app(LLAMA_PARALLEL=2, LLAMA_N_CTX=2048, LLAMA_PROMPT_CACHE_MB=0)
    first = {"prompt": "A conversation that goes on. " * 10, "max_tokens": 16}
    first["temperature"] = 0
    turn = [post(app, COMPLETIONS, first) for app in (cached, kept)]
    assert text(turn[0]) == text(turn[1])
    for other in ("Something else entirely. ", "A third matter, unrelated. "):
        post(cached, COMPLETIONS, {"prompt": other * 8, "max_tokens": 4})
    engine = engine_of(cached)
    assert engine.cache is not None and len(engine.cache) >= 1
    tokens = engine.llama.tokenize(first["prompt"].encode())
    held = [common_prefix(slot.tokens, tokens) for slot in engine._slots]
    assert max(held) < len(tokens), "the first prompt is still in a sequence"
    restored = engine.stats["restored"]
    # The first prompt again with another ending: what the cache holds after
    # it (the first answer) must be dropped.
    second = {"prompt": first["prompt"] + "Or not.", "max_tokens": 16}
    second.update(temperature=0, logprobs=2)
    again = [post(app, COMPLETIONS, second) for app in (cached, kept)]
    assert engine.stats["restored"] - restored >= turn[0]["usage"]["prompt_tokens"]
    assert engine_of(kept).stats["restored"] == 0
    assert text(again[0]) == text(again[1])
    # Logits tell what the text may not (the tiny model's top token is sure).
    # Only the first token's: the cells that follow it sit elsewhere in the
    # two caches, and llama.cpp sums attention in cell order.
    cells, recomputed = (r["choices"][0]["logprobs"]["top_logprobs"][0] for r in again)
    assert cells == pytest.approx(recomputed, abs=1e-6)
    assert engine_of(kept).cache is None


def test_a_long_prompt_moves_idle_sequences_to_the_prompt_cache(
    make_app: Callable[..., Flask],
) -> None:
    # llama.cpp attends over every cell up to the last in use: idle
    # sequences' cells high in the cache would slow every chunk of the prompt.
    app = make_app(LLAMA_PARALLEL=4, LLAMA_N_CTX=2048)
    engine = engine_of(app)
    kept = post(app, COMPLETIONS, {"prompt": "Kept for later. " * 6, "max_tokens": 4})
    (held,) = [slot.tokens for slot in engine._slots if slot.tokens]
    short = {"prompt": "A few words.", "max_tokens": 4}
    post(app, COMPLETIONS, short)  # a short prompt leaves the others be
    assert held in [slot.tokens for slot in engine._slots]
    post(app, COMPLETIONS, {"prompt": "Something long. " * 20, "max_tokens": 4})
    assert held not in [slot.tokens for slot in engine._slots]
    assert engine.cache is not None and engine.cache.covers(held)
    restored = engine.stats["restored"]
    post(app, COMPLETIONS, {"prompt": "Kept for later. " * 6 + "Now.", "max_tokens": 1})
    assert engine.stats["restored"] - restored >= kept["usage"]["prompt_tokens"]


def test_an_idle_engine_moves_long_sequences_to_the_prompt_cache(
    make_app: Callable[..., Flask], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Left in place, a long idle sequence's cells would make every later step
    # attend over them; the move is made while nobody waits for it.
    monkeypatch.setattr(engine_module, "MOVE_OUT_AFTER", 1.0)  # time to look first
    app = make_app(LLAMA_PARALLEL=4, LLAMA_N_CTX=2048)
    engine = engine_of(app)
    long = {"prompt": "A long story. " * 80, "max_tokens": 8, "temperature": 0}
    first = post(app, COMPLETIONS, long)
    assert first["usage"]["prompt_tokens"] >= KV_PAD
    # Long enough that sharing BOS with the long one is under a tenth of it.
    short = {"prompt": "Short, but not that short.", "max_tokens": 4}
    short = post(app, COMPLETIONS, short)
    held = {len(slot.tokens) for slot in engine._slots}
    assert max(held) >= KV_PAD  # just ended: still in place
    deadline = time.monotonic() + 10
    while any(len(slot.tokens) >= KV_PAD for slot in engine._slots):
        assert time.monotonic() < deadline, "the long sequence stayed"
        time.sleep(0.02)
    # The short one stays for the next request that shares its prefix.
    lengths = [len(slot.tokens) for slot in engine._slots if slot.tokens]
    total = short["usage"]["prompt_tokens"] + short["usage"]["completion_tokens"]
    assert lengths == [total - 1]
    # The long one comes back from the cache, and reads as if never moved.
    restored = engine.stats["restored"]
    again = post(app, COMPLETIONS, long)
    assert engine.stats["restored"] - restored >= KV_PAD
    assert text(again) == text(first)


def test_a_short_prompt_sharing_only_bos_leaves_an_idle_sequence_be(
    make_app: Callable[..., Flask], monkeypatch: pytest.MonkeyPatch
) -> None:
    # BOS is a tenth of a 10-token prompt, but not worth another
    # conversation's cells while a sequence holding nothing is free.
    monkeypatch.setattr(engine_module, "MOVE_OUT_AFTER", None)
    app = make_app(LLAMA_PARALLEL=4, LLAMA_N_CTX=2048)
    engine = engine_of(app)
    post(app, COMPLETIONS, {"prompt": "A conversation. " * 4, "max_tokens": 4})
    (held,) = [list(slot.tokens) for slot in engine._slots if slot.tokens]
    short = post(app, COMPLETIONS, {"prompt": "Hi.", "max_tokens": 4})
    assert short["usage"]["prompt_tokens"] <= 10
    assert held in [slot.tokens for slot in engine._slots]


def test_prompt_chunks_after_a_reused_prefix_end_on_the_kv_padding(
    batched: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only the first token (BOS) is shared with the cached prompt. Chunks of
    # 512 from position 1 would end at 513, 1025, ..., and llama.cpp, which
    # pads the cells it attends over to a multiple of 256, would go over 255
    # empty ones in every chunk after the first.
    engine = engine_of(batched)
    engine._clear_memory()
    post(batched, COMPLETIONS, {"prompt": "a" * 1100, "max_tokens": 1})
    for other in "cde":  # newer than the a's: the b's take the a's slot
        post(batched, COMPLETIONS, {"prompt": other * 20, "max_tokens": 1})
    spans: list[tuple[int, int]] = []
    decode = llama_cpp.llama_decode

    def recording(ctx: Any, batch: Any) -> int:
        if batch.n_tokens > 1:
            spans.append((batch.pos[0], batch.pos[batch.n_tokens - 1] + 1))
        return decode(ctx, batch)

    monkeypatch.setattr(llama_cpp, "llama_decode", recording)
    reused = engine.stats["reused"]
    post(batched, COMPLETIONS, {"prompt": "b" * 1100, "max_tokens": 1})
    assert engine.stats["reused"] - reused == 1
    assert spans[0][0] == 1 and spans[-1][1] == 1101
    assert [end % 256 for _, end in spans[:-1]] == [0] * (len(spans) - 1), spans
    assert len(spans) == 3  # 511, 512, then the last 77 tokens


def test_requests_are_woken_together_just_before_each_decode(
    batched: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Woken as each token came, a request's thread took the GIL at the loop's
    # next short call into llama.cpp, and the loop waited for it: the time
    # between decodes doubled.
    engine = engine_of(batched)
    unwoken: list[int] = []
    together_: list[int] = []
    decode = llama_cpp.llama_decode
    set_all = Signal.set_all

    def recording(ctx: Any, batch: Any) -> int:
        unwoken.append(len(engine._woken))
        return decode(ctx, batch)

    def counting(signals: list[Signal]) -> None:
        together_.append(len(signals))
        set_all(signals)

    monkeypatch.setattr(llama_cpp, "llama_decode", recording)
    monkeypatch.setattr(Signal, "set_all", staticmethod(counting))
    results = together(*busy(batched, n=3, tokens=40))
    assert all(r["usage"]["completion_tokens"] > 0 for r in results)
    assert unwoken and set(unwoken) == {0}
    assert max(together_) >= 3  # three sequences' tokens, one wake-up call


def test_request_past_the_engine_takes_the_one_at_a_time_path(batched: Flask) -> None:
    engine = engine_of(batched)
    before = engine.stats["exclusive"]
    echo = {"prompt": "Echo this", "max_tokens": 5, "echo": True, "temperature": 0}
    results = together(lambda: post(batched, COMPLETIONS, echo), *busy(batched))
    assert text(results[0]).startswith("Echo this")
    assert results[0]["usage"]["completion_tokens"] == 5
    assert all(r["usage"]["completion_tokens"] == 300 for r in results[1:])
    assert engine.stats["exclusive"] == before + 1
    # The engine serves again afterwards, from a clean cache.
    again = post(batched, COMPLETIONS, {"prompt": "After", "max_tokens": 5})
    assert again["usage"]["completion_tokens"] == 5


def test_prompts_that_do_not_fit_together_wait_their_turn(
    make_app: Callable[..., Flask],
) -> None:
    # Four prompts of ~400 tokens in a 1024-token cache: two at a time fit.
    app = make_app(LLAMA_PARALLEL=4, LLAMA_N_CTX=1024)
    calls = [
        lambda i=i: post(
            app,
            COMPLETIONS,
            {"prompt": f"{i} " + "abcd " * 80, "max_tokens": 20},
        )
        for i in range(4)
    ]
    results = together(*calls)
    assert all(r["usage"]["completion_tokens"] == 20 for r in results)
    assert all(r["usage"]["prompt_tokens"] > 380 for r in results)


def test_prompts_that_begin_alike_share_their_cells(
    make_app: Callable[..., Flask],
) -> None:
    # Four requests that begin with the same ~600-token system prompt, in a
    # 1024-token cache: evaluated once and shared, it lets all four run at
    # once (evaluated four times, it would not fit twice), and each reads
    # what it reads alone.
    app = make_app(LLAMA_PARALLEL=4, LLAMA_N_CTX=1024)
    engine = engine_of(app)
    system = "Shared words before each question. " * 17
    bodies = [
        {"prompt": f"{system}Question {i}: why?", "max_tokens": 16, "temperature": 0}
        for i in range(4)
    ]
    alone = []
    for body in bodies:
        engine._clear_memory()
        alone.append(text(post(app, COMPLETIONS, body)))
    engine._clear_memory()
    before = dict(engine.stats)
    results = together(*[lambda b=b: post(app, COMPLETIONS, b) for b in bodies])
    gained = {key: engine.stats[key] - before[key] for key in before}
    assert [text(r) for r in results] == alone
    assert len(set(alone)) > 1
    # The three that waited took the system prompt's cells (BOS included).
    assert gained["shared"] >= 3 * (len(system) + 1)
    evaluated = sum(r["usage"]["prompt_tokens"] + 15 for r in results)
    assert gained["step_tokens"] == evaluated - gained["reused"]
    # They ran side by side, not one after another.
    assert gained["step_sequences"] >= 3 * gained["steps"]


def test_chats_with_one_system_prompt_share_it(batched: Flask) -> None:
    # The chat template puts the system message first: concurrent chats that
    # have the same one evaluate it once.
    engine = engine_of(batched)
    system = {"role": "system", "content": "Answer as a patient teacher would. " * 12}
    bodies = [
        {
            "messages": [system, {"role": "user", "content": question}],
            "max_tokens": 8,
        }
        for question in ("Why is the sky blue?", "What is a prime?", "Who am I?")
    ]
    engine._clear_memory()
    shared = engine.stats["shared"]
    results = together(*[lambda b=b: post(batched, CHAT, b) for b in bodies])
    assert all(r["usage"]["completion_tokens"] > 0 for r in results)
    assert engine.stats["shared"] - shared >= 2 * len(system["content"])


def test_a_sequence_that_leaves_takes_none_of_the_cells_it_shared(
    batched: Flask,
) -> None:
    # The second of two requests with a common prefix takes the first's
    # cells; the first is then dropped mid-stream, and its cells freed. The
    # second must go on reading what it reads alone.
    engine = engine_of(batched)
    system = "Shared words before each question. " * 10
    first = {"prompt": f"{system}First?", "max_tokens": 2000, "stream": True}
    second = {"prompt": f"{system}Second?", "max_tokens": 80, "temperature": 0}
    engine._clear_memory()
    alone = text(post(batched, COMPLETIONS, second))
    engine._clear_memory()
    shared = engine.stats["shared"]
    client = batched.test_client()

    def until_data(response: Any) -> list[bytes]:
        chunks = [next(response.response)]  # the ping that sends the headers
        while not chunks[-1].startswith(b"data:"):
            chunks.append(next(response.response))
        return chunks

    leader = client.post(COMPLETIONS, json=first, buffered=False)
    until_data(leader)  # generating: the system prompt's cells are there
    follower = client.post(COMPLETIONS, json={**second, "stream": True}, buffered=False)
    chunks = until_data(follower)
    assert engine.stats["shared"] - shared >= len(system)

    def prompts() -> list[str]:
        detokenize = engine.llama.detokenize
        return [detokenize(s.request.prompt).decode() for s in list(engine._active)]

    leader.close()
    deadline = time.monotonic() + 10
    while any(p.endswith("First?") for p in prompts()):
        assert time.monotonic() < deadline
    assert any(p.endswith("Second?") for p in prompts()), "ended before the other left"
    chunks += list(follower.response)
    events, _ = check_framing(frames(b"".join(chunks)))
    assert "".join(e["choices"][0]["text"] for e in events if e["choices"]) == alone


def test_choices_share_their_prompt_and_differ_by_seed(batched: Flask) -> None:
    # n choices are n sequences: the prompt is evaluated once, choice i
    # samples with seed + i, and the prompt is counted once in the usage.
    engine = engine_of(batched)
    messages = [{"role": "user", "content": "Say something. " * 20}]
    body = {"messages": messages, "max_tokens": 12, "seed": 11, "temperature": 1}
    shared = engine.stats["shared"]
    result = post(batched, CHAT, {**body, "n": 3})
    validate(result, "CreateChatCompletionResponse")
    assert [c["index"] for c in result["choices"]] == [0, 1, 2]
    assert engine.stats["shared"] - shared >= 2 * len("Say something. " * 20)
    texts = [c["message"]["content"] for c in result["choices"]]
    assert len(set(texts)) > 1
    for i, text_ in enumerate(texts):
        alone = post(batched, CHAT, {**body, "seed": 11 + i})
        assert text(alone) == text_
    usage = result["usage"]
    assert usage["prompt_tokens"] == alone["usage"]["prompt_tokens"]
    assert usage["completion_tokens"] == 36
    assert usage["total_tokens"] == usage["prompt_tokens"] + 36


def test_choices_stream_interleaved_under_one_id(batched: Flask) -> None:
    body = {
        "prompt": "Streams of choices",
        "max_tokens": 10,
        "n": 2,
        "seed": 3,
        "temperature": 1,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    response = batched.test_client().post(COMPLETIONS, json=body)
    assert response.status_code == 200
    events, _ = check_framing(frames(response.get_data()))
    *chunks, last = events
    assert {c["id"] for c in events} == {events[0]["id"]}
    assert {len(c["choices"]) for c in chunks} == {1}
    by_index: dict[int, list[dict[str, Any]]] = {0: [], 1: []}
    for chunk in chunks:
        (choice,) = chunk["choices"]
        by_index[choice["index"]].append(choice)
    order = [c["choices"][0]["index"] for c in chunks]
    assert order[: len(order) // 2] != [0] * (len(order) // 2), "one after the other"
    whole = post(batched, COMPLETIONS, {**body, "stream": False})
    for i, choices in by_index.items():
        assert [c["finish_reason"] for c in choices][-1] == "length"
        assert all(c["finish_reason"] is None for c in choices[:-1])
        assert "".join(c["text"] for c in choices) == text_of_choice(whole, i)
    assert last["choices"] == []
    assert last["usage"] == whole["usage"]
    assert last["usage"]["completion_tokens"] == 20


def text_of_choice(result: dict[str, Any], i: int) -> str:
    (choice,) = [c for c in result["choices"] if c["index"] == i]
    return choice["text"]  # type: ignore[no-any-return]


def test_choices_need_the_engine(make_app: Callable[..., Flask]) -> None:
    # One request at a time (LLAMA_PARALLEL=1), or a request the engine
    # cannot take (echo), has no sequences to spread choices over.
    single = make_app(LLAMA_PARALLEL=1).test_client()
    batched_ = make_app(LLAMA_PARALLEL=2).test_client()
    cases = [
        (single, COMPLETIONS, {"prompt": "Hi", "n": 2}),
        (single, CHAT, {"messages": [{"role": "user", "content": "Hi"}], "n": 2}),
        (batched_, COMPLETIONS, {"prompt": "Hi", "n": 2, "echo": True}),
        (batched_, COMPLETIONS, {"prompt": "Hi", "n": 17}),
    ]
    for client, path, body in cases:
        response = client.post(path, json=body)
        assert response.status_code == 400, response.get_data(as_text=True)
        assert response.json["error"]["param"] == "n"  # type: ignore[index]
    # More choices than sequences: they take turns, all answered.
    result = batched_.post(COMPLETIONS, json={"prompt": "Hi", "n": 5, "max_tokens": 3})
    assert result.status_code == 200
    assert [c["index"] for c in result.json["choices"]] == [0, 1, 2, 3, 4]  # type: ignore[index]


def test_full_queue_is_a_503(make_app: Callable[..., Flask]) -> None:
    app = make_app(LLAMA_PARALLEL=2, LLAMA_QUEUE_SIZE=0)
    holders = [
        threading.Thread(
            target=post,
            args=(app, COMPLETIONS, {"prompt": "Hold", "max_tokens": 900}),
        )
        for _ in range(2)
    ]
    for holder in holders:
        holder.start()
    engine = engine_of(app)
    deadline = time.monotonic() + 10
    while len(engine._active) < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    response = app.test_client().post(
        COMPLETIONS, json={"prompt": "No room", "max_tokens": 5}
    )
    for holder in holders:
        holder.join()
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "1"
    assert response.json["error"]["code"] == "queue_full"


# --- through gunicorn's gevent worker -----------------------------------------------


@pytest.fixture(scope="module")
def live(start_server: Callable[..., LiveServer]) -> LiveServer:
    return start_server(
        LLAMA_PARALLEL="4", LLAMA_PING_INTERVAL="0.2", LLAMA_MIN_PING_INTERVAL="0.05"
    )


def timed_stream(
    live: LiveServer, body: dict[str, Any], path: str = COMPLETIONS
) -> list[tuple[float, bytes]]:
    """The frames of a stream, each with the time it arrived."""
    got: list[tuple[float, bytes]] = []
    with httpx.stream(
        "POST", live.url + path, json={**body, "stream": True}, timeout=120
    ) as response:
        assert response.status_code == 200, response.read()
        buffer = b""
        for chunk in response.iter_raw():
            buffer += chunk
            while b"\n\n" in buffer:
                frame, buffer = buffer.split(b"\n\n", 1)
                got.append((time.monotonic(), frame))
    return got


def test_concurrent_streams_interleave_and_complete(live: LiveServer) -> None:
    def one(i: int) -> list[tuple[float, bytes]]:
        path = CHAT if i % 2 else COMPLETIONS
        body: dict[str, Any] = {"max_tokens": 600, "seed": i}
        if path == CHAT:
            body["messages"] = [{"role": "user", "content": f"Stream {i}"}]
        else:
            body["prompt"] = f"Stream {i}"
        return timed_stream(live, body, path)

    results = together(*[lambda i=i: one(i) for i in range(4)])
    spans = []
    for got in results:
        events, _ = check_framing([frame for _, frame in got])
        assert len({e["id"] for e in events}) == 1  # no other stream's data
        content = "".join(
            c["text"] if "text" in c else c["delta"].get("content") or ""
            for e in events
            for c in e["choices"]
        )
        assert len(content) == 600
        assert events[-1]["choices"][0]["finish_reason"] == "length"
        data = [t for t, frame in got if frame.startswith(b"data: {")]
        spans.append((data[0], data[-1]))
    # Interleaved: every stream had begun before any of them ended.
    assert max(start for start, _ in spans) < min(end for _, end in spans), spans


def test_heartbeats_keep_time_while_eight_streams_run(live: LiveServer) -> None:
    # Four of the eight wait for a sequence (4 run at once) and get heartbeats.
    def one(i: int) -> list[tuple[float, bytes]]:
        return timed_stream(live, {"prompt": f"Eight {i}", "max_tokens": 2000})

    results = together(*[lambda i=i: one(i) for i in range(8)])
    waits = []
    for got in results:
        check_framing([frame for _, frame in got])
        first_data = next(i for i, (_, f) in enumerate(got) if f.startswith(b"data"))
        waited = got[first_data][0] - got[0][0]
        pings = sum(frame == b": ping" for _, frame in got[:first_data])
        if waited > 1.0:
            waits.append((waited, pings))
    assert waits, "no stream waited a second: nothing was measured"
    # One heartbeat per 0.2 s of waiting, give or take. (Counted, not timed
    # one by one: a busy client reads frames late, several at once.)
    for waited, pings in waits:
        assert waited / 0.2 * 0.7 <= pings <= waited / 0.2 + 2, waits


def test_dropped_streams_leave_room_for_others(live: LiveServer) -> None:
    from test_streaming import abandon

    for _ in range(6):  # more than the 4 sequences
        abandon(live, 3500)
    started = time.monotonic()
    response = httpx.post(
        live.url + COMPLETIONS, json={"prompt": "Next", "max_tokens": 10}, timeout=60
    )
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] == 10
    # Six streams of 3500 tokens would take many seconds if they ran on.
    assert time.monotonic() - started < 5.0


# --- one thread decodes -------------------------------------------------------------


@pytest.mark.parametrize("parallel", [1, 4])
def test_every_decode_of_a_model_runs_in_one_thread(
    make_app: Callable[..., Flask], monkeypatch: pytest.MonkeyPatch, parallel: int
) -> None:
    """A second decoding thread slowed both by a quarter (threads.CallQueue)."""
    app = make_app(LLAMA_PARALLEL=parallel, LLAMA_N_CTX=2048)
    decoding: set[int] = set()
    real = llama_cpp.llama_decode

    def decode(*args: Any) -> int:
        decoding.add(threading.get_native_id())
        return real(*args)  # type: ignore[no-any-return]

    # The engine calls the package's name, llama-cpp-python its module's.
    monkeypatch.setattr(llama_cpp, "llama_decode", decode)
    monkeypatch.setattr(llama_cpp.llama_cpp, "llama_decode", decode)
    whole = {"prompt": "Whole", "max_tokens": 20, "suffix": ""}  # not batched
    plain = {"prompt": "Plain", "max_tokens": 20}
    client = app.test_client()
    for body in (whole, plain, {**whole, "stream": True}, {**plain, "stream": True}):
        response = client.post(COMPLETIONS, json=body)
        assert response.status_code == 200
        assert "[DONE]" in response.get_data(as_text=True) or not body.get("stream")
    together(*[lambda b=b: post(app, COMPLETIONS, b) for b in (whole, plain) * 2])
    assert len(decoding) == 1, decoding
    assert threading.get_native_id() not in decoding


# --- a prompt step cut short ----------------------------------------------------------


@pytest.mark.gemma
def test_a_cancelled_prompt_step_stops_mid_step(
    make_app: Callable[..., Flask], gemma_model: Any
) -> None:
    """llama_set_abort_callback: the step stops at a graph node, not at its end.

    Gemma 3 270M takes most of a second for each 512-token step of a long
    prompt; the sequence is cancelled early in one, and the next request must
    not wait for the rest of it.
    """
    from wsgi_llama.engine import Request
    from wsgi_llama.sampling import SamplingParams

    app = make_app(LLAMA_MODEL=str(gemma_model), LLAMA_PARALLEL=2, LLAMA_N_CTX=4096)
    engine = engine_of(app)
    llama = engine.llama
    greedy = SamplingParams(temperature=0)

    def run(prompt: list[int]) -> Any:
        sequence = engine.submit(Request(prompt, greedy, max_tokens=1))
        while not sequence.done:
            sequence.wait(1)
        return sequence

    words = " ".join(f"word{i}" for i in range(1200)).encode()
    long_prompt = llama.tokenize(words)[:2000]
    assert len(long_prompt) >= 1500
    started = time.monotonic()
    run(long_prompt[:512])  # one whole step of 512 prompt tokens
    step = time.monotonic() - started
    before = engine.stats["aborted_steps"]
    sequence = engine.submit(Request(long_prompt, greedy, max_tokens=1))
    while sequence not in engine._in_flight:
        time.sleep(0.001)
    time.sleep(step / 5)
    cancelled = time.monotonic()
    sequence.cancel()
    run(llama.tokenize(b"Next"))
    took = time.monotonic() - cancelled
    assert engine.stats["aborted_steps"] == before + 1
    assert sequence.done and sequence.finish_reason is None
    # Without the abort the rest of the step (about 4/5 of it) came first.
    assert took < step / 2, (took, step)


def test_openai_client_reads_several_choices_streamed_and_not(live: LiveServer) -> None:
    # Under gunicorn's gevent worker, the official client reads streamed
    # choices by their index, and they add up to the whole ones.
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
    body: dict[str, Any] = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Pick a word."}],
        "max_tokens": 30,
        "n": 3,
        "seed": 9,
        "temperature": 1,
    }
    whole = client.chat.completions.create(**body)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    texts: dict[int, str] = {0: "", 1: "", 2: ""}
    for chunk in client.chat.completions.create(**body, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert [texts[i] for i in range(3)] == [c.message.content for c in whole.choices]
    assert len(set(texts.values())) > 1
