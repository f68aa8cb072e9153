"""Continuous batching: one llama.cpp context, several sequences, one loop.

Per model, one native thread runs the loop: admit waiting requests into free
sequence slots (reusing the cached prefix a slot already holds), build one
``llama_batch`` with the next token of every generating sequence plus bounded
prompt chunks of newcomers, decode, sample each sequence with its own sampler
chain, and hand each its text. Requests wait on their :class:`Sequence` without
polling: the loop wakes each in the thread it waits in (the gevent hub's, via
``run_callback_threadsafe``, or a plain thread's).

A request the engine cannot batch takes the whole context for itself through
:meth:`Engine.enter` (the same ticket as :class:`~.pool.FairQueue`'s), in FIFO
order with the sequences.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass, field
from typing import Any

import llama_cpp
import numpy as np

from .errors import APIError
from .prompt_cache import PromptCache, common_prefix
from .sampling import Detokenizer, Sampler, SamplingParams, StopMatcher
from .threads import (
    CallQueue,
    Signal,
    lower_priority,
    native_id,
    native_lock,
    start_native_thread,
)
from .tuning import ThreadTuner

log = logging.getLogger("wsgi_llama.engine")

#: Prompt tokens per step while other sequences generate: their next token
#: waits for the chunk, so it stays short.
PREFILL_CHUNK = 128
#: Steps with at least this many tokens may be cut short for a departed client.
ABORTABLE = 64
#: Sequences shorter than this are not saved in the prompt cache, nor copied
#: back to gain fewer tokens than this: evaluating so few again costs about
#: what the copy would.
CACHE_MIN = 64
#: A prompt whose next tokens another starting prompt will evaluate waits for
#: it (and then shares its cells) when they are at least this many: fewer
#: cost less than the step it would wait.
SHARE_WAIT = 32
#: llama.cpp attends over the KV cells up to the last used one, rounded up to
#: a multiple of this (``llama_kv_cache::get_n_kv``).
KV_PAD = 256
#: Seconds the loop stays idle before it moves each idle sequence of
#: :data:`KV_PAD` cells or more to the prompt cache; ``None``: never.
MOVE_OUT_AFTER: float | None = 0.1


class QueueFull(APIError):
    def __init__(self, alias: str) -> None:
        super().__init__(
            f"The queue for model {alias!r} is full; retry shortly.",
            503,
            code="queue_full",
            headers={"Retry-After": "1"},
        )


class QueueTimeout(APIError):
    def __init__(self, alias: str, waited: float) -> None:
        super().__init__(
            f"Waited {waited:g} s in the queue for model {alias!r}; retry later.",
            503,
            code="queue_timeout",
            headers={"Retry-After": "1"},
        )


class _Waiter:
    """Something a request waits on and the loop's thread completes."""

    def __init__(self, engine: Engine, signal: Signal | None = None) -> None:
        self.engine = engine
        self._signal = signal or Signal()
        self.enqueued = time.monotonic()

    def ready(self) -> bool:
        raise NotImplementedError

    def wait(self, timeout: float | None = None) -> bool:
        """Wait up to *timeout* seconds; return whether :meth:`ready`."""
        if self.ready():
            return True
        self._signal.clear()
        if self.ready():
            return True
        self._signal.wait(timeout)
        return self.ready()

    def _wake(self) -> None:
        """Loop's thread only: the waiter is woken at the loop's next pause."""
        self.engine._woken.append(self._signal)


@dataclass
class Token:
    """What one step hands a sequence: released text, and logprobs if asked."""

    text: str
    logprob: float | None = None
    top: dict[str, float] | None = None


@dataclass
class Request:
    """A generation as the engine takes it."""

    prompt: list[int]
    params: SamplingParams
    max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    #: llama-cpp-python stopping criteria, called with the tokens so far.
    criteria: Callable[[Any, Any], bool] | None = None
    #: Seconds it may wait for a sequence (None: the engine's); mounts differ.
    queue_timeout: float | None = None


class Sequence(_Waiter):
    """One request's generation: its handle for the request, its state for the loop."""

    def __init__(
        self, engine: Engine, request: Request, signal: Signal | None = None
    ) -> None:
        super().__init__(engine, signal)
        self.request = request
        self.prompt_tokens = len(request.prompt)
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.error: Exception | None = None
        self.done = False
        self.cancelled = False
        self.first_token_at: float | None = None
        self._out: deque[Token] = deque()
        # The loop's own state.
        self._slot: _Slot | None = None
        self._n_past = 0  # tokens of this sequence in the KV cache
        self._pending: int | None = None  # sampled, not yet decoded
        self._generated: list[int] = []
        self._sampler: Sampler | None = None
        self._detok: Detokenizer | None = None
        self._stops = StopMatcher(request.stop)

    def ready(self) -> bool:
        return bool(self._out) or self.done

    def take(self) -> list[Token]:
        """The tokens handed out since the last call (never blocks)."""
        out = []
        while self._out:
            out.append(self._out.popleft())
        return out

    def cancel(self) -> None:
        """The client went away: free the sequence at the loop's next step."""
        if not self.done and not self.cancelled:
            self.cancelled = True
            self.engine._cancelled(self)

    # --- the loop's side -------------------------------------------------------

    def _push(self, token: Token) -> None:
        self._out.append(token)
        self._wake()

    def _end(self, reason: str | None, error: Exception | None = None) -> None:
        if self.done:
            return
        self.finish_reason = reason
        self.error = error
        if self._sampler is not None:
            self._sampler.close()
            self._sampler = None
        self.done = True
        self._wake()


class _Gate(_Waiter):
    """A ticket for a request that needs the whole context (not batched)."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine)
        self.granted = False
        self._left = False

    def ready(self) -> bool:
        return self.granted

    def leave(self) -> None:
        """Give up the place, or the context if it was ours. Idempotent."""
        if not self._left:
            self._left = True
            self.engine._leave(self)


class _Slot:
    """A sequence id in the context and the tokens its KV cells hold."""

    def __init__(self, seq_id: int) -> None:
        self.id = seq_id
        self.tokens: list[int] = []
        self.owner: Sequence | None = None
        self.used = 0.0


def _partial(detok: Detokenizer) -> bool:
    """Whether *detok* holds the first bytes of a character."""
    return bool(detok._decoder.getstate()[0])


def chunk_end(start: int, end: int) -> int:
    """Where a prompt chunk from *start* should end, given it may reach *end*.

    Back to a multiple of :data:`KV_PAD` when that keeps at least half the
    chunk: a chunk that ends just past one (say after a reused one-token
    prefix) makes every later chunk attend over up to 255 empty cells, which
    made a 1.6k-token prompt 2-5 % slower on Gemma 3 270M.
    """
    aligned = end - end % KV_PAD
    return aligned if 2 * (aligned - start) >= end - start else end


def distinct_cells(token_lists: list[list[int]]) -> int:
    """How many KV cells *token_lists* take when common prefixes share cells.

    The size of their prefix tree: each list in sorted order adds what it
    does not share with the one before it.
    """
    total, previous = 0, []
    for tokens in sorted(token_lists):
        total += len(tokens) - common_prefix(previous, tokens)
        previous = tokens
    return total


class _TokenView(SequenceABC):  # type: ignore[type-arg]
    """Prompt and generated tokens as one sequence, for stopping criteria."""

    def __init__(self, prompt: list[int], generated: list[int]) -> None:
        self._a, self._b = prompt, generated

    def __len__(self) -> int:
        return len(self._a) + len(self._b)

    def __getitem__(self, i: Any) -> Any:
        return (self._a + self._b)[i] if isinstance(i, slice) else self._item(i)

    def _item(self, i: int) -> int:
        n = len(self)
        i = i + n if i < 0 else i
        if not 0 <= i < n:
            raise IndexError(i)
        return self._a[i] if i < len(self._a) else self._b[i - len(self._a)]


class _Batch:
    """A llama_batch over numpy arrays the engine owns (never llama_batch_free'd).

    Between two decodes every Python operation runs on caches the model's
    weights have just flushed, several times slower than usual: the struct is
    built once, and a generating sequence's one token is set element-wise.
    """

    def __init__(self, capacity: int, n_seq: int) -> None:
        self.token = np.zeros(capacity, np.int32)
        self.pos = np.zeros(capacity, np.int32)
        self.n_seq_id = np.ones(capacity, np.int32)
        self.logits = np.zeros(capacity, np.int8)
        self._ids = np.arange(n_seq, dtype=np.int32)
        self._ids_at = self._ids.ctypes.data
        self.seq_ptr = np.zeros(capacity, np.uintp)
        self.n = 0
        self.capacity = capacity
        i32 = ctypes.POINTER(ctypes.c_int32)
        self._struct = llama_cpp.llama_batch(
            n_tokens=0,
            token=self.token.ctypes.data_as(i32),
            embd=None,
            pos=self.pos.ctypes.data_as(i32),
            n_seq_id=self.n_seq_id.ctypes.data_as(i32),
            seq_id=ctypes.cast(self.seq_ptr.ctypes.data, ctypes.POINTER(i32)),
            logits=self.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8)),
        )

    def add(self, tokens: list[int], pos: int, seq_id: int, output_last: bool) -> int:
        """Append *tokens* of one sequence; return the row of the last one."""
        a, b = self.n, self.n + len(tokens)
        if b - a == 1:
            self.token[a] = tokens[0]
            self.pos[a] = pos
            self.seq_ptr[a] = self._ids_at + 4 * seq_id
            self.logits[a] = output_last
        else:
            self.token[a:b] = tokens
            self.pos[a:b] = np.arange(pos, pos + len(tokens), dtype=np.int32)
            self.seq_ptr[a:b] = self._ids_at + 4 * seq_id
            self.logits[a:b] = 0
            if output_last:
                self.logits[b - 1] = 1
        self.n = b
        return b - 1

    def struct(self) -> llama_cpp.llama_batch:
        """The batch of the tokens added since ``n`` was last set to 0."""
        self._struct.n_tokens = self.n
        return self._struct


def _abort_callback() -> Any:
    """An abort callback that reads a flag byte without calling into Python.

    llama.cpp calls it between graph nodes; a Python callback would take the
    GIL hundreds of times per step. libc's ``strlen`` on a two-byte buffer
    returns 1 when the first byte is set, 0 otherwise: exactly ``bool(flag)``.
    """
    libc = ctypes.CDLL(None)
    return llama_cpp.ggml_abort_callback(
        ctypes.cast(libc.strlen, ctypes.c_void_p).value
    )


class Engine:
    """The loop and its sequences for one model's context."""

    def __init__(
        self,
        llama: llama_cpp.Llama,
        alias: str,
        n_parallel: int,
        queue_size: int,
        queue_timeout: float,
        prompt_cache: int = 0,
        nice: int = 0,
    ) -> None:
        self.llama = llama
        self.nice = nice
        #: The loop's OS thread id once it runs (for logs and tests).
        self.thread_id: int | None = None
        self.alias = alias
        self.n_parallel = n_parallel
        self.queue_size = queue_size
        self.queue_timeout = queue_timeout
        self.n_ctx = llama.n_ctx()
        self.n_batch = llama.n_batch
        self._ctx = llama._ctx.ctx
        self._vocab = llama._model.vocab
        self.n_vocab = llama.n_vocab()
        model = llama._model.model
        self._n_swa = max(1, llama_cpp.llama_model_n_swa(model))
        # A recurrent state is the whole sequence's: no prefix of it to share.
        self._shares = not (
            llama_cpp.llama_model_is_recurrent(model)
            or llama_cpp.llama_model_is_hybrid(model)
        )
        self._lock = native_lock()
        self._wakeup = native_lock()
        self._wakeup.acquire()  # held: nothing to do; released: look again
        self._waiting: deque[Sequence | _Gate] = deque()
        self._active: list[Sequence] = []
        self._slots = [_Slot(i) for i in range(n_parallel)]
        self._gate: _Gate | None = None
        self._batch = _Batch(self.n_batch, n_parallel)
        self._in_flight: list[Sequence] = []
        #: Signals to set at the loop's next pause (see _wake_all).
        self._woken: list[Signal] = []
        self._flag = ctypes.create_string_buffer(2)
        # llama_get_logits returning the address as an int, not a pointer.
        self._get_logits = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)(
            ctypes.cast(llama_cpp.llama_get_logits, ctypes.c_void_p).value
        )
        self._logits_at: int | None = None
        self._logits_view = np.empty((0, self.n_vocab), np.float32)
        self._callback = _abort_callback()
        self._tuner = ThreadTuner(llama.context_params.n_threads)
        self._pid: int | None = None
        self._closed = False
        self._stopped = native_lock()
        #: Calls of requests that hold the whole context, run by the loop.
        self.calls = CallQueue(self._call_waiting)
        #: Finished sequences' cells, in host memory (bytes; 0: none kept).
        self.cache = PromptCache(prompt_cache) if prompt_cache > 0 else None
        #: Counters for logs and metrics (``/metrics`` reads them).
        self.stats: dict[str, float] = {
            "batched": 0,  # generations submitted
            "exclusive": 0,  # whole-context tickets
            "exclusive_requests": 0,  # generations the engine could not take
            "aborted_steps": 0,
            "reused": 0,  # prompt tokens not evaluated: held or restored
            "restored": 0,
            "shared": 0,  # of those, cells another sequence's prompt evaluated
            "steps": 0,  # decodes that succeeded
            "step_tokens": 0,  # tokens they carried
            "step_sequences": 0,  # sequences they carried
            "decode_seconds": 0.0,  # time they took
        }

    # --- the requests' side ----------------------------------------------------

    def check_room(self, alias: str | None = None) -> None:
        """Raise :class:`QueueFull` if a request arriving now would be turned away."""
        with self._lock:
            self._check_room()

    def _check_room(self) -> None:
        free = self.n_parallel - len(self._active)
        if self._gate is not None or any(isinstance(w, _Gate) for w in self._waiting):
            free = 0  # the whole context is, or will be, taken
        if len(self._waiting) >= self.queue_size + max(0, free):
            raise QueueFull(self.alias)

    def submit(self, request: Request, signal: Signal | None = None) -> Sequence:
        """Queue a generation; its :class:`Sequence` fills as the loop runs.

        Sequences given one *signal* (the choices of one request) wake whoever
        waits on it whenever any of them has something new.
        """
        sequence = Sequence(self, request, signal)
        with self._lock:
            self._check_room()
            self._waiting.append(sequence)
            self.stats["batched"] += 1
        self._start()
        self._poke()
        return sequence

    def enter(self, alias: str | None = None) -> _Gate:
        """A ticket for the whole context: :meth:`_Gate.wait`, then ``leave()``."""
        gate = _Gate(self)
        with self._lock:
            self._check_room()
            self._waiting.append(gate)
            self.stats["exclusive"] += 1
        self._start()
        self._poke()
        return gate

    def keep_prompts(self, capacity: int) -> None:
        """Let the prompt cache hold at least *capacity* bytes."""
        if self.cache is None:
            if capacity > 0:
                self.cache = PromptCache(capacity)
        else:
            self.cache.capacity = max(self.cache.capacity, capacity)

    def __len__(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        """Sequences generating now (for metrics)."""
        return len(self._active) + (self._gate is not None)

    @property
    def limit(self) -> int:
        """The queue's length, as :class:`~.pool.FairQueue` calls it."""
        return self.queue_size

    @limit.setter
    def limit(self, value: int) -> None:
        self.queue_size = value

    def _leave(self, gate: _Gate) -> None:
        with self._lock:
            if gate in self._waiting:
                self._waiting.remove(gate)
        self._poke()

    def _cancelled(self, sequence: Sequence) -> None:
        if sequence in self._in_flight and self._batch.n >= ABORTABLE:
            self._flag[0] = b"\x01"  # llama.cpp stops the step at its next node
        self._poke()

    def _call_waiting(self) -> None:
        self._start()
        self._poke()

    def _poke(self) -> None:
        with contextlib.suppress(RuntimeError):  # already awake
            self._wakeup.release()

    def _start(self) -> None:
        """Start the loop in this process (after a fork too), once."""
        if self._pid == os.getpid():
            return
        with self._lock:
            if self._pid == os.getpid():
                return
            self._pid = os.getpid()
            self._stopped = native_lock()
            self._stopped.acquire()
            llama_cpp.llama_set_abort_callback(
                self._ctx, self._callback, ctypes.addressof(self._flag)
            )
            start_native_thread(self._run, ())

    def close(self) -> None:
        """Stop the loop (it finishes the step it is in)."""
        self._closed = True
        self._poke()
        if self._pid == os.getpid():
            self._stopped.acquire()
            self._stopped.release()

    # --- the loop ----------------------------------------------------------------

    def _run(self) -> None:
        self.thread_id = native_id()
        lower_priority(self.nice)
        moved = True  # nothing has run since the last move-out
        idle_since: float | None = None
        try:
            while not self._closed:
                try:
                    if self.calls:
                        self.calls.run_pending()
                    busy = self._admit()
                    if busy:
                        self._step()
                        moved, idle_since = False, None
                        continue
                    self._tuner.pause()
                    self._wake_all()
                    timeout = self._idle_timeout()
                    grace = MOVE_OUT_AFTER
                    if not moved and grace is not None and self._worth_moving_out():
                        now = time.monotonic()
                        if idle_since is None:
                            idle_since = now
                        left = idle_since + grace - now
                        if left <= 0:
                            self._move_out()
                            moved = True
                            continue
                        timeout = min(timeout, left)
                    self._wakeup.acquire(timeout=timeout)
                except Exception:
                    log.exception("engine step failed")
                    self._fail_all(APIError("The model failed; try again.", 500))
        finally:
            self._wake_all()
            self._stopped.release()

    def _wake_all(self) -> None:
        """Wake the requests that have something new, all at once.

        Called just before the loop lets go of the GIL for long (a decode, a
        sleep). Woken earlier, a request's thread or the gevent hub would
        take the GIL at the loop's next short call into llama.cpp and run its
        own Python while the loop waits: that doubled the time between
        decodes.
        """
        if self._woken:
            woken, self._woken = self._woken, []
            Signal.set_all(woken)

    def _worth_moving_out(self) -> bool:
        """Whether idle sequences hold enough cells to move them out while idle.

        The next request then attends over its own cells only, as on
        llama.cpp's server, which clears idle slots at every new task (into
        its prompt cache); here the copy is made while nobody waits for it.
        """
        if self.cache is None or self._gate is not None or self._waiting:
            return False
        return any(len(slot.tokens) >= KV_PAD for slot in self._slots)

    def _move_out(self) -> None:
        """Idle sequences of :data:`KV_PAD` cells or more to the prompt cache,
        longest first, until a request arrives; shorter ones stay (their
        prefixes serve the next requests at no cost), as do those the cache
        cannot hold. Called only while idle: no slot has an owner."""
        assert self.cache is not None
        for slot in sorted(self._slots, key=lambda s: len(s.tokens), reverse=True):
            if self._waiting or len(slot.tokens) < KV_PAD:
                break
            self._save(slot)
            if self.cache.covers(slot.tokens):
                self._drop(slot, 0)

    def _idle_timeout(self) -> float:
        """How long the idle loop may sleep: until the first queue deadline."""
        waiting = [w for w in list(self._waiting) if isinstance(w, Sequence)]
        if not waiting:
            return 1.0
        first = min(w.enqueued + self._timeout(w) for w in waiting)
        return min(1.0, max(0.01, first - time.monotonic()))

    def _timeout(self, sequence: Sequence) -> float:
        timeout = sequence.request.queue_timeout
        return self.queue_timeout if timeout is None else timeout

    def _admit(self) -> bool:
        """Start waiting requests that fit; return whether a step should run."""
        starting: list[tuple[Sequence, _Slot]] = []
        now = time.monotonic()
        with self._lock:
            for item in list(self._waiting):
                if not isinstance(item, Sequence):
                    continue
                timeout = self._timeout(item)
                if item.cancelled or now - item.enqueued > timeout:
                    self._waiting.remove(item)
                    if not item.cancelled:
                        item._end(None, QueueTimeout(self.alias, timeout))
                    else:
                        item._end(None)
            if self._gate is not None:
                if self._gate._left:
                    self._gate = None
                    self._clear_memory()
                else:
                    return False
            while self._waiting:
                head = self._waiting[0]
                if isinstance(head, _Gate):
                    if self._active or starting:
                        break
                    self._waiting.popleft()
                    self._gate = head
                    for slot in self._slots:
                        self._save(slot)
                    self._clear_memory()
                    self.llama.reset()
                    # It runs with the thread count the loop found best.
                    self._tuner.apply(self._ctx, self._tuner.best)
                    head.granted = True
                    head._wake()
                    return False
                slot = self._free_slot(head.request.prompt)
                if slot is None or not self._fits(head.request, slot, starting):
                    break
                self._waiting.popleft()
                slot.owner = head
                starting.append((head, slot))
        for sequence, slot in starting:
            self._begin(sequence, slot)
        return bool(self._active)

    def _fits(
        self, request: Request, slot: _Slot, starting: list[tuple[Sequence, _Slot]]
    ) -> bool:
        """Whether *request*'s prompt, and room to generate, fit beside the others.

        The KV cache is shared: sequences that begin together must not fill
        it halfway through their prompts. Prompts that begin alike share their
        cells (see :meth:`_share`); idle slots' cached prefixes count as free
        (they are dropped when the room is needed). With nothing else running,
        a request always starts: it may have the whole context.
        """
        if not self._active and not starting:
            return True
        plans = [max(s._slot.tokens, s.request.prompt, key=len) for s in self._active]
        plans += [s.request.prompt for s, _ in starting] + [request.prompt]
        requests = [s.request for s in self._active]
        requests += [s.request for s, _ in starting] + [request]
        room = sum(min(r.max_tokens or 64, 64) for r in requests)
        return distinct_cells(plans) + room <= self.n_ctx

    def _free_slot(self, prompt: list[int]) -> _Slot | None:
        """The free slot sharing most with *prompt*, if that is a tenth of it or
        more (as llama.cpp's server chooses); else the least recently used.

        Sharing a few tokens (BOS, a name) is not worth another sequence's
        cells: they may be the next turn of its conversation. BOS alone never
        is, however short the prompt.
        """
        free = [slot for slot in self._slots if slot.owner is None]
        if not free:
            return None
        shared, best = max(
            ((common_prefix(s.tokens, prompt), s) for s in free),
            key=lambda pair: (pair[0], -pair[1].used),
        )
        if shared > 1 and 10 * shared >= len(prompt):
            return best
        return min(free, key=lambda s: s.used)

    def _clear_memory(self) -> None:
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._ctx), True)
        for slot in self._slots:
            slot.tokens = []

    def _begin(self, sequence: Sequence, slot: _Slot) -> None:
        """Set up a sequence in its slot, keeping the prefix the slot already holds."""
        request = sequence.request
        prompt = request.prompt
        keep = min(common_prefix(slot.tokens, prompt), len(prompt) - 1)
        if keep > 0 and not self._holds_window(slot, keep):
            keep = 0
        self._drop(slot, keep)
        sequence._slot = slot
        sequence._n_past = keep
        self._share(sequence)
        if self.cache is not None:
            held = sequence._n_past
            keep = self._restore(slot, prompt, held)
            if keep > held and not self._holds_window(slot, keep):
                keep = 0
            self._drop(slot, keep)
            if keep > held:
                self.stats["restored"] += keep
            sequence._n_past = keep
        keep = sequence._n_past
        if self.cache is not None and len(prompt) - keep > PREFILL_CHUNK:
            self._compact(slot)
        self.stats["reused"] += len(slot.tokens)
        self._make_room(len(prompt) - keep, slot)
        slot.used = time.monotonic()
        try:
            sequence._sampler = Sampler(self.llama, request.params)
            sequence._detok = Detokenizer(self.llama, prompt[-4:])
        except Exception as exc:
            slot.owner = None
            sequence._end(None, APIError(f"Cannot sample: {exc}"))
            return
        self._active.append(sequence)

    def _holds_window(self, slot: _Slot, end: int) -> bool:
        """Whether *slot* holds the cells that tokens after its first *end*
        attend to: a sliding-window cache may have dropped earlier ones."""
        memory = llama_cpp.llama_get_memory(self._ctx)
        pos_min = llama_cpp.llama_memory_seq_pos_min(memory, slot.id)
        return 0 <= pos_min <= max(0, end - self._n_swa)

    def _make_room(self, needed: int, keep: _Slot | None = None) -> None:
        """Drop idle slots' cached prefixes, oldest first, until *needed* cells fit."""
        for slot in sorted(self._slots, key=lambda s: s.used):
            if self._cells_used() + needed <= self.n_ctx:
                return
            if slot.owner is None and slot is not keep and slot.tokens:
                self._drop(slot, 0)

    def _cells_used(self) -> int:
        pending = sum(1 for s in self._active if s._pending is not None)
        return distinct_cells([slot.tokens for slot in self._slots]) + pending

    def _share(self, sequence: Sequence) -> None:
        """Give *sequence* the cells of its prompt's next tokens that another
        slot holds, so that they are not evaluated again.

        A cell of the unified KV cache may belong to several sequences: a
        system prompt or a document that several requests begin with is
        evaluated once (llama.cpp's server evaluates it in every slot).
        """
        slot = sequence._slot
        assert slot is not None
        if not self._shares:
            return
        prompt = sequence.request.prompt
        start = shared = sequence._n_past
        source = None
        for other in self._slots:
            n = min(common_prefix(other.tokens, prompt), len(prompt) - 1)
            if other is not slot and n > shared:
                source, shared = other, n
        if source is None:
            return
        if not self._holds_window(source, shared) or (
            start > 0 and not self._holds_window(slot, shared)
        ):
            return
        memory = llama_cpp.llama_get_memory(self._ctx)
        llama_cpp.llama_memory_seq_rm(memory, slot.id, start, -1)
        llama_cpp.llama_memory_seq_cp(memory, source.id, slot.id, start, shared)
        slot.tokens = prompt[:shared]
        sequence._n_past = shared
        self.stats["shared"] += shared - start

    def _waits_to_share(self, sequence: Sequence) -> bool:
        """Whether an earlier sequence is still evaluating the next
        :data:`SHARE_WAIT` or more tokens of *sequence*'s prompt."""
        if not self._shares:
            return False
        prompt = sequence.request.prompt
        for other in self._active:
            if other is sequence:
                return False
            if other._pending is not None:
                continue
            n = min(common_prefix(other.request.prompt, prompt), len(prompt) - 1)
            if n - sequence._n_past >= SHARE_WAIT and other._n_past < n:
                return True
        return False

    def _drop(self, slot: _Slot, keep: int) -> None:
        """Free *slot*'s cells after its first *keep* tokens, saving it first."""
        if keep >= len(slot.tokens):
            return
        if len(slot.tokens) - keep >= CACHE_MIN:
            self._save(slot)
        memory = llama_cpp.llama_get_memory(self._ctx)
        if not llama_cpp.llama_memory_seq_rm(memory, slot.id, keep, -1):
            llama_cpp.llama_memory_seq_rm(memory, slot.id, -1, -1)
            keep = 0
        slot.tokens = slot.tokens[:keep]

    def _compact(self, slot: _Slot) -> None:
        """Move idle slots' cells to the prompt cache before a long prompt.

        llama.cpp attends over every KV cell up to the last one in use; idle
        sequences left high in the cache made each chunk of a new prompt
        attend over (masked) cells it has nothing to do with.
        """
        for idle in self._slots:
            if idle is not slot and idle.owner is None and idle.tokens:
                self._drop(idle, 0)

    def _save(self, slot: _Slot) -> None:
        """Copy *slot*'s cells into the prompt cache, unless short or kept already."""
        cache = self.cache
        if cache is None or len(slot.tokens) < CACHE_MIN or cache.covers(slot.tokens):
            return
        size = llama_cpp.llama_state_seq_get_size(self._ctx, slot.id)
        if not size or size > cache.capacity:
            return
        data = (ctypes.c_ubyte * size)()
        if llama_cpp.llama_state_seq_get_data(self._ctx, data, size, slot.id) == size:
            cache.put(slot.tokens, data)

    def _restore(self, slot: _Slot, prompt: list[int], keep: int) -> int:
        """Copy back the cached sequence that shares most with *prompt*.

        Only when it shares at least :data:`CACHE_MIN` tokens more than the
        *keep* the slot holds already; returns the prefix the slot now holds.
        """
        assert self.cache is not None
        found, shared = self.cache.find(prompt)
        shared = min(shared, len(prompt) - 1)
        if found is None or shared < keep + CACHE_MIN:
            return keep
        self._drop(slot, 0)
        self._make_room(len(found) + len(prompt) - shared, slot)
        data = self.cache.get(found)
        if not llama_cpp.llama_state_seq_set_data(self._ctx, data, len(data), slot.id):
            memory = llama_cpp.llama_get_memory(self._ctx)
            llama_cpp.llama_memory_seq_rm(memory, slot.id, -1, -1)
            return 0
        slot.tokens = list(found)
        return shared

    def _step(self) -> None:
        memory = llama_cpp.llama_get_memory(self._ctx)
        for sequence in [s for s in self._active if s.cancelled]:
            self._retire(sequence, None, drop=True)
        if not self._active:
            return
        batch = self._batch
        batch.n = 0
        rows: list[tuple[Sequence, int]] = []
        chunks: list[tuple[Sequence, list[int]]] = []
        generating = [s for s in self._active if s._pending is not None]
        for sequence in generating:
            token = [sequence._pending]
            row = batch.add(token, sequence._n_past, sequence._slot.id, True)
            rows.append((sequence, row))
            chunks.append((sequence, token))
        budget = batch.capacity - batch.n
        if generating:
            budget = min(budget, PREFILL_CHUNK)
        for sequence in self._active:
            if sequence._pending is not None or budget <= 0:
                continue
            if self._waits_to_share(sequence):
                continue
            before = sequence._n_past
            self._share(sequence)
            self.stats["reused"] += sequence._n_past - before
            prompt = sequence.request.prompt
            end = sequence._n_past + budget
            if end < len(prompt):
                end = chunk_end(sequence._n_past, end)
            tokens = prompt[sequence._n_past : end]
            last = sequence._n_past + len(tokens) == len(prompt)
            row = batch.add(tokens, sequence._n_past, sequence._slot.id, last)
            if last:
                rows.append((sequence, row))
            chunks.append((sequence, tokens))
            budget -= len(tokens)

        self._tuner.apply(self._ctx)
        self._in_flight = [s for s, _ in chunks]
        self._flag[0] = b"\x00"
        self._wake_all()
        started, cpu = time.perf_counter(), time.process_time()
        status = llama_cpp.llama_decode(self._ctx, batch.struct())
        took, cpu = time.perf_counter() - started, time.process_time() - cpu
        if status == 0:
            self.stats["steps"] += 1
            self.stats["step_tokens"] += batch.n
            self.stats["step_sequences"] += len(chunks)
            self.stats["decode_seconds"] += took
            if len(chunks) == len(generating):
                self._tuner.record(batch.n, took, cpu)
        self._in_flight = []
        if status != 0:
            for sequence, _ in chunks:  # llama.cpp keeps none of a failed batch
                llama_cpp.llama_memory_seq_rm(
                    memory, sequence._slot.id, sequence._n_past, -1
                )
            self._failed(status, chunks)
            return
        for sequence, tokens in chunks:
            sequence._n_past += len(tokens)
            sequence._slot.tokens.extend(tokens)
            if sequence._pending is not None:
                sequence._generated.append(sequence._pending)
                sequence._pending = None
        logits = self._logits(len(rows)) if rows else self._logits_view
        for output, (sequence, row) in enumerate(rows):
            if sequence.cancelled:
                continue
            try:
                self._sample(sequence, row, logits[output])
            except Exception as exc:
                log.exception("sampling failed")
                self._retire(
                    sequence, None, error=APIError(f"Sampling failed: {exc}", 500)
                )

    def _failed(self, status: int, chunks: list[tuple[Sequence, list[int]]]) -> None:
        if status == 2:  # aborted for a client that left: the rest try again
            self.stats["aborted_steps"] += 1
            return
        if status == 1:  # no room in the KV cache
            before = sum(len(slot.tokens) for slot in self._slots)
            self._make_room(self.n_ctx + 1)
            if sum(len(slot.tokens) for slot in self._slots) < before:
                return  # idle prefixes dropped: try again
            victim = max((s for s, _ in chunks), key=lambda s: s.enqueued)
            if victim._pending is not None:
                self._retire(victim, "length")
            else:
                self._retire(
                    victim,
                    None,
                    error=APIError(
                        f"The model's context of {self.n_ctx} tokens is full; "
                        "retry shortly or shorten the prompt.",
                        503,
                        code="context_full",
                        headers={"Retry-After": "1"},
                    ),
                    drop=True,
                )
            return
        error = APIError(f"llama_decode failed with status {status}.", 500)
        for sequence, _ in chunks:
            self._retire(sequence, None, error=error, drop=True)

    def _logits(self, n_outputs: int) -> np.ndarray:
        """The last decode's logits, a row per output in the batch's order.

        One call into llama.cpp for the step rather than one per sequence,
        and the array over its buffer is made again only when llama.cpp has
        moved the buffer (it grows it, never shrinks it).
        """
        address = self._get_logits(self._ctx)
        if not address:
            raise ValueError("the last decode kept no logits")
        view = self._logits_view
        if address != self._logits_at or len(view) < n_outputs:
            buffer = (ctypes.c_float * (n_outputs * self.n_vocab)).from_address(address)
            view = np.frombuffer(buffer, np.float32).reshape(n_outputs, self.n_vocab)
            self._logits_at, self._logits_view = address, view
        return view

    def _sample(self, sequence: Sequence, row: int, values: np.ndarray) -> None:
        request = sequence.request
        sampler = sequence._sampler
        assert sampler is not None and sequence._detok is not None
        token = sampler.sample(self._ctx, row, values)
        if sequence.first_token_at is None:
            sequence.first_token_at = time.monotonic()
        if llama_cpp.llama_vocab_is_eog(self._vocab, token):
            self._retire(sequence, "stop")
            return
        sequence.completion_tokens += 1
        logprob = top = None
        if request.params.logprobs is not None:
            found = sampler.logprobs(self._ctx, row, token, values)
            if found is not None:
                logprob, ids = found
                top = {self._piece(i): lp for i, lp in ids.items()}
                top[self._piece(token)] = logprob
        text, stopped = sequence._stops.feed(sequence._detok.feed(token))
        if text or logprob is not None:
            sequence._push(Token(text, logprob, top))
        if stopped:
            sequence._generated.append(token)
            self._retire(sequence, "stop", flush=False)
            return
        sequence._pending = token
        criteria = request.criteria
        if criteria is not None and criteria(
            _TokenView(request.prompt, [*sequence._generated, token]), None
        ):
            self._retire(sequence, "stop")
        elif sequence._n_past + 1 >= self.n_ctx or (
            request.max_tokens is not None
            and sequence.completion_tokens >= request.max_tokens
            # As llama-cpp-python, finish a character begun (3 tokens at most).
            and not (
                _partial(sequence._detok)
                and sequence.completion_tokens < request.max_tokens + 3
            )
        ):
            self._retire(sequence, "length")

    def _piece(self, token: int) -> str:
        assert self.llama is not None
        return self.llama.detokenize([token]).decode("utf-8", errors="ignore")

    def _retire(
        self,
        sequence: Sequence,
        reason: str | None,
        error: Exception | None = None,
        drop: bool = False,
        flush: bool = True,
    ) -> None:
        """End a sequence; its KV cells stay as a cached prefix unless *drop*."""
        if flush and error is None and sequence._detok is not None:
            text, stopped = sequence._stops.feed(sequence._detok.flush())
            if not stopped:
                text += sequence._stops.flush()
            if text:
                sequence._push(Token(text))
        if sequence in self._active:
            self._active.remove(sequence)
        slot = sequence._slot
        if slot is not None:
            if drop:
                memory = llama_cpp.llama_get_memory(self._ctx)
                llama_cpp.llama_memory_seq_rm(memory, slot.id, -1, -1)
                slot.tokens = []
            slot.used = time.monotonic()
            slot.owner = None
        sequence._end(reason, error)

    def _fail_all(self, error: Exception) -> None:
        for sequence in list(self._active):
            self._retire(sequence, None, error=error, drop=True)
        self._clear_memory()


def tokens_of(sequence: Sequence, wait: Callable[[Sequence], None]) -> Iterator[Token]:
    """The sequence's tokens as they come; *wait* blocks (or yields) until more."""
    try:
        while True:
            tokens = sequence.take()
            if tokens:
                yield from tokens
                continue
            if sequence.done:
                break
            wait(sequence)
        if sequence.error is not None:
            raise sequence.error
    finally:
        sequence.cancel()
