"""The model pool: loaded models, and the fair queue in front of each.

With ``LLAMA_PARALLEL`` above 1, a model's :class:`~.engine.Engine` batches
requests and is also the queue for those it cannot batch. Otherwise one
llama.cpp context generates for one request at a time and the others wait in
a :class:`FairQueue`, in FIFO order.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import re
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import llama_cpp
import llama_cpp._internals as internals
import numpy as np
from llama_cpp.llama_grammar import LlamaGrammar, json_schema_to_gbnf

from .alignment import align_work_buffers
from .config import ConfigError, ModelSettings, Settings
from .engine import Engine, QueueFull, chunk_end
from .engine import QueueTimeout as QueueTimeout  # re-exported
from .errors import APIError
from .threads import CallQueue, ModelThread
from .tuning import ThreadTuner


class Llama(llama_cpp.Llama):
    """llama-cpp-python's model, counting tokens and keeping logits on demand."""

    prompt_tokens = 0
    completion_tokens = 0
    #: Set (from another thread) to end the running generation at its next token.
    cancelled = False
    #: The thread count's tuner when no engine runs this model (it has its own).
    tuner: ThreadTuner | None = None
    _max_tokens: int | None = None

    def __init__(self, *args: Any, n_parallel: int = 1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if n_parallel > 1:
            self._hold_sequences(n_parallel, kwargs.get("swa_full"))

    def _hold_sequences(self, n: int, swa_full: bool | None) -> None:
        """Replace the context with one that holds *n* sequences for the engine.

        The KV cache is unified, so one long request may still use all of it;
        a sliding-window cache is kept whole (unless configured otherwise) so
        that a finished sequence's prefix stays reusable past the window.
        """
        params = self.context_params
        params.n_seq_max = n
        params.kv_unified = True
        if swa_full is None:
            params.swa_full = True
        # The old one goes first: both at once raised the process's peak (after
        # a 1.4k-token prompt, Gemma 3 270M) from 577 to 695 MB with a context
        # of 8192, and from 1029 to 1584 MB with 32768.
        self._ctx.close()
        self._ctx = self._stack.enter_context(
            contextlib.closing(
                internals.LlamaContext(
                    model=self._model, params=params, verbose=self.verbose
                )
            )
        )

    def create_completion(self, *args: Any, **kwargs: Any) -> Any:
        # Chat handlers call this too: remember the cap for generate().
        self._max_tokens = kwargs.get("max_tokens", 16)
        return super().create_completion(*args, **kwargs)

    def generate(
        self, tokens: Sequence[int], *args: Any, **kwargs: Any
    ) -> Iterator[int]:  # type: ignore[override]
        # Streamed chunks carry no usage; count it here for include_usage.
        self.prompt_tokens = len(tokens)
        self.completion_tokens = 0
        # llama-cpp-python checks max_tokens only while the text so far is
        # valid UTF-8: biased to lead bytes, a generation would run until the
        # KV cache is full, past any cap, and fail there. A character needs at
        # most 3 tokens more; the KV cache holds n_ctx tokens in all.
        limit = self._n_ctx - len(tokens)
        if self._max_tokens is not None and self._max_tokens > 0:
            limit = min(limit, self._max_tokens + 3)
        vocab = self._model.vocab
        inner = super().generate(tokens, *args, **kwargs)
        try:
            for produced, token in enumerate(inner):
                if produced >= limit or self.cancelled:
                    return
                if not llama_cpp.llama_vocab_is_eog(vocab, token):
                    self.completion_tokens += 1
                yield token
        finally:
            inner.close()
            self._free_sampler()
            if self.tuner is not None:
                self.tuner.pause()

    def eval(self, tokens: Sequence[int]) -> None:
        """Decode with the tuner's thread count, timing generation steps for it.

        A prompt after a reused prefix (llama-cpp-python keeps the one it
        shares with the last) has its first chunk cut as the engine cuts it
        (see :func:`.engine.chunk_end`).
        """
        start = self.n_tokens
        if len(tokens) > self.n_batch:
            first = chunk_end(start, start + self.n_batch) - start
            if first < self.n_batch:
                self._eval(tokens[:first])
                tokens = tokens[first:]
        self._eval(tokens)

    def _eval(self, tokens: Sequence[int]) -> None:
        tuner = self.tuner
        if tuner is None:
            super().eval(tokens)
            return
        tuner.apply(self._ctx.ctx)
        started, cpu = time.perf_counter(), time.process_time()
        super().eval(tokens)
        if len(tokens) == 1:
            seconds = time.perf_counter() - started
            tuner.record(1, seconds, time.process_time() - cpu)

    def _free_sampler(self) -> None:
        """Free llama-cpp-python's sampler chain now, not at the next full GC.

        The chain holds an n_vocab buffer in C (3 MB for Gemma's vocabulary) and
        sits in a reference cycle, so each request's chain outlived it: 200
        simultaneous requests one at a time took the process from 460 MB to
        1 GB. :meth:`sample` makes a new chain when it finds none.
        """
        sampler, self._sampler = self._sampler, None
        if sampler is not None:
            sampler.close()

    @contextmanager
    def all_logits(self) -> Iterator[None]:
        """Keep logits for every token while the block runs (for logprobs).

        They cost a row of n_vocab floats per token, so they are kept only for
        requests that ask. The KV cache is reset on entry and exit because a
        cached prefix has no logits to reuse.
        """
        if self._logits_all:
            yield
            return
        small = self.scores
        self.scores = np.ndarray((self._n_ctx, self._n_vocab), dtype=np.single)
        self._logits_all = True
        self.reset()
        try:
            yield
        finally:
            self._logits_all = False
            self.scores = small
            self.reset()


_NUL = r"(?:\\x0{2}|\\u0{4}|\\U0{8}|\x00)"
# A string literal with a NUL in it, or a character class of NUL alone.
_MATCHES_ONLY_NUL = re.compile(
    rf'"(?:[^"\\]|\\.)*?{_NUL}(?:[^"\\]|\\.)*"|\[{_NUL}(?:-{_NUL})?\]'
)


MAX_WORD = 50_000
_BOUNDS = {"minLength", "maxLength", "minItems", "maxItems", "minProperties"}
_QUANTIFIER = re.compile(r"\{(\d+)(?:,(\d*))?\}")


def _check_bounds(schema: Any, limit: int, param: str) -> None:
    """Refuse lengths no output could reach: the grammar would spell each out.

    ``{"minLength": 1000000000}`` made a grammar that grew until the kernel
    killed the worker.
    """
    if isinstance(schema, list):
        for item in schema:
            _check_bounds(item, limit, param)
    if not isinstance(schema, dict):
        return
    for key, value in schema.items():
        numbers: list[int] = []
        if key in _BOUNDS and isinstance(value, int):
            numbers = [value]
        elif key == "pattern" and isinstance(value, str):
            numbers = [int(n) for pair in _QUANTIFIER.findall(value) for n in pair if n]
        if any(n > limit for n in numbers):
            raise APIError(
                f"The JSON schema's {key} asks for more than this model's "
                "context can hold.",
                param=param,
            )
        _check_bounds(value, limit, param)


class Ticket:
    """A place in a model's queue; :meth:`wait` returns True once it is our turn."""

    def __init__(self, queue: FairQueue, event: Any) -> None:
        self._queue = queue
        self._event = event
        self._left = False

    def wait(self, timeout: float | None = None) -> bool:
        return self._event is None or bool(self._event.wait(timeout))

    def leave(self) -> None:
        """Give up the place, or the model if it was ours. Idempotent."""
        if not self._left:
            self._left = True
            self._queue._leave(self)


class FairQueue:
    """A FIFO lock for greenlets and threads alike.

    Waiters' events are made when they arrive, so under gevent they are
    gevent's events even when the pool was built before monkey-patching.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._mutex = threading.Lock()
        self._waiters: deque[Ticket] = deque()
        self._busy = False

    def __len__(self) -> int:
        return len(self._waiters)

    @property
    def running(self) -> int:
        """Requests generating now (for metrics): 0 or 1."""
        return int(self._busy)

    def check_room(self, alias: str) -> None:
        """Raise :class:`QueueFull` if a request arriving now would be turned away."""
        if self._busy and len(self._waiters) >= self.limit:
            raise QueueFull(alias)

    def enter(self, alias: str) -> Ticket:
        with self._mutex:
            if not self._busy:
                self._busy = True
                return Ticket(self, None)
            self.check_room(alias)
            ticket = Ticket(self, threading.Event())
            self._waiters.append(ticket)
            return ticket

    def _leave(self, ticket: Ticket) -> None:
        with self._mutex:
            if ticket in self._waiters and not ticket.wait(0):
                self._waiters.remove(ticket)
                return
            if self._waiters:
                self._waiters.popleft()._event.set()
            else:
                self._busy = False


class Model:
    """A loaded model, its queue and the facts requests are checked against."""

    def __init__(self, settings: ModelSettings, server: Settings) -> None:
        """Load the model *settings* name, with the mount-wide *server* settings
        (parallel sequences, queue, prompt cache)."""
        parallel = server.parallel
        self.alias = settings.alias
        self.path = settings.path
        self.options = settings.options
        self.embedding = bool(settings.options.get("embedding"))
        if self.embedding:
            parallel = 1  # llama-cpp-python embeds with a context of its own making
        #: Sequences in the context (LLAMA_PARALLEL as this model got it).
        self.parallel = parallel
        align_work_buffers()  # before the first decode allocates them
        try:
            self.llama = Llama(
                model_path=str(settings.path), n_parallel=parallel, **settings.options
            )
        except (ValueError, RuntimeError, TypeError) as exc:
            raise ConfigError(
                settings.key, f"cannot load {str(settings.path)!r}: {exc}"
            ) from None
        #: The batching engine (None: one request at a time, in FIFO order).
        self.engine: Engine | None = None
        #: Where requests that hold the whole context wait their turn.
        self.queue: FairQueue | Engine
        if parallel > 1:
            self.engine = Engine(
                self.llama,
                self.alias,
                parallel,
                server.queue_size,
                server.queue_timeout,
                server.prompt_cache,
                nice=server.compute_nice,
            )
            self.queue = self.engine
        else:
            self.queue = FairQueue(server.queue_size)
            # Other processes' busy cores stall llama.cpp's threads (see .tuning).
            self.llama.tuner = ThreadTuner(self.llama.context_params.n_threads)
        #: The one thread where the model decodes (see :class:`CallQueue`).
        self.runner: CallQueue = (
            self.engine.calls
            if self.engine is not None
            else ModelThread(server.compute_nice)
        )
        self.created = int(settings.path.stat().st_mtime)
        self.n_ctx = self.llama.n_ctx()
        self.n_vocab = self.llama.n_vocab()
        self.longest_token = self._longest_token()

    def _longest_token(self) -> int:
        """The most bytes one token stands for (bounds tokens per text)."""
        buffer = ctypes.create_string_buffer(1024)
        vocab = self.llama._model.vocab
        return max(
            abs(llama_cpp.llama_token_to_piece(vocab, token, buffer, 1024, 0, True))
            for token in range(self.n_vocab)
        )

    def check_text(self, text: str, param: str, whole: bool = True) -> None:
        """Refuse, before tokenizing, texts that would cost far too much.

        llama.cpp's tokenizer is quadratic in the length of a word: 200 kB
        without whitespace take seconds of CPU, 1 MB minutes. With *whole*,
        the text must also fit in the context.
        """
        if whole and len(text.encode("utf-8")) > self.n_ctx * self.longest_token:
            raise APIError(
                f"The text is longer than this model's context of {self.n_ctx} "
                "tokens could hold.",
                param=param,
                code="context_length_exceeded",
            )
        if max(map(len, text.split()), default=0) > MAX_WORD:
            raise APIError(
                f"The text has a run of more than {MAX_WORD} characters without "
                "whitespace, which llama.cpp tokenizes in quadratic time.",
                param=param,
            )

    def check_tokens(self, tokens: Iterable[int], param: str) -> None:
        """Reject token ids outside the vocabulary: llama.cpp aborts the process."""
        for token in tokens:
            if not 0 <= token < self.n_vocab:
                raise APIError(
                    f"Token id {token} is out of range: this model's vocabulary "
                    f"has ids 0 to {self.n_vocab - 1}.",
                    param=param,
                    code="invalid_token_id",
                )

    def grammar(self, gbnf: str, param: str) -> LlamaGrammar:
        """A GBNF grammar that llama.cpp has parsed.

        llama-cpp-python parses grammars only when sampling starts, and hands
        one that fails to the sampler as NULL, which crashes the process.
        """
        if _MATCHES_ONLY_NUL.search(gbnf):
            # llama.cpp never samples a token that starts with NUL; a grammar
            # that requires one leaves no candidate, and accepting the token
            # sampled anyway throws through the C API and aborts the process.
            raise APIError(
                "Invalid grammar: it can require a NUL character, which no "
                "token produces.",
                param=param,
            )
        sampler = llama_cpp.llama_sampler_init_grammar(
            self.llama._model.vocab, gbnf.encode("utf-8"), b"root"
        )
        if not sampler:
            raise APIError(
                "Invalid grammar: llama.cpp could not parse it (GBNF with a "
                "'root' rule expected).",
                param=param,
            )
        llama_cpp.llama_sampler_free(sampler)
        return LlamaGrammar.from_string(gbnf, verbose=False)

    def json_grammar(self, schema: Any, param: str) -> LlamaGrammar:
        """The grammar that constrains output to *schema*, checked as above."""
        _check_bounds(schema, self.n_ctx * self.longest_token, param)
        try:
            gbnf = json_schema_to_gbnf(json.dumps(schema))
        except Exception as exc:
            raise APIError(f"Unsupported JSON schema: {exc}", param=param) from None
        return self.grammar(gbnf, param)

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.alias,
            "object": "model",
            "created": self.created,
            "owned_by": "wsgi-llama",
        }


class Pool:
    """The models an app serves, by alias."""

    def __init__(self, models: Sequence[Model]) -> None:
        self.models = {model.alias: model for model in models}
        self.started = time.time()

    @classmethod
    def load(cls, settings: Settings) -> Pool:
        return cls([Model(m, settings) for m in settings.models])

    def get(self, name: Any) -> Model:
        """The model a request names; with a single model, any name gets it."""
        if len(self.models) == 1:
            return next(iter(self.models.values()))
        if isinstance(name, str) and name in self.models:
            return self.models[name]
        if not name:
            raise APIError(
                "This server has several models; say which one in 'model': "
                + ", ".join(self.models),
                param="model",
            )
        raise APIError(
            f"The model {name!r} does not exist. Available: " + ", ".join(self.models),
            404,
            param="model",
            code="model_not_found",
        )

    def close(self) -> None:
        for model in self.models.values():
            if model.engine is not None:
                model.engine.close()
            model.llama.close()
