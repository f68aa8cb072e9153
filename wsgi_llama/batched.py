"""llama-cpp-python's completion call, run on the engine.

The endpoints and llama-cpp-python's chat handlers (which template the
messages, add stop strings and grammars, and turn completion chunks into chat
chunks) are given an :class:`EngineLlama` in place of the model: its
``create_completion`` submits a sequence to the engine and returns
llama-cpp-python-shaped results.

The code that calls it runs in a :class:`Pump`, a child greenlet that hands
control back whenever it waits for the engine. The request's own code then
waits cooperatively (sending heartbeats, watching the client) and resumes it:
one wait per token, no thread and no polling.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import greenlet

from .engine import Request, Sequence, Token, tokens_of
from .sampling import SamplingParams
from .threads import Signal


class Unbatchable(Exception):
    """The request needs what the engine does not do: take the one-at-a-time path."""


class Pump:
    """Runs *fn(pump)* in a child greenlet that steps out whenever it must wait.

    :meth:`step` returns ``("wait", sequence)`` when the code waits for the
    engine, ``("item", value)`` for each :meth:`emit`, and ``("done", result)``
    at the end; exceptions raised by *fn* come out of :meth:`step`.
    """

    def __init__(self, fn: Callable[[Pump], Any]) -> None:
        self._fn = fn
        self._child = greenlet.greenlet(self._main)
        self._caller: Any = None

    def _main(self) -> tuple[str, Any]:
        return ("done", self._fn(self))

    def step(self) -> tuple[str, Any]:
        self._caller = greenlet.getcurrent()
        return self._child.switch()  # type: ignore[no-any-return]

    def wait(self, sequence: Sequence) -> None:
        """Called by the child: let the caller wait until *sequence* is ready."""
        self._caller.switch(("wait", sequence))

    def emit(self, value: Any) -> None:
        self._caller.switch(("item", value))

    def close(self) -> None:
        """End the child (its ``finally`` blocks cancel its sequence)."""
        if self._child and not self._child.dead:
            self._child.throw(greenlet.GreenletExit)


class Choices:
    """The pumps of a request's *n* choices, run as one :class:`Pump`.

    :meth:`step` returns each choice's items as they come, the choice's
    ``index`` set and every chunk under the first one's id; ``("done",
    results)`` once all have ended. Their sequences share one
    :class:`~.threads.Signal`, so waiting for whichever comes next is one
    wait, without polling.
    """

    def __init__(self, pumps: list[Pump]) -> None:
        self._pumps = pumps
        self._states: list[tuple[str, Any] | None] = [None] * len(pumps)
        self._next = 0
        self._id: tuple[Any, Any] | None = None

    def step(self) -> tuple[str, Any]:
        n = len(self._pumps)
        waiting = []
        for k in range(n):
            i = (self._next + k) % n
            kind, value = self._advance(i)
            if kind == "item":
                self._states[i] = None
                self._next = (i + 1) % n  # the others' turn first
                return ("item", self._indexed(i, value))
            if kind == "wait":
                waiting.append(value)
        if waiting:
            return ("wait", _AnyOf(waiting))
        return ("done", [value for _, value in self._states])  # type: ignore[misc]

    def _advance(self, i: int) -> tuple[str, Any]:
        state = self._states[i]
        while state is None or (state[0] == "wait" and state[1].ready()):
            state = self._states[i] = self._pumps[i].step()
        return state

    def _indexed(self, i: int, chunk: dict[str, Any]) -> dict[str, Any]:
        for choice in chunk.get("choices", []):
            choice["index"] = i
        if self._id is None:
            self._id = (chunk.get("id"), chunk.get("created"))
        chunk["id"], chunk["created"] = self._id
        return chunk

    def close(self) -> None:
        for pump in self._pumps:
            pump.close()


class _AnyOf:
    """Ready when any of *sequences* is; they share one signal."""

    def __init__(self, sequences: list[Sequence]) -> None:
        self._sequences = sequences

    def ready(self) -> bool:
        return any(sequence.ready() for sequence in self._sequences)

    def wait(self, timeout: float | None = None) -> bool:
        if self.ready():
            return True
        signal = self._sequences[0]._signal
        signal.clear()
        if self.ready():
            return True
        signal.wait(timeout)
        return self.ready()


def wait_blocking(sequence: Sequence) -> None:
    sequence.wait(None)


class EngineLlama:
    """The parts of :class:`llama_cpp.Llama` a chat handler uses, on the engine.

    Anything else it asks for raises :class:`Unbatchable`, so the request
    takes the one-at-a-time path instead.
    """

    verbose = False

    def __init__(
        self,
        model: Any,
        call: Callable[..., Any],
        wait: Callable[[Sequence], None] = wait_blocking,
        queue_timeout: float | None = None,
        signal: Signal | None = None,
        choice: int = 0,
    ) -> None:
        self._pool_model = model
        self._signal = signal
        # Choice i of a seeded request samples with seed + i: n choices differ.
        self._choice = choice
        self._queue_timeout = queue_timeout
        self._llama = model.llama
        self._call = call
        self._wait = wait
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.sequence: Sequence | None = None

    def __getattr__(self, name: str) -> Any:
        raise Unbatchable(f"llama.{name}")

    def tokenize(
        self, text: bytes, add_bos: bool = True, special: bool = False
    ) -> list[int]:
        # Runs in a native thread: the hub must not tokenize long prompts.
        return self._call(self._llama.tokenize, text, add_bos=add_bos, special=special)

    def detokenize(self, tokens: list[int], *args: Any, **kwargs: Any) -> bytes:
        return self._llama.detokenize(tokens, *args, **kwargs)

    def token_bos(self) -> int:
        return self._llama.token_bos()

    def token_eos(self) -> int:
        return self._llama.token_eos()

    def n_ctx(self) -> int:
        return self._llama.n_ctx()

    def create_completion(
        self,
        prompt: str | list[int],
        suffix: str | None = None,
        max_tokens: int | None = 16,
        temperature: float = 0.8,
        top_p: float = 0.95,
        min_p: float = 0.05,
        typical_p: float = 1.0,
        logprobs: int | None = None,
        echo: bool = False,
        stop: str | list[str] | None = None,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        repeat_penalty: float = 1.0,
        top_k: int = 40,
        stream: bool = False,
        seed: int | None = None,
        tfs_z: float = 1.0,
        mirostat_mode: int = 0,
        mirostat_tau: float = 5.0,
        mirostat_eta: float = 0.1,
        model: str | None = None,
        stopping_criteria: Any = None,
        logits_processor: Any = None,
        grammar: Any = None,
        logit_bias: dict[Any, float] | None = None,
    ) -> Any:
        if suffix is not None or echo or logits_processor:
            raise Unbatchable("suffix, echo or logits processors")
        if isinstance(prompt, str):
            prompt = (
                self.tokenize(prompt.encode("utf-8"), special=True)
                if prompt
                else [self.token_bos()]
            )
        n_ctx = self._llama.n_ctx()
        if len(prompt) >= n_ctx:
            raise ValueError(
                f"Requested tokens ({len(prompt)}) exceed context window of {n_ctx}"
            )
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        params = SamplingParams(
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            typical_p=typical_p,
            repeat_penalty=repeat_penalty,
            presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty,
            mirostat_mode=mirostat_mode,
            mirostat_tau=mirostat_tau,
            mirostat_eta=mirostat_eta,
            seed=None if seed is None else (seed + self._choice) % 2**32,
            logit_bias={int(k): float(v) for k, v in logit_bias.items()}
            if logit_bias
            else None,
            grammar=getattr(grammar, "_grammar", grammar),
            logprobs=logprobs,
        )
        request = Request(
            prompt=list(prompt),
            params=params,
            max_tokens=max_tokens if max_tokens and max_tokens > 0 else None,
            stop=[s for s in stops if s],
            criteria=stopping_criteria,
            queue_timeout=self._queue_timeout,
        )
        sequence = self._pool_model.engine.submit(request, self._signal)
        self.sequence = sequence
        self.prompt_tokens = sequence.prompt_tokens
        shape = _Shape(model or self._llama.model_path, logprobs is not None)
        if stream:
            return self._stream(sequence, shape)
        return self._whole(sequence, shape)

    def _count(self, sequence: Sequence) -> None:
        self.completion_tokens = sequence.completion_tokens

    def _stream(self, sequence: Sequence, shape: _Shape) -> Iterator[dict[str, Any]]:
        for token in tokens_of(sequence, self._wait):
            self._count(sequence)
            yield shape.chunk(token.text, shape.logprobs([token]), None)
        self._count(sequence)
        yield shape.chunk("", None, sequence.finish_reason)

    def _whole(self, sequence: Sequence, shape: _Shape) -> dict[str, Any]:
        tokens = list(tokens_of(sequence, self._wait))
        self._count(sequence)
        result = shape.chunk(
            "".join(t.text for t in tokens),
            shape.logprobs(tokens),
            sequence.finish_reason,
        )
        result["usage"] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }
        return result


class _Shape:
    """llama-cpp-python's completion dicts for one request."""

    def __init__(self, model: str, logprobs: bool) -> None:
        self.id = f"cmpl-{uuid.uuid4()}"
        self.created = int(time.time())
        self.model = model
        self.want_logprobs = logprobs
        self.offset = 0

    def logprobs(self, tokens: list[Token]) -> dict[str, Any] | None:
        if not self.want_logprobs:
            return None
        offsets = []
        for token in tokens:
            offsets.append(self.offset)
            self.offset += len(token.text)
        return {
            "tokens": [t.text for t in tokens],
            "text_offset": offsets,
            "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [t.top for t in tokens],
        }

    def chunk(
        self, text: str, logprobs: dict[str, Any] | None, finish_reason: str | None
    ) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "text": text,
                    "index": 0,
                    "logprobs": logprobs,
                    "finish_reason": finish_reason,
                }
            ],
        }
