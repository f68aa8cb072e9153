"""More conversations than sequences: second turns with and without the prompt cache.

Prints figures; it is not a test::

    python benchmarks/conversations.py [--model PATH] [--conversations 16]
        [--history 500] [--parallel 8]

On Gemma 3 270M by default (the ``demo`` extra). An app (in-process, Flask's
test client, the engine in its own thread) holds ``--parallel`` sequences.
Each of ``--conversations`` conversations sends a first turn of about
``--history`` tokens, one after another; then each sends its second turn
(the first prompt, its answer and a question), in the same order. By then
most first turns' cells have gone to later conversations, so a second turn
either evaluates its history again or, with the prompt cache
(``LLAMA_PROMPT_CACHE_MB``), copies it back from host memory. Reported per
setting: median and max time of a second turn (one token, so about its time
to first token), the tokens reused in place (copied back ones included) and
copied back, the cache's size, and the peak RSS of the process (one per
setting).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import Prompts
from throughput import default_model, vm_hwm

from wsgi_llama import create_app


def run(model: Path, cache_mb: float, args: argparse.Namespace) -> dict[str, Any]:
    app = create_app(
        {
            "LLAMA_MODEL": str(model),
            "LLAMA_PARALLEL": args.parallel,
            "LLAMA_PROMPT_CACHE_MB": cache_mb,
        }
    )
    client = app.test_client()
    (model_state,) = app.extensions["wsgi_llama"].pool.models.values()
    engine = model_state.engine
    prompts = Prompts(model)

    def complete(prompt: str, max_tokens: int) -> tuple[str, float]:
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
        start = time.perf_counter()
        response = client.post("/v1/completions", json=body)
        elapsed = time.perf_counter() - start
        assert response.status_code == 200, response.get_data(as_text=True)
        return response.json["choices"][0]["text"], elapsed  # type: ignore[index]

    try:
        firsts = []
        for _ in range(args.conversations):
            prompt = prompts.long(args.history) + "\nQuestion: What is this about?\n"
            answer, _ = complete(prompt + "Answer:", 16)
            firsts.append(prompt + "Answer:" + answer)
        reused, restored = engine.stats["reused"], engine.stats["restored"]
        times = []
        for first in firsts:
            second = first + "\nQuestion: Which chapter is longest?\nAnswer:"
            times.append(complete(second, 1)[1])
        cache = engine.cache
        return {
            "median": statistics.median(times),
            "max": max(times),
            "reused": engine.stats["reused"] - reused,
            "restored": engine.stats["restored"] - restored,
            "cache_mb": (cache.size if cache else 0) / 2**20,
            "entries": len(cache) if cache else 0,
            "rss_mb": vm_hwm(os.getpid()) / 2**20,
            "history": prompts.count(firsts[0]),
        }
    finally:
        prompts.close()
        model_state.engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--conversations", type=int, default=16)
    parser.add_argument("--history", type=int, default=500)
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument(
        "--cache-mb",
        type=float,
        action="append",
        help="LLAMA_PROMPT_CACHE_MB to measure (default: 0 and 256), each in "
        "a process of its own",
    )
    args = parser.parse_args()
    model = (args.model or default_model()).resolve()
    settings = args.cache_mb or [0.0, 256.0]
    if len(settings) > 1:
        print(
            f"{model.name}: {args.conversations} conversations, LLAMA_PARALLEL="
            f"{args.parallel}, first turns of ~{args.history} tokens"
        )
        argv = [
            f"--model={model}",
            f"--conversations={args.conversations}",
            f"--history={args.history}",
            f"--parallel={args.parallel}",
        ]  # not sys.argv: "--cache-mb 0" would leave its value behind
        for cache_mb in settings:
            command = [sys.executable, __file__, *argv, f"--cache-mb={cache_mb}"]
            subprocess.run(command, check=True)
        return
    for cache_mb in settings:
        r = run(model, cache_mb, args)
        print(
            f"LLAMA_PROMPT_CACHE_MB={cache_mb:g}: second turn median "
            f"{r['median'] * 1000:.0f} ms, max {r['max'] * 1000:.0f} ms; tokens "
            f"reused in place {r['reused']}, copied back {r['restored']}; cache "
            f"{r['entries']} entries, {r['cache_mb']:.0f} MB; peak RSS "
            f"{r['rss_mb']:.0f} MB (first turn with its answer: {r['history']} "
            f"tokens)"
        )


if __name__ == "__main__":
    main()
