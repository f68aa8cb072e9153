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

llama.cpp's samplers go over the whole vocabulary (262k tokens for Gemma 3)
where the result depends on a few tokens only; the same C samplers are given
just those where that is exact (up to the order of exactly equal logits):
the highest logit when nothing changes logits; the tokens that can make the
top-k when penalties or a bias change some; the best token, or the best
1,024, when a grammar has to judge them. A grammar still goes over the whole
vocabulary when it allows fewer than top-k of the best 1,024 (a JSON
grammar's structural positions, at temperature > 0): ``full_scans`` counts
those.
"""

from __future__ import annotations

import ctypes
import math
from collections import deque
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

    #: With a grammar and top-k, the best tokens the grammar is tried on
    #: before the whole vocabulary.
    SHORTLIST = 1024
    #: Block size for bounding the best logits (see _top).
    BLOCK = 512

    _head = _grammar = _tail = _shortlist = None
    _scratch: np.ndarray | None = None
    _few: np.ndarray | None = None

    def __init__(self, model: llama_cpp.Llama, params: SamplingParams) -> None:
        self.params = params
        self.dead_end = False
        #: Tokens for which the grammar went over the whole vocabulary.
        self.full_scans = 0
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
            k = params.top_k
            shortlisting = (
                not self._greedy
                and params.mirostat_mode not in (1, 2)
                and k > 0
                and 4 * k <= self.SHORTLIST < n_vocab
            )
            if shortlisting:
                self._shortlist = llama_cpp.llama_sampler_init_top_k(self.SHORTLIST)

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
        if p.grammar:
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
        self._argmax = (
            self._greedy and not p.logit_bias and not p.grammar and _penalties_off(p)
        )
        # Top-k (or greedy) keeps only the best few: the tokens that can be
        # among them are the best raw logits and those that the penalties
        # and the bias change. With penalties on (the API's default), llama.cpp
        # would go over the whole vocabulary for them: 1.2 ms on Gemma 3.
        self._keep = 1 if self._greedy else p.top_k
        self._narrow = (
            not self._argmax
            and not p.grammar
            and p.mirostat_mode not in (1, 2)
            and self._keep > 0
        )
        self._biased = np.array(sorted(p.logit_bias or ()), dtype=np.intp)
        # The penalties' window, as llama.cpp keeps it, and how often each
        # token is in it: the tokens whose logits the penalties change.
        self._recent: deque[int] = deque(maxlen=max(p.penalty_last_n, 0))
        self._counts: dict[int, int] = {}
        self._penalised = not _penalties_off(p)

    def sample(
        self,
        ctx: llama_cpp.llama_context_p,
        idx: int,
        values: np.ndarray | None = None,
    ) -> int:
        """Sample from row *idx* of the last decode's logits, and accept it.

        *values* is that row as numpy sees it, if the caller has it already.
        Raises ValueError if the last decode kept no logits for *idx*
        (llama.cpp would abort the process).
        """
        if self._head is None:
            raise ValueError("the sampler is closed")
        if self.dead_end:
            return self._end
        if values is None:
            values = self._row(ctx, idx)
        if self._grammar is not None:
            return self._sample_grammar(values)
        if self._argmax:
            # Nothing in the chain changes a logit or keeps state: the chain
            # would pick the first highest logit, as this does, 5x faster.
            best = int(values.argmax())  # the first of equal maxima, or a NaN
            if not np.isnan(values[best]):
                return best
        if self._narrow:
            token = self._sample_narrow(values)
            if token is not None:
                return token
        token = llama_cpp.llama_sampler_sample(self._head, ctx, idx)
        self._remember(token)
        return token

    def _row(self, ctx: llama_cpp.llama_context_p, idx: int) -> np.ndarray:
        logits = llama_cpp.llama_get_logits_ith(ctx, idx)
        if not logits:
            raise ValueError(f"the last decode kept no logits for row {idx}")
        return np.ctypeslib.as_array(logits, shape=(self._n_vocab,))

    def _sample_narrow(self, values: np.ndarray) -> int | None:
        """The chain applied to the tokens that can make its top-k only.

        Those are the best *keep* of the tokens the penalties and the bias
        leave alone, and the ones they change. Their logits go through the
        same C samplers, so the choice is the whole vocabulary's (up to the
        order of exactly equal logits).
        """
        changed = self._changed()
        if len(changed):
            # Hidden for the search, then restored: the logprobs read them raw.
            saved = values[changed]
            values[changed] = -np.inf
            try:
                top = _top(values, self._keep, self.BLOCK)
            finally:
                values[changed] = saved
            if top is None:
                return None
            ids = np.concatenate((top, changed))
            ids.sort()
        else:
            ids = _top(values, self._keep, self.BLOCK)
            if ids is None:
                return None
        data, cur = self._candidates(ids, values)
        llama_cpp.llama_sampler_apply(self._head, ctypes.byref(cur))
        if not 0 <= cur.selected < cur.size:
            return None
        token = int(data["id"][cur.selected])
        llama_cpp.llama_sampler_accept(self._head, token)
        self._remember(token)
        return token

    def _changed(self) -> np.ndarray:
        """The tokens the penalties or the bias change, each once."""
        if not self._counts:
            return self._biased
        recent = np.fromiter(self._counts, np.intp, len(self._counts))
        return np.union1d(recent, self._biased) if len(self._biased) else recent

    def _candidates(
        self, ids: np.ndarray, values: np.ndarray
    ) -> tuple[np.ndarray, llama_cpp.llama_token_data_array]:
        """*ids* with their logits, in a buffer kept for the next token."""
        n = len(ids)
        if self._few is None or len(self._few) < n:
            self._few = np.empty(max(n, 256), _TOKEN_DATA)
            self._cur_few = llama_cpp.llama_token_data_array(
                data=self._few.ctypes.data_as(llama_cpp.llama_token_data_p)
            )
        data = self._few[:n]
        data["id"] = ids
        data["logit"] = values[ids]
        data["p"] = 0.0
        cur = self._cur_few
        cur.size, cur.selected, cur.sorted = n, -1, False
        return data, cur

    def _remember(self, token: int) -> None:
        """Keep *token* in the penalties' window, as llama.cpp's accept does."""
        if not self._penalised:
            return
        recent, counts = self._recent, self._counts
        if len(recent) == recent.maxlen:
            old = recent[0]
            if counts[old] == 1:
                del counts[old]
            else:
                counts[old] -= 1
        recent.append(token)
        counts[token] = counts.get(token, 0) + 1

    def _sample_grammar(self, values: np.ndarray) -> int:
        apply = llama_cpp.llama_sampler_apply
        cur = ctypes.byref(self._cur)
        if self._greedy:
            # The best token overall is the best the grammar allows, if it
            # allows it: one check instead of the grammar over the vocabulary.
            self._fill(values)
            apply(self._head, cur)
            apply(self._tail, cur)
            best = self._data[self._cur.selected]
            if self._allows(int(best["id"]), float(best["logit"])):
                return self._accept(int(best["id"]))
            # Else the best the grammar allows among the best few hundred,
            # if it allows any: no token outside has as high a logit.
            token = self._best_allowed()
            if token is not None:
                return self._accept(token)
        elif self._shortlist is not None:
            # Top-k keeps the k best tokens the grammar allows: if the grammar
            # allows k of the best few hundred, the rest of the vocabulary
            # cannot change the outcome, and need not go through the grammar.
            self._fill(values)
            apply(self._head, cur)
            apply(self._shortlist, cur)
            apply(self._grammar, cur)
            kept = self._data[: self._cur.size]["logit"]
            if np.count_nonzero(kept > -np.inf) >= self.params.top_k:
                self._cur.sorted = False
                return self._finish()
        self.full_scans += 1
        self._fill(values)
        apply(self._head, cur)
        apply(self._grammar, cur)
        return self._finish()

    def _best_allowed(self) -> int | None:
        """Greedy over the tokens at or above the SHORTLIST-th highest logit
        (after the penalties and bias): the first highest the grammar allows."""
        logits = self._data["logit"]
        block = max(1, min(self.BLOCK, self._n_vocab // (2 * self.SHORTLIST)))
        ids = _top(logits, self.SHORTLIST, block)
        if ids is None:
            return None
        few = self._data[ids]  # a copy, in id order
        cur = llama_cpp.llama_token_data_array(
            data=few.ctypes.data_as(llama_cpp.llama_token_data_p),
            size=len(few),
            selected=-1,
            sorted=False,
        )
        llama_cpp.llama_sampler_apply(self._grammar, ctypes.byref(cur))
        kept = few["logit"]
        high = kept.max()
        if not high > -np.inf:
            return None
        return int(few["id"][np.flatnonzero(kept == high)[0]])

    def _finish(self) -> int:
        """Apply the samplers after the grammar; accept what they choose."""
        llama_cpp.llama_sampler_apply(self._tail, ctypes.byref(self._cur))
        selected = self._cur.selected
        if not 0 <= selected < self._cur.size:
            return self._give_up()
        chosen = self._data[selected]
        if not chosen["logit"] > -np.inf:
            return self._give_up()
        return self._accept(int(chosen["id"]))

    def _allows(self, token: int, logit: float) -> bool:
        """Whether the grammar allows *token* next."""
        one = self._one[0]
        one.id, one.logit, one.p = token, logit, 0.0
        self._cur_one.size, self._cur_one.selected, self._cur_one.sorted = 1, -1, False
        llama_cpp.llama_sampler_apply(self._grammar, ctypes.byref(self._cur_one))
        return one.logit > -np.inf

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
        self,
        ctx: llama_cpp.llama_context_p,
        idx: int,
        token: int,
        values: np.ndarray | None = None,
    ) -> tuple[float, dict[int, float]] | None:
        """*token*'s log-probability in row *idx*, and the top-n alternatives.

        From the raw logits, as OpenAI reports the model's logprobs (before
        penalties, bias, grammar or temperature). None unless asked for.
        """
        n = self.params.logprobs
        if n is None:
            return None
        if values is None:
            values = self._row(ctx, idx)
        top = _best(values, min(n, self._n_vocab))
        # log(sum(exp(logits))) without a full row of logprobs: the top-n
        # need only their own.
        if self._scratch is None:
            self._scratch = np.empty(self._n_vocab, np.float32)
        scratch = self._scratch
        high = float(values.max())
        np.subtract(values, high, out=scratch)
        np.exp(scratch, out=scratch)
        total = high + math.log(float(scratch.sum(dtype=np.float64)))
        return float(values[token]) - total, {
            int(t): float(values[t]) - total for t in top
        }

    def close(self) -> None:
        """Free the chain (idempotent)."""
        head, grammar, tail = self._head, self._grammar, self._tail
        shortlist = self._shortlist
        self._head = self._grammar = self._tail = self._shortlist = None
        for sampler in (head, grammar, None if tail is head else tail, shortlist):
            if sampler:
                llama_cpp.llama_sampler_free(sampler)

    def __del__(self) -> None:
        try:  # noqa: SIM105 (contextlib may be gone at interpreter shutdown)
            self.close()
        except Exception:  # interpreter shutdown: llama_cpp may be gone
            pass


def _top(values: np.ndarray, n: int, block: int) -> np.ndarray | None:
    """The ids, ascending, of *values* that may be among the *n* highest.

    All of them, and a few more: those at or above the n-th highest of the
    maxima of blocks (the n blocks' maxima reach it). A full argpartition of a
    262k vocabulary takes milliseconds, this 0.05. None when that cannot be
    said cheaply (NaNs, too few finite values or blocks): the whole
    vocabulary decides then.
    """
    if n == 1:
        best = int(values.argmax())
        return np.array([best]) if values[best] > -np.inf else None
    maxima = np.maximum.reduceat(values, np.arange(0, len(values), block))
    if len(maxima) < n or n <= 0:
        return None
    bound = np.partition(maxima, -n)[-n]
    if not bound > -np.inf:
        return None
    # Only the blocks whose maximum reaches the bound can hold such values:
    # a few dozen of Gemma 3's 512, a quarter of the time of a full pass.
    blocks = np.flatnonzero(maxima >= bound)
    whole = len(values) // block
    inner = blocks[blocks < whole]
    rows = values[: whole * block].reshape(whole, block)[inner]
    found = np.flatnonzero(rows >= bound)
    ids = inner[found // block] * block + found % block
    if len(inner) < len(blocks):  # the last block, shorter than the others
        rest = np.flatnonzero(values[whole * block :] >= bound) + whole * block
        ids = np.concatenate((ids, rest))
    return ids


def _best(values: np.ndarray, n: int, block: int = 512) -> np.ndarray:
    """The ids of the *n* highest values, highest first (ties: lower id first)."""
    if n <= 0:
        return values[:0].astype(np.intp)
    candidates = _top(values, n, block)
    if candidates is None:
        candidates = np.arange(len(values))
    order = np.lexsort((candidates, -values[candidates]))[:n]
    return candidates[order]


def _penalties_off(p: SamplingParams) -> bool:
    """As llama.cpp decides that its penalties sampler does nothing."""
    return p.penalty_last_n <= 0 or (
        p.repeat_penalty == 1.0
        and p.frequency_penalty == 0.0
        and p.presence_penalty == 0.0
    )


def _chain() -> llama_cpp.llama_sampler_p:
    params = llama_cpp.llama_sampler_chain_default_params()
    params.no_perf = True
    return llama_cpp.llama_sampler_chain_init(params)


def _end_token(vocab: llama_cpp.llama_vocab_p) -> int:
    """The token that ends a generation: EOS, else EOT, else -1."""
    eos = llama_cpp.llama_vocab_eos(vocab)
    return eos if eos >= 0 else llama_cpp.llama_vocab_eot(vocab)
