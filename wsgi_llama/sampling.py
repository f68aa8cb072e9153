"""Per-sequence sampling in C: one llama.cpp sampler chain per sequence.

The engine decodes several sequences in one batch, then asks each sequence's
:class:`Sampler` for its next token from its row of logits. The chain is the
one llama-cpp-python builds (``Llama._init_sampler``), in its order, so a
sequence samples the same tokens as today's one-at-a-time path: logit bias,
penalties, grammar, then greedy (temperature 0), mirostat, or top-k, typical,
top-p, min-p, temperature and a seeded draw. Each chain sees only its own
sequence's tokens, which a grammar needs.

A grammar that leaves no candidate must not reach llama.cpp's accept, which
then throws through the C API and aborts the process: with a grammar, the
candidates are built here, the chain applied, and the choice checked before
it is accepted.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import llama_cpp
import numpy as np

from .text import Detokenizer, StopMatcher

__all__ = [
    "Detokenizer",
    "NoCandidate",
    "Sampler",
    "SamplingParams",
    "StopMatcher",
]

#: llama_token_data as numpy sees it: {int32 id; float logit; float p}.
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
#: llama-cpp-python's mirostat (v1) m.
_MIROSTAT_M = 100


@dataclass
class SamplingParams:
    """A request's sampling fields, with llama-cpp-python's defaults."""

    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    typical_p: float = 1.0
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_last_n: int = 64
    mirostat_mode: int = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    seed: int | None = None
    logit_bias: dict[int, float] | None = None
    grammar: str | None = None  # GBNF text, already validated by pool.Model.grammar()
    logprobs: int | None = None  # top-n logprobs wanted per token (None: none)


class NoCandidate(RuntimeError):
    """The grammar leaves no token and the model has no end-of-generation token."""


class Sampler:
    """One sequence's sampler chain, built in C; use from one thread at a time.

    :meth:`sample` returns the model's end-of-generation token, unaccepted,
    when the grammar (with the logit bias) allows no token at all, and sets
    :attr:`dead_end`: the sequence should end with finish_reason "stop".
    """

    _head = _grammar = _tail = None

    def __init__(self, model: llama_cpp.Llama, params: SamplingParams) -> None:
        self.params = params
        self.dead_end = False
        self._model = model  # keeps the vocabulary the grammar points into alive
        vocab = model._model.vocab
        self._n_vocab = n_vocab = model.n_vocab()
        self._end = _end_token(vocab)
        # Samplers before the grammar, the grammar, and the ones after it; one
        # chain in all when there is no grammar.
        self._head = _chain()
        self._grammar = None
        self._tail = self._head
        try:
            self._build(vocab, params)
        except BaseException:
            self.close()
            raise
        if self._grammar is not None:
            self._data = np.empty(n_vocab, _TOKEN_DATA)
            self._ids = np.arange(n_vocab, dtype=np.int32)
            self._cur = llama_cpp.llama_token_data_array(
                data=self._data.ctypes.data_as(llama_cpp.llama_token_data_p),
                size=n_vocab,
                selected=-1,
                sorted=False,
            )
            self._one = (llama_cpp.llama_token_data * 1)()
            self._cur_one = llama_cpp.llama_token_data_array(
                data=self._one, size=1, selected=-1, sorted=False
            )

    def _build(self, vocab: llama_cpp.llama_vocab_p, p: SamplingParams) -> None:
        add = llama_cpp.llama_sampler_chain_add
        n_vocab = self._n_vocab
        if p.logit_bias:
            biases = (llama_cpp.llama_logit_bias * len(p.logit_bias))()
            for i, (token, bias) in enumerate(p.logit_bias.items()):
                biases[i].token = token
                biases[i].bias = bias
            add(
                self._head,
                llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(biases), biases),
            )
        add(
            self._head,
            llama_cpp.llama_sampler_init_penalties(
                n_vocab,
                p.penalty_last_n,
                p.repeat_penalty,
                p.frequency_penalty,
                p.presence_penalty,
            ),
        )
        if p.grammar is not None:
            grammar = llama_cpp.llama_sampler_init_grammar(
                vocab, p.grammar.encode("utf-8"), b"root"
            )
            if not grammar:
                raise ValueError("llama.cpp could not parse the grammar")
            self._grammar = grammar
            self._tail = _chain()
        # A seed outside uint32 wraps as C would; None: llama.cpp picks one.
        seed = llama_cpp.LLAMA_DEFAULT_SEED if p.seed is None else p.seed & 0xFFFFFFFF
        tail = self._tail
        if p.temperature <= 0:
            add(tail, llama_cpp.llama_sampler_init_greedy())
        elif p.mirostat_mode == 1:
            add(
                tail,
                llama_cpp.llama_sampler_init_mirostat(
                    n_vocab, seed, p.mirostat_tau, p.mirostat_eta, _MIROSTAT_M
                ),
            )
        elif p.mirostat_mode == 2:
            add(
                tail,
                llama_cpp.llama_sampler_init_mirostat_v2(
                    seed, p.mirostat_tau, p.mirostat_eta
                ),
            )
        else:
            add(tail, llama_cpp.llama_sampler_init_top_k(p.top_k))
            add(tail, llama_cpp.llama_sampler_init_typical(p.typical_p, 1))
            add(tail, llama_cpp.llama_sampler_init_top_p(p.top_p, 1))
            add(tail, llama_cpp.llama_sampler_init_min_p(p.min_p, 1))
            add(tail, llama_cpp.llama_sampler_init_temp(p.temperature))
            add(tail, llama_cpp.llama_sampler_init_dist(seed))
        self._greedy = p.temperature <= 0

    def sample(self, ctx: llama_cpp.llama_context_p, idx: int) -> int:
        """Sample from row *idx* of the last decode's logits, and accept it.

        Raises ValueError if the last decode kept no logits for *idx*
        (llama.cpp would abort the process).
        """
        if self._head is None:
            raise ValueError("the sampler is closed")
        if self.dead_end:
            return self._end
        logits = llama_cpp.llama_get_logits_ith(ctx, idx)
        if not logits:
            raise ValueError(f"the last decode kept no logits for row {idx}")
        if self._grammar is None:
            return llama_cpp.llama_sampler_sample(self._head, ctx, idx)
        return self._sample_grammar(logits)

    def _sample_grammar(self, logits: ctypes._Pointer) -> int:
        apply = llama_cpp.llama_sampler_apply
        cur = self._cur
        values = np.ctypeslib.as_array(logits, shape=(self._n_vocab,))
        if self._greedy:
            # The best token overall is the best the grammar allows, if it
            # allows it: one check instead of the grammar over the vocabulary.
            self._fill(values)
            apply(self._head, ctypes.byref(cur))
            apply(self._tail, ctypes.byref(cur))
            best = self._data[cur.selected]
            one = self._one[0]
            one.id, one.logit, one.p = int(best["id"]), float(best["logit"]), 0.0
            self._cur_one.size, self._cur_one.selected = 1, -1
            apply(self._grammar, ctypes.byref(self._cur_one))
            if one.logit != -np.inf:
                return self._accept(int(best["id"]))
        self._fill(values)
        apply(self._head, ctypes.byref(cur))
        apply(self._grammar, ctypes.byref(cur))
        apply(self._tail, ctypes.byref(cur))
        if not 0 <= cur.selected < cur.size:
            return self._give_up()
        chosen = self._data[cur.selected]
        if not chosen["logit"] > -np.inf:
            return self._give_up()
        return self._accept(int(chosen["id"]))

    def _fill(self, values: np.ndarray) -> None:
        data = self._data
        data["id"] = self._ids
        data["logit"] = values
        data["p"] = 0.0
        cur = self._cur
        cur.size, cur.selected, cur.sorted = self._n_vocab, -1, False

    def _accept(self, token: int) -> int:
        llama_cpp.llama_sampler_accept(self._head, token)
        llama_cpp.llama_sampler_accept(self._grammar, token)
        llama_cpp.llama_sampler_accept(self._tail, token)
        return token

    def _give_up(self) -> int:
        """No token is allowed: end the sequence rather than abort the process."""
        self.dead_end = True
        if self._end < 0:
            raise NoCandidate("the grammar allows no token and the model has no EOS")
        return self._end

    def logprobs(
        self, ctx: llama_cpp.llama_context_p, idx: int, token: int
    ) -> tuple[float, dict[int, float]] | None:
        """*token*'s log-probability in row *idx*, and the top-n alternatives.

        From the raw logits, as OpenAI reports the model's logprobs (before
        penalties, bias, grammar or temperature). None unless asked for.
        """
        n = self.params.logprobs
        if n is None:
            return None
        pointer = llama_cpp.llama_get_logits_ith(ctx, idx)
        if not pointer:
            raise ValueError(f"the last decode kept no logits for row {idx}")
        logprobs = log_softmax(np.ctypeslib.as_array(pointer, shape=(self._n_vocab,)))
        n = min(n, self._n_vocab)
        top: dict[int, float] = {}
        if n > 0:
            best = np.argpartition(-logprobs, n - 1)[:n]
            best = best[np.lexsort((best, -logprobs[best]))]
            top = {int(t): float(logprobs[t]) for t in best}
        return float(logprobs[token]), top

    def close(self) -> None:
        """Free the chain (idempotent)."""
        head, grammar, tail = self._head, self._grammar, self._tail
        self._head = self._grammar = self._tail = None
        for sampler in (head, grammar, None if tail is head else tail):
            if sampler:
                llama_cpp.llama_sampler_free(sampler)

    def __del__(self) -> None:
        try:  # noqa: SIM105 (contextlib may be gone at interpreter shutdown)
            self.close()
        except Exception:  # interpreter shutdown: llama_cpp may be gone
            pass


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities of a row of logits (float32, as llama-cpp-python)."""
    shifted = logits - logits.max()
    return shifted - np.log(np.exp(shifted).sum())


def _chain() -> llama_cpp.llama_sampler_p:
    params = llama_cpp.llama_sampler_chain_default_params()
    params.no_perf = True
    return llama_cpp.llama_sampler_chain_init(params)


def _end_token(vocab: llama_cpp.llama_vocab_p) -> int:
    """The token that ends a generation: EOS, else EOT, else -1."""
    eos = llama_cpp.llama_vocab_eos(vocab)
    return eos if eos >= 0 else llama_cpp.llama_vocab_eot(vocab)
