"""Stand-in for :mod:`.sampling` until it lands: the same interface, minimal.

Per-sequence sampling in C (a llama.cpp sampler chain), incremental
detokenization and stop-string matching, as the engine needs them.
"""

from __future__ import annotations

import codecs
import ctypes
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import llama_cpp
import numpy as np


@dataclass
class SamplingParams:
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
    grammar: str | None = None
    logprobs: int | None = None


class Sampler:
    """A llama.cpp sampler chain for one sequence."""

    def __init__(self, model: llama_cpp.Llama, params: SamplingParams) -> None:
        self.params = params
        n_vocab = model.n_vocab()
        chain = llama_cpp.llama_sampler_chain_init(
            llama_cpp.llama_sampler_chain_default_params()
        )
        self._chain = chain

        def add(sampler: llama_cpp.llama_sampler_p) -> None:
            llama_cpp.llama_sampler_chain_add(chain, sampler)

        seed = params.seed if params.seed is not None else random.getrandbits(32)
        seed &= 0xFFFFFFFF
        if params.logit_bias:
            items = list(params.logit_bias.items())
            array = (llama_cpp.llama_logit_bias * len(items))()
            for i, (token, bias) in enumerate(items):
                array[i].token = int(token)
                array[i].bias = -math.inf if bias <= -100 else float(bias)
            add(llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(items), array))
        add(
            llama_cpp.llama_sampler_init_penalties(
                n_vocab,
                params.penalty_last_n,
                params.repeat_penalty,
                params.frequency_penalty,
                params.presence_penalty,
            )
        )
        if params.grammar is not None:
            grammar = llama_cpp.llama_sampler_init_grammar(
                model._model.vocab, params.grammar.encode("utf-8"), b"root"
            )
            if not grammar:
                raise ValueError("invalid grammar")
            add(grammar)
        temperature = params.temperature
        if temperature == 0.0:
            add(llama_cpp.llama_sampler_init_greedy())
        elif temperature < 0.0:
            add(llama_cpp.llama_sampler_init_dist(seed))
        elif params.mirostat_mode == 1:
            add(llama_cpp.llama_sampler_init_temp(temperature))
            add(
                llama_cpp.llama_sampler_init_mirostat(
                    n_vocab, seed, params.mirostat_tau, params.mirostat_eta, 100
                )
            )
        elif params.mirostat_mode == 2:
            add(llama_cpp.llama_sampler_init_temp(temperature))
            add(
                llama_cpp.llama_sampler_init_mirostat_v2(
                    seed, params.mirostat_tau, params.mirostat_eta
                )
            )
        else:
            add(llama_cpp.llama_sampler_init_top_k(params.top_k))
            add(llama_cpp.llama_sampler_init_typical(params.typical_p, 1))
            add(llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
            add(llama_cpp.llama_sampler_init_min_p(params.min_p, 1))
            add(llama_cpp.llama_sampler_init_temp(temperature))
            add(llama_cpp.llama_sampler_init_dist(seed))
        self._n_vocab = n_vocab

    def sample(self, ctx: llama_cpp.llama_context_p, idx: int) -> int:
        return int(llama_cpp.llama_sampler_sample(self._chain, ctx, idx))

    def logprobs(
        self, ctx: llama_cpp.llama_context_p, idx: int, token: int
    ) -> tuple[float, dict[int, float]] | None:
        if self.params.logprobs is None:
            return None
        pointer = llama_cpp.llama_get_logits_ith(ctx, idx)
        logits = np.ctypeslib.as_array(pointer, shape=(self._n_vocab,))
        top = logits.max()
        logsum = top + math.log(float(np.exp(logits - top).sum()))
        n = max(0, self.params.logprobs)
        best = np.argpartition(-logits, n)[:n] if n else []
        result = {int(i): float(logits[i] - logsum) for i in best}
        return float(logits[token] - logsum), result

    def close(self) -> None:
        if self._chain:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None


class Detokenizer:
    """Token pieces to text, one token at a time, holding split UTF-8."""

    def __init__(self, model: llama_cpp.Llama, prompt_tail: Sequence[int] = ()) -> None:
        self._vocab = model._model.vocab
        self._buffer = ctypes.create_string_buffer(256)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def piece(self, token: int) -> bytes:
        n = llama_cpp.llama_token_to_piece(
            self._vocab, token, self._buffer, 256, 0, False
        )
        if n < 0:
            buffer = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buffer, -n, 0, False)
            return buffer.raw[:n]
        return self._buffer.raw[:n]

    def feed(self, token: int) -> str:
        return self._decoder.decode(self.piece(token))

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


class StopMatcher:
    """Cuts text at the first stop string, holding back a possible start of one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._longest = max(map(len, self._stops), default=0)
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        if not self._stops:
            return text, False
        text = self._held + text
        first = min(
            (i for i in (text.find(s) for s in self._stops) if i >= 0), default=-1
        )
        if first >= 0:
            self._held = ""
            return text[:first], True
        keep = 0
        for n in range(min(self._longest - 1, len(text)), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self._stops):
                keep = n
                break
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held
